"""summarization and text-generation: generate() with the initializer's isolated settings, decode the new text.

Seq2seq models pad on the right and return only decoder tokens. Decoder-only models pad on the left, so every
row's prompt ends where generation starts, and the new text is what follows the padded prompt.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from pipeline_core.tasks.text import Encoded, TextEncoder


class _StopOnRequest(StoppingCriteria):
    """Ends generate() early when the run is asked to stop, so SIGTERM is answered within seconds."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


class GenerationTask:
    slice_rows = None  # the loader's default: a text row is a few tokens

    def __init__(self, encoder: TextEncoder, generation_config, column: str, decoder_only: bool,
                 should_stop=lambda: False):
        self.stopping = StoppingCriteriaList([_StopOnRequest(should_stop)])
        self.encoder = encoder
        self.encode, self.collate = encoder, encoder.collate  # preprocessing, run in the workers
        self.generation_config = generation_config
        self.columns = {column: pa.string()}
        self.column = column
        self.decoder_only = decoder_only

    def forward(self, model, inputs: dict):
        return model.generate(**inputs, generation_config=self.generation_config, stopping_criteria=self.stopping)

    def decode(self, outputs, inputs: dict, encoded: Encoded, rows: list[int]) -> dict[str, list]:
        if self.decoder_only:
            outputs = outputs[:, inputs["input_ids"].shape[1]:]
        texts = self.encoder.tokenizer.batch_decode(outputs, skip_special_tokens=True)
        return {self.column: [text.strip() if self.column == "summary_text" else text for text in texts]}
