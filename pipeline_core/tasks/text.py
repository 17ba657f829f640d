"""Text preprocessing shared by the text tasks: rows -> prompts -> token ids -> padded batch tensors.

Runs in DataLoader workers, so it holds the tokenizer and settings but never the model. A row whose input is
not usable text (null, a number, a list, an object; a prompt field that is null or not text) gets a reason instead
of token ids; the run goes on without it. No value is coerced to text.

Truncation keeps the start of the input (as sentence-transformers and the pipelines do), except a prompted or
chat-templated input to a decoder-only model: there the template must survive whole (a prompt cut on its right loses
`Answer:` or the assistant turn, and the model continues the question instead of answering it), so only the row's
own text is shortened, keeping its start. Either way the truncated rows are counted.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline_core.data.batching import padded_length
from pipeline_core.data.values import column_values, prompt_field_error, text_error

# A decoder prompt over max_length is cut where its text's own tokenization estimates, then this many longer cuts
# are tried: tokens merge across the template's edges, so the count of a cut is known only by tokenizing it.
RECHECKED_CUTS = 4


@dataclass
class Encoded:
    """One part's rows after tokenization: ids per row (None for a failed row) and why rows failed."""

    ids: list[list[int] | None]
    errors: list[str | None]
    offsets: list[list[tuple[int, int]] | None] | None = None
    texts: list[str | None] | None = None  # kept when a task needs the original text back (entity words)
    truncated_rows: int = 0  # rows whose input was longer than max_length

    def length(self, row: int) -> int:
        """What the row costs in a batch's token budget: its tokens."""
        return len(self.ids[row])


