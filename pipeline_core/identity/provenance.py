"""What a run's model and input are beyond their names: a hub model's commit or a digest of a local model's files,
the input's files (size, modification time; ETag for remote files) or datasets' fingerprint. Both join the run's
identity, so a model or input changed in place under a run is caught, and named, before any weights load.

Cheap by design: a weights file is known by its size, its safetensors header and 64 blocks of 4 KiB spread evenly
over it (256 KiB read per file, whatever its size), never by hashing all its bytes. Retraining changes every block;
a copy (a node-local copy of a shared model) changes none, so its modification time is deliberately not part of it.
An edit confined to the bytes between the blocks is not noticed. Whatever cannot be
told (a hub commit the cache does not know, a remote file that cannot be looked at) is None, and None is never
compared: it must not fail a run nor its resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

from datasets.data_files import sanitize_patterns
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from pipeline_core.data.files import resolve_data_files
from pipeline_core.manifest import Job
from pipeline_core.remote import options_for, require_backend

# Files up to this size are hashed whole: configs, tokenizers (a large vocabulary's tokenizer.json is ~30 MB).
SMALL_FILE = 64 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
# Documentation never changes outputs: editing a model card must not stop a resume.
IGNORED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf")
MAX_HEADER = 100 * 2**20  # a safetensors header claiming more is not one
SAMPLES, SAMPLE_BYTES = 64, 4096  # the blocks of a weights file hashed: 256 KiB read of any size
COMMIT = re.compile(r"[0-9a-f]{40}")


def model_provenance(job: Job) -> dict:
    """A local directory's file digest, else the commit a hub id's revision resolves to in the local cache."""
    name = job.get("model.name")
    if os.path.isdir(name):
        files = {relative: file_summary(path) for relative, path in listed_files(name)}
        return {"kind": "local", "digest": digest(files), "files": files}
    return {"kind": "hub", "commit": cached_commit(name, job.get("model.revision"), "model")}


def input_provenance(job: Job, split: str | None) -> dict | None:
    """The input's identity beyond its name; None where there is nothing to tell (a builder without data files)."""
    path = job.get("dataset.path")
    files = resolve_data_files(job, split)  # exits 2 naming a pattern that matches no file
    if files is not None:
        return {"kind": "files", "files": local_files(files)}
    remote = remote_patterns(job, split)
    if remote:
        for pattern in remote:
            require_backend(pattern, "dataset.data_files")  # exit 2 naming the extra, not an unknown input
        return {"kind": "remote", "files": remote_files(remote, job.get("dataset.storage_options"))}
    if os.path.isdir(path):
        # an image job's directory of data files is its images: they are not documentation there
        ignored = (".md",) if job.get("task") == "image-classification" else IGNORED_SUFFIXES
        return saved_dataset(path, split) or {"kind": "files", "files": local_files(
            [os.path.join(path, relative) for relative, _ in listed_files(path, ignored)])}
    if os.path.isfile(path):  # an .arrow file
        return {"kind": "files", "files": local_files([path])}
    if path in _PACKAGED_DATASETS_MODULES:
        return None
    return {"kind": "hub", "commit": cached_commit(path, job.get("dataset.revision"), "dataset")}


