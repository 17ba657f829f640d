"""A job's identity, as a run directory records it: its keys, the model's and the input's provenance, and, for
feature-extraction, the embedding settings as the checkpoint resolves them.
"""

from __future__ import annotations

from pipeline_core.data.source import split_name
from pipeline_core.identity.keys import identity
from pipeline_core.identity.provenance import input_provenance, model_provenance
from pipeline_core.initializer.embedding import EmbeddingSettings, resolve_embedding
from pipeline_core.manifest import Job


def job_identity(job: Job, limit: int | None) -> tuple[dict, EmbeddingSettings | None]:
    """The run's identity, and feature-extraction's settings it was computed from: they may come from the checkpoint,
    so they are resolved (from its JSON files, before any weights load), recorded as what they resolved to, and
    handed to the initializer, so that the model runs with the very settings the fingerprint names. The model's and
    the input's provenance join it (file metadata, no weights read), so a change in place is caught on resume."""
    embedding = resolve_embedding(job) if job.get("task") == "feature-extraction" else None
    values = identity(job, limit, embedding.identity() if embedding else None)
    values["model.resolved"] = model_provenance(job)
    values["input.resolved"] = input_provenance(job, split_name(job.get("dataset.split")))
    return values, embedding
