"""A run's identity: the fingerprint of everything that changes output values, and what differs between two.

Batching sizes, worker counts, devices and shard counts are left out on purpose: a run started on 8 GPUs may
finish on one CPU, and its parts must still be reused.
"""

from __future__ import annotations

import hashlib
import json

from pipeline_core.manifest import Job

IDENTITY_KEYS = (
    "task",
    "model.name",
    "model.revision",
    "model.dtype",
    "model.prompt",
    "model.chat_template",
    "model.generation",
    "model.pooling",
    "model.normalize",
    "batching.max_length",
    "dataset.path",
    "dataset.name",
    "dataset.data_files",
    "dataset.split",
    "dataset.revision",
    "dataset.input_column",
    "dataset.image_column",
    "dataset.keep_columns",
    "output.rows_per_part",
)


def identity(job: Job, limit: int | None, embedding: dict | None = None) -> dict:
    """`embedding`: feature-extraction's resolved settings (EmbeddingSettings.identity()), since a checkpoint can set
    them. Other tasks never read model.pooling / model.normalize: they keep the values older runs recorded."""
    values = {key: job.get(key) for key in IDENTITY_KEYS}
    values.update(embedding or {"model.pooling": "mean", "model.normalize": False})
    values["limit"] = limit
    return values


def fingerprint(values: dict) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each identity key that changed."""
    keys = sorted(set(old) | set(new))
    return [f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}" for key in keys
            if old.get(key) != new.get(key)]