def listed_files(directory: str, ignored: tuple[str, ...] = IGNORED_SUFFIXES) -> list[tuple[str, str]]:
    """(relative name, path) of a directory's files, subfolders included (2_Dense/), hidden ones and docs left out."""
    found = []
    for root, folders, names in os.walk(directory):
        folders[:] = sorted(folder for folder in folders if not folder.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and not name.lower().endswith(ignored):
                path = os.path.join(root, name)
                found.append((os.path.relpath(path, directory).replace(os.sep, "/"), path))
    return found


def file_summary(path: str) -> dict:
    """A small file's content hash; a weights (or large) file's size, sampled blocks and safetensors header."""
    size = os.stat(path).st_size
    if not (path.endswith(WEIGHT_SUFFIXES) or size > SMALL_FILE):
        return {"sha256": content_digest(path)}
    summary = {"size": size, "samples": sampled_digest(path, size)}
    if path.endswith(".safetensors"):
        summary["header"] = safetensors_header(path)
    return summary


def sampled_digest(path: str, size: int) -> str:
    """The digest of SAMPLES blocks spread evenly from the file's start to its end (the whole of a small file)."""
    sha = hashlib.sha256()
    step = max(size - SAMPLE_BYTES, 0) / (SAMPLES - 1)
    with open(path, "rb") as handle:
        for position in sorted({int(block * step) for block in range(SAMPLES)}):
            handle.seek(position)
            sha.update(handle.read(SAMPLE_BYTES))
    return _short(sha.hexdigest())


def content_digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            sha.update(block)
    return _short(sha.hexdigest())


def safetensors_header(path: str) -> str | None:
    """The digest of a safetensors file's JSON header (tensor names, dtypes, shapes, offsets): 8 bytes giving its
    length, then the header; the tensor bytes after it are never read. None for a file that is not one."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        header = handle.read(length) if length <= MAX_HEADER else b""
    return _short(hashlib.sha256(header).hexdigest()) if header and len(header) == length else None


def cached_commit(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    """The commit a revision resolves to, from the Hugging Face cache's refs (offline-safe; no request is made);
    None when the cache cannot tell (never downloaded, or an id that is not a repository's)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    revision = revision or "main"
    if COMMIT.fullmatch(revision):
        return revision
    try:
        ref = Path(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=repo_type), "refs", revision)
        return ref.read_text().strip() or None
    except (OSError, ValueError):
        return None


def local_files(paths: list[str]) -> dict:
    """Each file's size and modification time (a file gone since it was listed: datasets reports it)."""
    found = {}
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        found[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return found


def remote_patterns(job: Job, split: str | None) -> list[str]:
    data_files = job.get("dataset.data_files")
    patterns = sanitize_patterns(data_files).get(split) if data_files else None
    return [pattern for pattern in patterns or [] if "://" in pattern and not pattern.startswith("zip://")]


def remote_files(patterns: list[str], storage_options: dict | None = None) -> dict | None:
    """Each remote file's ETag, size and modification time as fsspec reports them; None when any lookup fails
    (best effort: the data reader reports what is wrong with a remote file)."""
    import fsspec

    found = {}
    try:
        for pattern in patterns:
            # a fresh instance: a cached one may answer from a listing made before the files changed
            fs, path = fsspec.core.url_to_fs(pattern, **options_for(pattern, storage_options), skip_instance_cache=True)
            infos = fs.glob(path, detail=True) if re.search(r"[*?\[]", path) else {path: fs.info(path)}
            for name, info in sorted(infos.items()):
                found[fs.unstrip_protocol(name)] = remote_summary(info)
    except Exception:  # noqa: BLE001 - any failure of any filesystem leaves the input unknown, never the run failed
        return None
    return found


def remote_summary(info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("LastModified") or info.get("last_modified") or info.get("mtime")
    return {"etag": etag.strip('"') if isinstance(etag, str) else None, "size": info.get("size"),
            "mtime": str(mtime) if mtime is not None else None}


def saved_dataset(directory: str, split: str | None) -> dict | None:
    """datasets' own fingerprint of a save_to_disk directory (a Dataset, or the split of a DatasetDict)."""
    for state in (Path(directory, split or "", "state.json"), Path(directory, "state.json")):
        if state.is_file():
            try:
                return {"kind": "saved", "fingerprint": json.loads(state.read_text()).get("_fingerprint")}
            except (OSError, ValueError, AttributeError):
                return None
    return None


def digest(files: dict) -> str:
    return _short(hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest())


def _short(hexdigest: str) -> str:
    return hexdigest[:16]
