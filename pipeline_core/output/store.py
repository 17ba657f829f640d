"""The one narrow interface through which batchrun touches storage: whole named objects, written atomically.

Everything in a run directory (parts, _batchrun.json, _progress.json, _SUCCESS) goes through `put`, which writes
under a hidden temporary name and renames into place, so a reader or a killed run never sees half a file.
`stores.open_store` picks the store for output.path: LocalStore for a directory (or a file:// URL), FsspecStore
(fsspec_store.py) for s3://, gs://, az:// and other fsspec URLs, with the same nine methods and guarantees.

An OSError other than "not found" becomes a StorageError (exit 1) naming the store, the file and the system's
reason: a full disk or a read-only OUTPUT is a run-time failure a person fixes, not a crash. A failed write removes
its temporary, so nothing partial is left behind or ever visible under a real name.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid
from pathlib import Path
from typing import IO, Protocol

from pipeline_core.errors import BatchrunError, StorageError, UsageError


def temporary_name(name: str) -> str:
    """Hidden, and unique per writer: processes on other hosts, and this process's heartbeat thread, may write the
    same name. Host and pid tell a leftover of a dead writer from a live one's file in the middle of a write."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# What to fix after a failed write, by its errno; then a rerun resumes
WRITE_ADVICE = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
                errno.EROFS: "make it writable", errno.EACCES: "give this user write access",
                errno.EPERM: "give this user write access"}


class Store(Protocol):
    """What the rest of batchrun may ask of OUTPUT."""

    exclusive_create: bool  # create is atomic: claims keep several processes apart
    def put(self, name: str, data: bytes) -> None: ...  # whole, atomically, replacing
    def create(self, name: str, data: bytes) -> bool: ...  # whole, only if absent: False when it exists
    def get(self, name: str) -> bytes | None: ...
    def open(self, name: str) -> IO[bytes]: ...
    def exists(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...  # fresh: what other processes wrote a moment ago is listed
    def sizes(self) -> dict[str, int]: ...  # {name: bytes} of every file, from one listing (fresh too)
    def age(self, name: str) -> float: ...
    def remove(self, name: str) -> None: ...


class LocalStore:
    exclusive_create = True  # a hard link, or O_EXCL

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def put(self, name: str, data: bytes) -> None:
        self._make_root()
        temporary = self.root / temporary_name(name)
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, self.root / name)
            _fsync_directory(self.root)  # and the rename itself survives a power cut
        except OSError as error:
            _remove_quietly(temporary)
            raise self._failed(f"write {name} in {self.root}", error, writing=True) from error

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet; False if it does (the primitive behind claims). The file
        appears whole: written under a temporary name, then hard-linked to `name`, which fails if it exists."""
        self._make_root()
        temporary = self.root / temporary_name(name)
        try:
            with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as file:
                file.write(data)
            try:
                os.link(temporary, self.root / name)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: an exclusive create, written in place
                return self._create_in_place(name, data)
            return True
        except OSError as error:
            raise self._failed(f"write {name} in {self.root}", error, writing=True) from error
        finally:
            _remove_quietly(temporary)

    def _create_in_place(self, name: str, data: bytes) -> bool:
        target = self.root / name
        try:
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        except OSError:
            _remove_quietly(target)  # created exclusively, so ours: a partial file must not stay under the name
            raise
        return True

    def get(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._failed(f"read {name} in {self.root}", error) from error

    def open(self, name: str):
        """A readable binary file, for reading Parquet footers without reading whole parts."""
        try:
            return open(self.root / name, "rb")
        except FileNotFoundError:
            raise  # a part removed since the listing: the caller's to judge
        except OSError as error:
            raise self._failed(f"read {name} in {self.root}", error) from error

    def exists(self, name: str) -> bool:
        try:
            return (self.root / name).is_file()
        except OSError as error:
            raise self._failed(f"read {name} in {self.root}", error) from error

    def names(self) -> list[str]:
        try:
            return sorted(entry.name for entry in self.root.iterdir() if entry.is_file())
        except FileNotFoundError:
            return []  # not created yet
        except OSError as error:
            raise self._failed(f"list {self.root}", error) from error

    def sizes(self) -> dict[str, int]:
        try:
            with os.scandir(self.root) as entries:
                return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise self._failed(f"list {self.root}", error) from error

    def age(self, name: str) -> float:
        """Seconds since `name` was last written (0 when it is gone)."""
        try:
            return max(0.0, time.time() - (self.root / name).stat().st_mtime)
        except FileNotFoundError:
            return 0.0
        except OSError as error:
            raise self._failed(f"read {name} in {self.root}", error) from error

    def remove(self, name: str) -> None:
        try:
            (self.root / name).unlink(missing_ok=True)
        except OSError as error:
            raise self._failed(f"remove {name} from {self.root}", error, writing=True) from error

    def _make_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._failed(f"create the directory {self.root}", error, writing=True) from error

    def _failed(self, doing: str, error: OSError, writing: bool = False) -> BatchrunError:
        """One plain message for an OSError: what failed, the system's reason and, for a write, what to do."""
        if error.errno in (errno.ENOTDIR, errno.EEXIST) and (in_the_way := self._file_in_the_way()) is not None:
            inside = "" if in_the_way == self.root else f" is inside {in_the_way}, which"
            return UsageError(f"output.path {self.root}{inside} is a file, not a directory; "
                              "point output.path at a directory (batchrun creates it)")
        message = f"cannot {doing}: {os_reason(error)}"
        if writing:
            advice = WRITE_ADVICE.get(error.errno, "fix that")
            message += f"; committed parts are kept: {advice}, then rerun the same command to resume"
        return StorageError(message)

    def _file_in_the_way(self) -> Path | None:
        """The root, or the ancestor of it, that is a file where a directory should be; None if there is none."""
        for path in (self.root, *self.root.parents):
            if path.exists():
                return None if path.is_dir() else path
        return None


def os_reason(error: OSError) -> str:
    """The system's words and number: "No space left on device (errno 28)"."""
    return f"{error.strerror} (errno {error.errno})" if error.errno and error.strerror else str(error)


def _remove_quietly(path: Path) -> None:
    """A failed write's temporary: on a read-only filesystem it was never created, and an error here would only
    hide the one worth reporting."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
