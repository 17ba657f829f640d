"""Which store an OUTPUT path opens: a local directory, or an object store (or another fsspec filesystem) by URL.

Kept apart from the stores themselves, which know nothing of each other.
"""

from __future__ import annotations

from pipeline_core import remote
from pipeline_core.output.store import LocalStore, Store


def open_store(path: str, storage_options: dict | None = None, key: str = "output.path") -> Store:
    """The store of OUTPUT `path`: a local directory, or an fsspec URL with its filesystem's options (output.storage_
    options; for s3:// credentials and endpoint also come from the usual AWS_* environment)."""
    if not remote.is_remote(path):
        return LocalStore(path.removeprefix("file://"))
    from pipeline_core.output.fsspec_store import FsspecStore  # deferred: imports fsspec

    return FsspecStore(path, remote.options_for(path, storage_options), key)
