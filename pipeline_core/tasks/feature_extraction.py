"""feature-extraction: one vector per row, pooled under the attention mask, optionally L2-normalised.

`mean` averages the real tokens (padding excluded), `cls` takes the first token, `none` keeps every real token's
vector. Vectors leave as one float32 array per batch and become Arrow lists through offsets, never per element.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline_core.tasks.text import Encoded, TextEncoder


class FeatureExtractionTask:
    def __init__(self, encoder: TextEncoder, pooling: str, normalize: bool):
        self.encoder = encoder
        self.encode, self.collate = encoder, encoder.collate  # preprocessing, run in the workers
        self.pooling = pooling
        self.normalize = normalize
        vector = pa.list_(pa.float32())
        self.columns = {"embedding": pa.list_(vector) if pooling == "none" else vector}

    def forward(self, model, inputs: dict):
        return model(**inputs).last_hidden_state

    def decode(self, hidden, inputs: dict, encoded: Encoded, rows: list[int]) -> dict[str, list]:
        mask = inputs["attention_mask"].to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        hidden = hidden.float()
        if self.pooling == "mean":
            vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        elif self.pooling == "cls":
            vectors = hidden[:, 0]
        else:
            vectors = hidden
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        vectors = vectors.cpu().numpy().astype(np.float32, copy=False)
        if self.pooling != "none":
            return {"embedding": fixed_lists(vectors)}
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return {"embedding": token_lists(vectors, lengths)}


def fixed_lists(matrix: np.ndarray) -> pa.Array:
    """A (rows, dim) float32 matrix as an Arrow list<float32> array, without touching single elements."""
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def token_lists(tensor: np.ndarray, lengths: list[int]) -> pa.Array:
    """Per row, the vectors of its real tokens (right padding puts them first) as list<list<float32>>."""
    rows = [fixed_lists(tensor[row, :length]) for row, length in enumerate(lengths)]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.concat_arrays(rows) if rows else pa.array([], pa.list_(pa.float32())))