@dataclass
class _Rows:
    """A table's inputs: the input column's values, the other prompt fields' values, and each row's full text (or
    why it has none)."""

    values: list
    fields: dict[str, list]
    texts: list[str | None]
    errors: list[str | None]


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
        keep_template: bool = False,
        sends_text: bool = False,
    ):
        self.tokenizer = tokenizer
        if tokenizer is not None:  # none: a server engine's model that exists only on the server (texts only)
            tokenizer.truncation_side = "right"  # the rule is to keep the input's start, whatever the checkpoint says
        self.column = column
        self.max_length = max_length
        self.prefix = prefix or ""
        self.prompt = prompt
        self.fields = prompt_fields(prompt) if prompt else []
        self.chat_template = chat_template
        self.offsets = offsets
        self.left_padding = left_padding  # decoder-only generation: every prompt ends where new tokens start
        self.pad_multiple = pad_multiple
        # a decoder-only model's prompt or chat template: shorten the row's text, never the template around it
        self.keep_template = keep_template and bool(prompt or chat_template) or sends_text
        # a server engine sends each row's text, not its ids: a long row's text is shortened (the same rule), and the
        # text sent, before any chat template, is kept in Encoded.texts
        self.sends_text = sends_text

    def texts(self, table: pa.Table) -> tuple[list[str | None], list[str | None]]:
        """The text each row feeds the model (prompt filled in, prefix added), or why it has none."""
        rows = self._rows(table)
        return rows.texts, rows.errors

    def _rows(self, table: pa.Table) -> _Rows:
        values = column_values(table, self.column)
        fields = {name: column_values(table, name) for name in self.fields if name != self.column}
        texts, errors = [], []
        for position, value in enumerate(values):
            error = text_error(self.column, value) or next(
                (found for name, column in fields.items() if (found := prompt_field_error(name, column[position]))),
                None)
            texts.append(None if error else self._fill(value, fields, position))
            errors.append(error)
        return _Rows(values, fields, texts, errors)

    def _fill(self, text: str, fields: dict[str, list], position: int) -> str:
        """The row's text inside the prompt (and after the prefix); `text` stands for the input column's value."""
        if not self.prompt:
            return self.prefix + text
        return self.prefix + self.prompt.format(**{name: column[position] for name, column in fields.items()},
                                                **{self.column: text})

    def __call__(self, table: pa.Table) -> Encoded:
        rows = self._rows(table)
        valid = [index for index, text in enumerate(rows.texts) if text is not None]
        inputs = [self.templated(rows.texts[index]) for index in valid]
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
        overflowed = self._overflowed(encoding, inputs)
        ids: list = [None] * len(rows.texts)
        offsets: list | None = [None] * len(rows.texts) if self.offsets else None
        for position, index in enumerate(valid):
            ids[index] = encoding["input_ids"][position]
            if offsets is not None:
                offsets[index] = encoding["offset_mapping"][position]
            if overflowed[position] and self.keep_template:
                ids[index], rows.texts[index], rows.errors[index] = self._shortened(rows, index)
        truncated = sum(overflowed[position] and rows.errors[index] is None for position, index in enumerate(valid))
        kept_texts = rows.texts if self.offsets or self.sends_text else None
        return Encoded(ids, rows.errors, offsets, kept_texts, truncated_rows=truncated)

    def collate(self, encoded: Encoded, rows: list[int]) -> dict[str, torch.Tensor]:
        """The padded tensors of a batch of the part's rows."""
        sequences = [encoded.ids[row] for row in rows]
        return pad(sequences, self.tokenizer.pad_token_id, left=self.left_padding, multiple=self.pad_multiple)

    def templated(self, text: str) -> str:
        if not self.chat_template:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def _ids(self, text: str) -> list[int]:
        """The whole input's token ids, untruncated, as the batched call makes them."""
        return self.tokenizer(self.templated(text), add_special_tokens=not self.chat_template,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def _overflowed(self, encoding, inputs: list[str]) -> list[bool]:
        """Which inputs the tokenizer cut at max_length: a fast tokenizer keeps what it cut off in each encoding's
        `overflowing`; a slow one is asked again, untruncated, for the inputs that came out exactly max_length."""
        if self.max_length is None or not inputs:
            return [False] * len(inputs)
        encodings = getattr(encoding, "encodings", None)
        if encodings is not None:
            return [bool(found.overflowing) for found in encodings]
        return [len(ids) == self.max_length and len(self.tokenizer(
            text, add_special_tokens=not self.chat_template)["input_ids"]) > self.max_length
            for text, ids in zip(inputs, encoding["input_ids"], strict=True)]

    def _shortened(self, rows: _Rows, index: int) -> tuple[list[int] | None, str | None, str | None]:
        """(ids, text, None) of a prompted decoder input over max_length: the longest start of the row's own text, cut
        at one of its token boundaries, with which the whole prompt fits (and that prompt's text, before any chat
        template); (None, None, why) when not even its first token fits beside the template and the other fields."""
        value, fields = rows.values[index], rows.fields
        if self.prompt is None or self.column in self.fields:
            ends = [end for _, end in self.tokenizer(value, add_special_tokens=False,
                                                     return_offsets_mapping=True)["offset_mapping"]]

            def text_with(keep: int) -> str:  # the whole input with the text's first `keep` tokens
                return self._fill(value[:ends[keep - 1]], fields, index)

            keep, ids = len(ends), self._ids(self._fill(value, fields, index))
            while len(ids) > self.max_length and keep > 0:
                keep -= len(ids) - self.max_length  # as many of the text's tokens as the input is over
                ids = self._ids(text_with(keep)) if keep > 0 else ids
            if keep > 0:
                # inside the template the text's tokens need not be its own (a space merges with its first word), so
                # the estimate may cut a few too many: the longest of the next few cuts that fits wins
                for longer in range(min(len(ends), keep + RECHECKED_CUTS), keep, -1):
                    if len(candidate := self._ids(text_with(longer))) <= self.max_length:
                        return candidate, text_with(longer), None
                return ids, text_with(keep), None
        bare = len(self._ids(self._fill("", fields, index)))
        return None, None, (f"the prompt takes {bare} tokens without the text of input column {self.column!r}, "
                            f"leaving no room for it within max_length {self.max_length}")


def prompt_fields(prompt: str) -> list[str]:
    """The columns a model.prompt names, in order, once each."""
    return list(dict.fromkeys(field for _, field, _, _ in string.Formatter().parse(prompt) if field))


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
