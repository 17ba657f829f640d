"""OUTPUT on an object store or another fsspec filesystem: LocalStore's nine methods and guarantees over a URL.

On S3, GCS and Azure Blob a part is one whole-object upload, which the service makes visible only once complete:
no temporary and rename (a rename there is a copy and a delete, and not atomic). `create`, the primitive behind
claims, `_batchrun.json` and `_SUCCESS`, is a conditional upload that fails when the name exists (S3
`If-None-Match: *`, GCS `ifGenerationMatch=0`, Azure `If-None-Match: *`), so exactly one of two writers wins.
Other fsspec filesystems get a hidden temporary and a move, and a `create` that checks and then writes: it is not
exclusive, so only one process at a time may write such an OUTPUT (the run warns).

Listings are never cached (another process's parts must be seen at once), and a dead or hanging server fails a call
within about a minute (bounded timeouts and retries) rather than hanging the run. Failures follow LocalStore's
policy: a write that fails is a StorageError (exit 1) naming the URL and the reason; missing credentials or a
missing bucket is a UsageError (exit 2).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import time

from pipeline_core import remote
from pipeline_core.errors import BatchrunError, StorageError, UsageError
from pipeline_core.output.store import temporary_name

# Filesystems whose whole-object upload is atomic and which have a conditional (exclusive) create.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
# S3: each call gives up after about a minute on a server that accepts and never answers (15 s read timeout, 2
# attempts in botocore, each retried once more by s3fs), and at once where nothing listens. The user's
# output.storage_options config_kwargs win over these.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 2, "mode": "standard"}}
S3FS_RETRIES = 2
# An upload's own deadline: a PUT to a server that accepts and never answers hung past 300 s in s3fs (the read timeout
# above ended GETs, not PUTs), so a write gives up after this, plus a second per MB (a slow link's large part).
WRITE_DEADLINE = 60.0
CONFLICT_RETRIES = 5  # S3 answers 409 to a conditional write racing another one: ask again, then one has won

# The error codes that mean "this job is set up wrong here", not "the store failed for now". Exit 2: a scheduler's
# retry of the same command fails the same way until a person sets the credentials or fixes the URL.
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                  "CredentialRetrievalError", "DefaultCredentialsError", "ClientAuthenticationError"}
NO_BUCKET = {"NoSuchBucket", "ContainerNotFound"}
CREDENTIALS_ADVICE = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or key and secret in {key}",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or token in {key}",
    "az": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY), "
          "or account_name and account_key in {key}",
}


class FsspecStore:
    def __init__(self, url: str, options: dict | None = None, key: str = "output.path"):
        self.url = url.rstrip("/")
        self.options = dict(options or {})
        self.key = key  # the manifest key that named the URL, for messages
        self.protocol = remote.protocol(url)
        self.object_store = self.protocol in OBJECT_STORES
        self.exclusive_create = self.object_store  # elsewhere create checks, then writes
        self._fs, self._pid, self.root = None, None, None
        remote.require_backend(url, key)  # a missing package or a bad URL fails here, before any work
        self.fs  # noqa: B018

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict:
        """Pickled (DataLoader workers claim parts) as its URL and options: each process builds its own client."""
        return {"url": self.url, "options": self.options, "key": self.key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["options"], state["key"])

    @property
    def fs(self):
        """The filesystem, built in each process: an async client (s3fs, gcsfs) must not cross a fork."""
        if self._pid != os.getpid():
            self._fs, self.root = remote.filesystem(self.url, self._filesystem_options(), self.key)
            self.root = self.root.rstrip("/")
            if self.protocol in ("s3", "s3a"):
                self._fs.retries = S3FS_RETRIES
            self._pid = os.getpid()
        return self._fs

    def _filesystem_options(self) -> dict:
        # a fresh instance (fsspec's cache would share one across stores) that never caches listings
        options = {**self.options, "skip_instance_cache": True}
        if self.object_store:
            options["use_listings_cache"] = False
        if self.protocol in ("s3", "s3a"):
            options["config_kwargs"] = {**S3_CONFIG, **(self.options.get("config_kwargs") or {})}
        return options

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def put(self, name: str, data: bytes) -> None:
        if self.object_store:  # one upload, visible only once complete
            self._calling(f"write {name} in {self}", lambda: self._upload(self._path(name), data), writing=True)
            return
        self._make_root()
        temporary = self._path(temporary_name(name))
        try:
            self._upload(temporary, data)
            self.fs.mv(temporary, self._path(name))
        except Exception as error:  # noqa: BLE001 - any failure of the filesystem, put in words below
            self._remove_quietly(temporary)
            raise self._failed(f"write {name} in {self}", error, writing=True) from error

    def create(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet; False if it does."""
        path = self._path(name)
        if not self.object_store:  # no exclusive create here: check, then write (one writer at a time)
            if self.exists(name):
                return False
            self.put(name, data)
            return True
        for _ in range(CONFLICT_RETRIES):
            try:
                self._exclusive_upload(path, data)
                return True
            except FileExistsError:
                return False
            except Exception as error:  # noqa: BLE001
                if _is_existing(error):
                    return False
                if _code(error) != "ConditionalRequestConflict":
                    raise self._failed(f"write {name} in {self}", error, writing=True) from error
            time.sleep(0.2)
        raise StorageError(f"cannot write {name} in {self}: conditional writes kept conflicting; "
                           "rerun the same command to resume")

    def _exclusive_upload(self, path: str, data: bytes) -> None:
        if self.protocol in ("az", "abfs", "abfss"):
            self._upload(path, data, overwrite=False)  # adlfs: upload_blob(overwrite=False), If-None-Match: *
        else:
            self._upload(path, data, mode="create")  # s3fs: IfNoneMatch="*"; gcsfs: ifGenerationMatch=0

    def _upload(self, path: str, data: bytes, **options) -> None:
        if getattr(self.fs, "async_impl", False):  # fsspec's sync() cancels the upload at its deadline
            options["timeout"] = WRITE_DEADLINE + len(data) / 2**20
        self.fs.pipe_file(path, data, **options)

    def get(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"read {name} in {self}", error) from error

    def open(self, name: str):
        """A readable binary file. Its reads that fail raise StorageError, not OSError: a footer that cannot be
        fetched for now must fail the run, not pass for a damaged part (which would be removed and recomputed)."""
        try:
            return _Reading(self.fs.open(self._path(name), "rb"), self, name)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"read {name} in {self}", error) from error

    def exists(self, name: str) -> bool:
        try:
            return self.fs.info(self._path(name))["type"] == "file"
        except FileNotFoundError:
            return False
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"read {name} in {self}", error) from error

    def names(self) -> list[str]:
        return sorted(self.sizes())

    def sizes(self) -> dict[str, int]:
        try:
            self.fs.invalidate_cache(self.root)  # whatever a backend keeps, a listing here is always fresh
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}  # nothing written yet (a missing bucket is named by the first write)
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"list {self}", error) from error
        files = ((posixpath.basename(entry["name"].rstrip("/")), entry.get("size")) for entry in entries
                 if entry.get("type") == "file")
        return {name: size for name, size in files if name}

    def age(self, name: str) -> float:
        """Seconds since `name` was last written (0 when it is gone), from the store's LastModified."""
        try:
            modified = self.fs.modified(self._path(name))
        except FileNotFoundError:
            return 0.0
        except NotImplementedError:
            return 0.0  # a filesystem that cannot tell: never stale by age
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"read {name} in {self}", error) from error
        return max(0.0, time.time() - modified.timestamp())

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"remove {name} from {self}", error, writing=True) from error

    def _make_root(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except Exception as error:  # noqa: BLE001
            raise self._failed(f"create the directory {self}", error, writing=True) from error

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except Exception:  # noqa: BLE001 - the error worth reporting is the write's
            pass

    def _calling(self, doing: str, call, writing: bool = False):
        try:
            return call()
        except Exception as error:  # noqa: BLE001
            raise self._failed(doing, error, writing) from error

    def _failed(self, doing: str, error: BaseException, writing: bool = False) -> BatchrunError:
        """One plain line: what failed, where, and why. Missing credentials and a missing bucket are the job's to
        fix (exit 2); anything else (a server gone, a refused write, a timeout) is a run-time failure (exit 1)."""
        if isinstance(error, BatchrunError):
            return error
        code, reason = _code(error), _reason(error)
        if code in NO_CREDENTIALS:
            advice = CREDENTIALS_ADVICE.get(_family(self.protocol), "give the filesystem credentials in {key}")
            return UsageError(f"cannot {doing}: no usable credentials ({reason}); "
                              + advice.format(key=self.key.replace(".path", ".storage_options")))
        if code in NO_BUCKET:
            bucket = self.root.split("/", 1)[0] if self.root else self.url
            return UsageError(f"cannot {doing}: the bucket {bucket} does not exist ({reason}); create it, or fix "
                              f"{self.key}")
        message = f"cannot {doing}: {reason}"
        if writing:
            advice = ("give these credentials write access" if isinstance(error, PermissionError)
                      else "check that the store is reachable")
            message += f"; committed parts are kept: {advice}, then rerun the same command to resume"
        return StorageError(message)


class _Reading:
    """A remote file whose failed reads are StorageErrors (see FsspecStore.open)."""

    def __init__(self, file, store: FsspecStore, name: str):
        self._file, self._store, self._name = file, store, name

    def read(self, *args):
        try:
            return self._file.read(*args)
        except Exception as error:  # noqa: BLE001
            raise self._store._failed(f"read {self._name} in {self._store}", error) from error

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()
        return False


def _chain(error: BaseException):
    """The error and its causes: s3fs raises its OSError from botocore's error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def _code(error: BaseException) -> str | None:
    """The service's error code in the chain (S3 "NoSuchBucket", Azure "ContainerNotFound"), or the class name of a
    credentials error (botocore's NoCredentialsError has no code)."""
    for link in _chain(error):
        response = getattr(link, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return response["Error"]["Code"]
        if type(link).__name__ in NO_CREDENTIALS:
            return type(link).__name__
        if getattr(link, "error_code", None):  # azure.core's HttpResponseError
            return str(link.error_code)
    return None


def _is_existing(error: BaseException) -> bool:
    """A conditional create refused because the name exists: s3fs's FileExistsError, a 412 from a service that
    names no condition, Azure's ResourceExistsError or BlobAlreadyExists."""
    for link in _chain(error):
        if isinstance(link, FileExistsError) or type(link).__name__ == "ResourceExistsError":
            return True
        if _code(link) in ("PreconditionFailed", "BlobAlreadyExists", "412"):
            return True
    return False


def _reason(error: BaseException) -> str:
    """The service's words on one line, without the exception's class where it says nothing more."""
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)) or type(error).__name__ == "FSTimeoutError":
        return "the store did not answer in time"
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _family(protocol: str) -> str:
    return {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}.get(protocol, protocol)
