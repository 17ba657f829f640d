"""feature-extraction: one vector per row, pooled under the attention mask, as sentence-transformers computes it.

The settings come resolved (initializer/embedding.py): the pooling modes (concatenated when there are several),
the checkpoint's Dense layers, and L2 normalisation. `model.pooling: none` keeps every real token's vector.
Vectors leave as one float32 array per batch and become Arrow lists through offsets, never per element.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline_core.initializer.embedding import EmbeddingSettings
from pipeline_core.tasks.text import Encoded, TextEncoder


class FeatureExtractionTask:
    slice_rows = None  # the loader's default: a text row is a few tokens

    def __init__(self, encoder: TextEncoder, settings: EmbeddingSettings, dense=(), prompt_length: int = 0):
        self.encode, self.collate = encoder, encoder.collate  # preprocessing, run in the workers
        self.pooling = settings.pooling
        self.normalize = settings.normalize
        self.dense = list(dense)
        # sentence-transformers leaves the prompt's tokens (and the first special token) out of pooling on request
        self.excluded = 0 if settings.include_prompt else prompt_length
        vector = pa.list_(pa.float32())
        self.columns = {"embedding": pa.list_(vector) if self.pooling is None else vector}

    def forward(self, model, inputs: dict):
        return model(**inputs).last_hidden_state

    def decode(self, hidden, inputs: dict, encoded: Encoded, rows: list[int]) -> dict[str, list]:
        mask = inputs["attention_mask"].to(hidden.device)
        hidden = hidden.float()
        if self.pooling is None:
            vectors = hidden
        else:
            pooled = mask.clone()
            pooled[:, :self.excluded] = 0  # right padding: every row's prompt starts at position 0
            vectors = torch.cat([pool(hidden, pooled, mode) for mode in self.pooling], dim=-1)
            for layer in self.dense:
                vectors = layer(vectors)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        vectors = vectors.cpu().numpy().astype(np.float32, copy=False)
        if self.pooling is not None:
            return {"embedding": fixed_lists(vectors)}
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return {"embedding": token_lists(vectors, lengths)}


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens a prompt takes at the start of every input, as sentence-transformers counts them: with the leading
    special token, without a trailing one."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row from its token vectors (rows, tokens, dim) where mask is 1, by sentence-transformers'
    definition of each mode."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "cls":  # the first token pooling may see
        return hidden[rows, mask.to(torch.int32).argmax(dim=1)]
    if mode == "lasttoken":
        last = hidden.shape[1] - 1 - mask.flip(1).to(torch.int32).argmax(dim=1)
        return (hidden * weights)[rows, last]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":  # later tokens weigh more: position 1, 2, 3, ...
        weights = weights * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[:, None]
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)


def fixed_lists(matrix: np.ndarray) -> pa.Array:
    """A (rows, dim) float32 matrix as an Arrow list<float32> array, without touching single elements."""
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def token_lists(tensor: np.ndarray, lengths: list[int]) -> pa.Array:
    """Per row, the vectors of its real tokens (right padding puts them first) as list<list<float32>>."""
    rows = [fixed_lists(tensor[row, :length]) for row, length in enumerate(lengths)]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.concat_arrays(rows))  # a batch has at least one row
