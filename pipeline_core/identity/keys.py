"""A run's identity: the fingerprint of everything that changes output values, and what differs between two.

Batching sizes, worker counts, devices and shard counts are left out on purpose: a run started on 8 GPUs may
finish on one CPU, and its parts must still be reused. The model's and the input's provenance (provenance.py) join
it, so a model or input changed in place is caught; a run recorded before they did resumes without them.
"""

from __future__ import annotations

import hashlib
import json

from pipeline_core.manifest import Job

# How a changed field is named in a message.
FIELD_NAMES = {"sha256": "content", "samples": "content", "size": "size", "mtime_ns": "modified", "header": "tensors",
               "etag": "ETag", "mtime": "modified"}

# The provenance keys, and the word a message names each by. A run recorded before they joined the identity lacks
# them and is not compared on them: it resumes as it was.
PROVENANCE_KEYS = {"model.resolved": "model", "input.resolved": "input"}

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
    options = job.get("dataset.options")
    if options:  # how the files are parsed; absent when there are none, so runs recorded before it keep resuming
        values["dataset.options"] = options
    reference = job.get("evaluate.reference_column")
    if reference is not None:  # carried into the output; absent otherwise, so runs without it keep their fingerprint
        values["evaluate.reference_column"] = reference
    return values


def fingerprint(values: dict) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each identity key that changed; for the provenance, what changed in words (the files
    by name, the commit), and nothing where `old`, recorded by an older batchrun, has none."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in PROVENANCE_KEYS:
            changes += provenance_changes(PROVENANCE_KEYS[key], old.get(key), new.get(key))
        elif old.get(key) != new.get(key):
            changes.append(f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return changes


def provenance_changes(what: str, old: dict | None, new: dict | None) -> list[str]:
    """Readable changes between two provenances ('model files changed: config.json (content)', 'model commit
    abc -> def'); what either side does not know is not compared."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return []
    if old.get("kind") != new.get("kind"):
        return [f"{what}: {old.get('kind')} -> {new.get('kind')}"]
    changes = [f"{what} {field} {old[field]} -> {new[field]}" for field in ("commit", "fingerprint")
               if old.get(field) and new.get(field) and old[field] != new[field]]
    if isinstance(old.get("files"), dict) and isinstance(new.get("files"), dict):
        changed = changed_files(old["files"], new["files"])
        if changed:
            changes.append(f"{what} files changed: " + ", ".join(changed))
    return changes


def changed_files(old: dict, new: dict) -> list[str]:
    """'name (what changed)' for each file that differs, is new or is gone."""
    changed = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            changed.append(f"{name} (gone)")
        elif name not in old:
            changed.append(f"{name} (new)")
        elif set(old[name]) != set(new[name]):  # a small file grown into one known by size, or the reverse
            changed.append(f"{name} (content)")
        else:
            fields = [FIELD_NAMES.get(field, field) for field, value in old[name].items()
                      if value is not None and new[name][field] is not None and value != new[name][field]]
            if fields:
                changed.append(f"{name} ({', '.join(fields)})")
    return changed
