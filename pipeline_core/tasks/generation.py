"""summarization and text-generation: generate() with the initializer's isolated settings, decode the new text.

Seq2seq models pad on the right and return only decoder tokens. Decoder-only models pad on the left, so every
row's prompt ends where generation starts, and the new text is what follows the padded prompt.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline_core.tasks.text import Encoded, TextEncoder, pad


class GenerationTask:
    def __init__(self, encoder: TextEncoder, generation_config, column: str, decoder_only: bool, pad_multiple: int):
        self.encoder = encoder
        self.generation_config = generation_config
        self.columns = {column: pa.string()}
        self.column = column
        self.decoder_only = decoder_only
        self.pad_multiple = pad_multiple

    def encode(self, table: pa.Table) -> Encoded:
        return self.encoder(table)

    def collate(self, encoded: Encoded, rows: list[int]) -> dict:
        pad_id = self.generation_config.pad_token_id
        return pad([encoded.ids[row] for row in rows], pad_id, left=self.decoder_only, multiple=self.pad_multiple)

    def forward(self, model, inputs: dict):
        return model.generate(**inputs, generation_config=self.generation_config)

    def decode(self, outputs, inputs: dict, encoded: Encoded, rows: list[int]) -> dict[str, list]:
        if self.decoder_only:
            outputs = outputs[:, inputs["input_ids"].shape[1]:]
        texts = self.encoder.tokenizer.batch_decode(outputs, skip_special_tokens=True)
        return {self.column: [text.strip() if self.column == "summary_text" else text for text in texts]}
