"""The one narrow interface through which batchrun touches storage: whole named objects, written atomically.

Everything in a run directory (parts, _batchrun.json, _progress.json, _SUCCESS) goes through `put`, which writes
under a hidden temporary name and renames into place, so a reader or a killed run never sees half a file.
Local directories today; an fsspec store (s3://, gs://) implements the same eight methods.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path


def temporary_name(name: str) -> str:
    """Hidden, and unique per writer: processes on other hosts, and this process's heartbeat thread, may write the
    same name. Host and pid tell a leftover of a dead writer from a live one's file in the middle of a write."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def put(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / temporary_name(name)
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, self.root / name)
        _fsync_directory(self.root)  # and the rename itself survives a power cut

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet; False if it does (the primitive behind claims). The file
        appears whole: written under a temporary name, then hard-linked to `name`, which fails if it exists."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / temporary_name(name)
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as file:
            file.write(data)
        try:
            os.link(temporary, self.root / name)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create, written in place
            return self._create_in_place(name, data)
        finally:
            temporary.unlink(missing_ok=True)
        return True

    def _create_in_place(self, name: str, data: bytes) -> bool:
        try:
            descriptor = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        return True

    def get(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def open(self, name: str):
        """A readable binary file, for reading Parquet footers without reading whole parts."""
        return open(self.root / name, "rb")

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if entry.is_file())

    def age(self, name: str) -> float:
        """Seconds since `name` was last written (0 when it is gone)."""
        try:
            return max(0.0, time.time() - (self.root / name).stat().st_mtime)
        except FileNotFoundError:
            return 0.0

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
