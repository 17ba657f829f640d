"""Where `dataset.path` points, as load_dataset or load_from_disk must be asked for it.

datasets.load_dataset takes a builder (json, csv, parquet, arrow, ...), a hub id or a local directory of data files.
Teams also keep evaluation sets as a `Dataset.save_to_disk` directory, which only `load_from_disk` opens, and as
single files (`data/eval.parquet`), which load_dataset takes for a hub id. Both are accepted here and turned into
what datasets can open, so the manifest stays one key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from datasets.packaged_modules import _EXTENSION_TO_MODULE

from pipeline_core.errors import UsageError
from pipeline_core.manifest import Job
from pipeline_core.remote import EXTRAS, protocol

SAVED_DATASET = "state.json"  # Dataset.save_to_disk writes it beside its Arrow files
SAVED_DATASET_DICT = "dataset_dict.json"  # DatasetDict.save_to_disk: one directory per split beside it
# Data files a single-file dataset.path may be: the text-table builders (images and audio need their folders)
FILE_BUILDERS = ("arrow", "csv", "json", "parquet", "text")


@dataclass(frozen=True)
class Source:
    """What the dataset is read from: a builder, hub id or directory for load_dataset with its data_files, or a
    save_to_disk directory for load_from_disk (`saved`)."""

    path: str
    data_files: object = None
    saved: bool = False


def dataset_source(job: Job, split: str | None) -> Source:
    """The job's dataset as datasets opens it. `split`: the split name the job reads (None for `train+test`)."""
    path, data_files = job.get("dataset.path"), job.get("dataset.data_files")
    if is_saved_dataset(path):
        _refuse_with_saved(job, path)
        return Source(path, saved=True)
    if protocol(path) in EXTRAS:
        raise UsageError(f"dataset.path={path!r}: object store URLs go in dataset.data_files; set dataset.path to "
                         "their builder (parquet, json, csv, ...) and dataset.data_files to the URL or pattern")
    if os.path.isfile(os.path.expanduser(path)):
        return Source(*_file_builder(job, path, split))
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):  # not for the hub, offline or not
        raise UsageError(f"dataset.path={path!r}: no such file or directory (from {os.getcwd()})")
    return Source(path, data_files)


def _looks_local(path: str) -> bool:
    """A path no hub id can be: hub ids are `name` or `org/name`, never relative, absolute or home paths."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def is_saved_dataset(path: str) -> bool:
    path = os.path.expanduser(path)
    return any(os.path.isfile(os.path.join(path, name)) for name in (SAVED_DATASET, SAVED_DATASET_DICT))


def saved_split_name(path: str) -> str | None:
    """The split a saved Dataset says it is (`_split` of its state.json), if it says."""
    with open(os.path.join(os.path.expanduser(path), SAVED_DATASET)) as file:
        return json.load(file).get("_split")


def _file_builder(job: Job, path: str, split: str | None) -> tuple[str, dict | list]:
    """A single data file: the builder its extension names, reading it as the job's split."""
    if job.get("dataset.data_files"):
        raise UsageError(f"dataset.path={path!r} is a file, so dataset.data_files cannot also be set; name the "
                         "files in dataset.data_files with dataset.path set to their builder (e.g. json)")
    extension = os.path.splitext(path)[1]
    builders = file_builders()
    if extension.lower() not in builders:
        raise UsageError(f"dataset.path={path!r}: batchrun reads a single file of type {', '.join(sorted(builders))}"
                         f", not {extension or 'one without an extension'}; for other files set dataset.path to "
                         "their builder and dataset.data_files to the file")
    return builders[extension.lower()], {split: [path]} if split else [path]


def file_builders() -> dict[str, str]:
    """extension -> builder for a single data file, from datasets' own table. A .tsv is not among them: datasets
    reads it with a `sep` of its own; name it in dataset.data_files with dataset.path: csv and dataset.options:
    {sep: "\\t"} instead."""
    return {extension: builder for extension, (builder, options) in _EXTENSION_TO_MODULE.items()
            if builder in FILE_BUILDERS and not options and extension.islower()}


def _refuse_with_saved(job: Job, path: str) -> None:
    """Keys that mean nothing for a save_to_disk directory, refused rather than silently ignored."""
    for key in ("dataset.data_files", "dataset.name", "dataset.revision"):
        if job.get(key):
            raise UsageError(f"{key} cannot be used with dataset.path={path!r}, a directory written by "
                             "save_to_disk (it holds its own files); remove the key")
    if job.get("dataset.options"):
        raise UsageError(f"dataset.options cannot be used with dataset.path={path!r}, a directory written by "
                         "save_to_disk: it is read as saved, with no builder to pass options to; remove the key")
