"""The job manifest: one table of keys (spec), reading (load), checking and defaults (validate), JSON Schema.

`load_job` is the one entry point the rest of batchrun uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline_core.errors import ManifestError
from pipeline_core.manifest.load import apply_overrides, interpolate, read_yaml
from pipeline_core.manifest.spec import SECTIONS
from pipeline_core.manifest.validate import check_job, fill_defaults


@dataclass(frozen=True)
class Job:
    source: Path  # the manifest file, for messages
    config: dict  # every key present, defaults filled, environment substituted

    def get(self, path: str):
        """A value by dotted path: job.get("batching.max_tokens")."""
        node = self.config
        for part in path.split("."):
            node = node[part]
        return node


def load_job(path: str | os.PathLike, overrides: list[str] = (), environ: dict | None = None) -> Job:
    """Read, override, interpolate and validate a manifest; raises ManifestError with every problem."""
    source = Path(path)
    document, problems = read_yaml(source)
    if problems:
        raise ManifestError(str(source), problems)
    if isinstance(document, dict):
        problems += apply_overrides(document, list(overrides))
        document, found = interpolate(document, dict(os.environ if environ is None else environ))
        problems += found
        for section in SECTIONS:  # `batching:` with nothing under it reads as null
            if section in document and document[section] is None:
                document[section] = {}
    problems += check_job(document)
    if problems:
        raise ManifestError(str(source), problems)
    return Job(source, fill_defaults(document, source.stem))
