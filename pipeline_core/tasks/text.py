"""Text preprocessing shared by the text tasks: rows -> prompts -> token ids -> padded batch tensors.

Runs in DataLoader workers, so it holds the tokenizer and settings but never the model. A row whose input is
not usable text gets a reason instead of token ids; the run goes on without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline_core.data.batching import padded_length


@dataclass
class Encoded:
    """One part's rows after tokenization: ids per row (None for a failed row) and why rows failed."""

    ids: list[list[int] | None]
    errors: list[str | None]
    offsets: list[list[tuple[int, int]] | None] | None = None
    texts: list[str | None] | None = None  # kept when a task needs the original text back (entity words)

    def length(self, row: int) -> int:
        """What the row costs in a batch's token budget: its tokens."""
        return len(self.ids[row])


class TextEncoder:
    def __init__(
        self,
        tokenizer,
        column: str,
        max_length: int | None,
        prefix: str | None = None,
        prompt: str | None = None,
        chat_template: bool = False,
        offsets: bool = False,
        left_padding: bool = False,
        pad_multiple: int = 1,
    ):
        self.tokenizer = tokenizer
        self.column = column
        self.max_length = max_length
        self.prefix = prefix or ""
        self.prompt = prompt
        self.chat_template = chat_template
        self.offsets = offsets
        self.left_padding = left_padding  # decoder-only generation: every prompt ends where new tokens start
        self.pad_multiple = pad_multiple

    def texts(self, table: pa.Table) -> tuple[list[str | None], list[str | None]]:
        """The text each row feeds the model (prompt filled in, prefix added), or why it has none."""
        rows = table.to_pylist() if self.prompt else None
        values = table.column(self.column).to_pylist()
        texts, errors = [], []
        for position, value in enumerate(values):
            if value is None:
                texts.append(None)
                errors.append(f"input column {self.column!r} is null")
            elif not isinstance(value, str):
                texts.append(None)
                errors.append(f"input column {self.column!r} holds {type(value).__name__}, not text")
            else:
                text = self.prompt.format(**rows[position]) if self.prompt else value
                texts.append(self.prefix + text)
                errors.append(None)
        return texts, errors

    def __call__(self, table: pa.Table) -> Encoded:
        texts, errors = self.texts(table)
        valid = [index for index, text in enumerate(texts) if text is not None]
        inputs = [texts[index] for index in valid]
        if self.chat_template:
            inputs = [self._chat(text) for text in inputs]
        # one call for the whole part: the fast tokenizer batches in Rust
        encoding = self.tokenizer(
            inputs,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            add_special_tokens=not self.chat_template,  # the template already holds them
            return_offsets_mapping=self.offsets,
            return_attention_mask=False,
            return_token_type_ids=False,
        ) if inputs else {"input_ids": [], "offset_mapping": []}
        ids: list = [None] * len(texts)
        offsets: list | None = [None] * len(texts) if self.offsets else None
        for position, index in enumerate(valid):
            ids[index] = encoding["input_ids"][position]
            if offsets is not None:
                offsets[index] = encoding["offset_mapping"][position]
        return Encoded(ids, errors, offsets, texts if self.offsets else None)

    def collate(self, encoded: Encoded, rows: list[int]) -> dict[str, torch.Tensor]:
        """The padded tensors of a batch of the part's rows."""
        sequences = [encoded.ids[row] for row in rows]
        return pad(sequences, self.tokenizer.pad_token_id, left=self.left_padding, multiple=self.pad_multiple)

    def _chat(self, text: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )


def pad(sequences: list[list[int]], pad_id: int, left: bool = False, multiple: int = 1) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask for a batch; left padding for decoder-only generation."""
    width = padded_length(max(len(sequence) for sequence in sequences), multiple)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = sequence
        mask[row, span] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
