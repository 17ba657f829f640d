"""A job's local data files, looked at before datasets reads them: what each pattern matches, which files hold no
rows, and which file is broken when reading fails.

A nightly partition may be empty, or missing. datasets fails on both without saying so (an internal StopIteration
for an empty JSON lines file or a glob that matches nothing; a pandas or Arrow error for an empty CSV or Parquet
file), and its read errors do not name the file. Patterns are resolved with datasets' own code, in its order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets.data_files import resolve_pattern, sanitize_patterns
from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

from pipeline_core.data.layouts import dataset_source
from pipeline_core.errors import UsageError
from pipeline_core.manifest import Job

_GLOB = re.compile(r"[*?\[]")
ASCII_BLANKS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: a line of other characters holds a value


@dataclass(frozen=True)
class DataFiles:
    """The split's files in datasets' order, and those among them that hold no rows."""

    files: list[str]
    empty: list[str]

    @property
    def with_rows(self) -> list[str]:
        empty = set(self.empty)  # a partition may hold thousands of files
        return [file for file in self.files if file not in empty]


def split_data_files(job: Job, split: str | None) -> DataFiles | None:
    """The split's local data files for a builder (json, csv, parquet, ...), each pattern checked, and which hold
    no rows; None where datasets resolves the files itself (a hub dataset or local directory, remote URLs)."""
    files = resolve_data_files(job, split)
    if files is None:
        return None
    builder, options = dataset_source(job, split).path, job.get("dataset.options")
    return DataFiles(files, [file for file in files if holds_no_rows(builder, file, options)])


def resolve_data_files(job: Job, split: str | None) -> list[str] | None:
    """The files the split's data_files patterns match; exit 2 naming a pattern that matches none. Cheap (no file
    is opened), so the runner checks it before any model loads."""
    source = dataset_source(job, split)  # a single file as dataset.path is its builder's one data file
    builder, data_files = source.path, source.data_files
    if not data_files or builder not in _PACKAGED_DATASETS_MODULES:
        return None
    patterns = sanitize_patterns(data_files).get(split)  # none for several splits (train+test) or an unknown one
    if not patterns or any("://" in pattern for pattern in patterns):
        return None  # datasets names an unknown split; remote files and archives (zip://...) are its to open
    return [file for pattern in patterns for file in _matches(pattern)]


def _matches(pattern: str) -> list[str]:
    """The files one pattern matches, relative to the working directory as load_dataset resolves them."""
    base = Path().resolve().as_posix()
    try:
        found = resolve_pattern(pattern, base_path=base)
    except FileNotFoundError:
        found = []
    if not found:
        where = _searched(os.path.join(base, os.path.expanduser(pattern)))
        state = "" if os.path.isdir(where) else ", which does not exist"
        what = "matches no file" if _GLOB.search(pattern) else "is not a file"
        raise UsageError(f"dataset.data_files: {pattern!r} {what} (looked in {where}{state})")
    return found


def _searched(path: str) -> str:
    """The directory a pattern looks in: everything before its first wildcard, up to a separator."""
    return os.path.dirname(_GLOB.split(path, maxsplit=1)[0])  # "/data/2026-*/x" and "/data/" look in /data


def holds_no_rows(builder: str, file: str, options: dict | None = None) -> bool:
    """Whether a file holds no rows, where datasets would fail on it rather than read nothing: an empty file, a
    Parquet file whose footer counts no rows, JSON lines that are all blank (a streamed split of them has no
    columns), a CSV header alone (beside other files, its columns of no type break the cast of theirs). `options`:
    dataset.options, which say where a CSV's rows start; with options this cannot follow, a file is not called
    empty (datasets then reads it): leaving out a file that has rows would lose them silently."""
    options = options or {}
    if os.path.getsize(file) == 0:
        return True
    if builder == "parquet":
        try:
            return pq.ParquetFile(file).metadata.num_rows == 0
        except Exception:  # noqa: BLE001 - a damaged file is for datasets to report when it reads it
            return False
    if builder == "json" and options.get("field") is None:  # (with a field, the file is one JSON document)
        return _lines_with_text(file, 1, options) == 0
    if builder == "csv":  # (a blank line is a row of the text builder)
        header = _csv_lines_before_rows(options)
        return header is not None and _lines_with_text(file, header + 1, options) <= header
    return False


def _csv_lines_before_rows(options: dict) -> int | None:
    """How many lines with text a CSV has before its rows (pandas' header counts lines with text only); None where
    the options make lines and rows differ in ways not followed here (another line terminator, blank rows)."""
    if options.get("lineterminator") is not None or options.get("skip_blank_lines") is False:
        return None
    header = options.get("header", "infer")
    if header == "infer":
        return 0 if options.get("names") or options.get("column_names") else 1
    if header is None:
        return 0
    if isinstance(header, int) and not isinstance(header, bool):
        return header + 1
    if isinstance(header, list) and header and all(isinstance(row, int) for row in header):
        return max(header) + 1
    return None


def _lines_with_text(file: str, stop_after: int, options: dict) -> int:
    """Lines holding more than blanks, counted up to `stop_after`: reads no further than the line that decides.
    The lines a CSV's `skiprows` names are not counted, whatever they hold."""
    skip = options.get("skiprows") or 0
    skipped = (lambda number: number < skip) if isinstance(skip, int) else set(skip).__contains__
    count = 0
    with open(file, encoding=options.get("encoding") or "utf-8", errors="replace") as handle:
        for number, line in enumerate(handle):
            count += not skipped(number) and bool(line.strip(ASCII_BLANKS))
            if count >= stop_after:
                break
    return count


def blame(builder: str, files: list[str], message: str, options: dict | None = None) -> str:
    """After reading `files` failed with `message`, which file is to blame, for the message: the first that fails
    on its own (' (in F)', or ' (F: its error)' where `message` does not say it), else the first whose columns'
    types differ from the first file's (' (F has n: double where G has n: int64)'); '' when none is.
    Only called after a read failed, so reading the files again costs nothing in a good run."""
    schemas = []
    for file in files:
        try:
            schemas.append(read_alone(builder, file, options).schema)
        except Exception as error:  # noqa: BLE001 - any failure to read this file alone names it
            why = one_line(str(error.__cause__ or error))  # the reader's own error under any wrapper
            return f" (in {file})" if why in message else f" ({file}: {type(error).__name__}: {why})"
    for file, schema in zip(files[1:], schemas[1:], strict=True):
        differ = [name for name in schema.names if name in schemas[0].names
                  and schema.field(name).type != schemas[0].field(name).type]
        if differ:
            name = differ[0]
            return (f" ({file} has {name}: {schema.field(name).type} where {files[0]} has {name}: "
                    f"{schemas[0].field(name).type}; give every file the same column types)")
    return ""


def read_alone(builder: str, file: str, options: dict | None = None) -> pa.Table:
    """The file read alone through datasets, with the job's dataset.options, to its end; its first batch's table
    (its schema as datasets sees it)."""
    import datasets

    first = None
    stream = datasets.load_dataset(builder, data_files=[file], split="train", streaming=True,
                                   **(options or {})).with_format("arrow")
    for table in stream.iter(batch_size=10_000):
        first = table if first is None else first
    return first if first is not None else pa.table({})


def reader_error(error: BaseException) -> BaseException:
    """datasets wraps a reader's error in DatasetGenerationError; the reader's own says what is wrong."""
    from datasets.exceptions import DatasetGenerationError

    return error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error


def one_line(text: str) -> str:
    """A reader's message on one line (Arrow's schema errors span several)."""
    return " ".join(text.split())
