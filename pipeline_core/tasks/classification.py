"""text-classification: one label and its score per row.

Softmax over the labels; a single-logit model or one configured for multi-label classification uses a sigmoid,
as the transformers pipeline does. Computed on whole batches, not row by row. image-classification decodes its
logits with the same functions.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from pipeline_core.tasks.text import Encoded, TextEncoder


class TextClassificationTask:
    columns = {"label": pa.string(), "score": pa.float32()}
    slice_rows = None  # the loader's default: a text row is a few tokens

    def __init__(self, encoder: TextEncoder, model_config):
        self.encoder = encoder
        self.encode, self.collate = encoder, encoder.collate  # preprocessing, run in the workers
        self.labels, self.sigmoid = class_labels(model_config)

    def forward(self, model, inputs: dict):
        return model(**inputs).logits

    def decode(self, logits, inputs: dict, encoded: Encoded, rows: list[int]) -> dict[str, list]:
        return best_labels(logits, self.labels, self.sigmoid)


def class_labels(model_config) -> tuple[list[str], bool]:
    """The label names in logit order, and whether scores are sigmoids (one logit, or multi-label) or a softmax."""
    labels = [model_config.id2label[index] for index in range(model_config.num_labels)]
    return labels, model_config.num_labels == 1 or model_config.problem_type == "multi_label_classification"


def best_labels(logits, labels: list[str], sigmoid: bool) -> dict[str, list]:
    """Each row's most likely label and its score."""
    logits = logits.float()
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
    best, index = scores.max(dim=-1)
    return {"label": [labels[i] for i in index.tolist()], "score": best.cpu().numpy()}
