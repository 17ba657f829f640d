"""Reading: open the job's split with `datasets`, streamed by default, and hand it out one part at a time.

A part is `rows_per_part` consecutive rows of the split (after `--limit`), read as one Arrow table; row ids are
positions in the split. Streaming sources do not support split slicing, so `train[a:b]` is applied here with
skip/take; percentages need the split's size, which only a non-streaming source knows for sure.
"""

from __future__ import annotations

import glob
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.manifest import Job

_SLICE = re.compile(r"(?P<name>[\w.-]+)\[(?P<start>\d*):(?P<stop>\d*)\]")


@dataclass
class Split:
    """The rows to process: a datasets object formatted as Arrow, its size when known, and the columns read."""

    rows: datasets.Dataset | datasets.IterableDataset
    total: int | None
    columns: list[str]

    @property
    def random_access(self) -> bool:  # TEMP shim until the parquet branch lands
        return isinstance(self.rows, datasets.Dataset)

    def read_part(self, index: int, rows_per_part: int) -> pa.Table:
        return self.rows[index * rows_per_part:(index + 1) * rows_per_part]

    def reads(self):
        return None

    def parts(self, rows_per_part: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, pa.Table]]:
        """(part index, table) for each wanted part, in order. Unwanted parts are skipped without conversion."""
        if isinstance(self.rows, datasets.Dataset):  # random access: read only the wanted parts
            for index in range(-(-len(self.rows) // rows_per_part)):
                if wanted(index):
                    yield index, self.rows[index * rows_per_part:(index + 1) * rows_per_part]
            return
        for index, table in enumerate(self.rows.iter(batch_size=rows_per_part)):
            if wanted(index):
                yield index, table


def input_columns(job: Job) -> list[str]:
    """Columns the job reads: the input (or image) column, the prompt's fields, and the kept ones."""
    image = job.get("task") == "image-classification"
    main = job.get("dataset.image_column") if image else job.get("dataset.input_column")
    prompt = job.get("model.prompt")
    fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field] if prompt else []
    return list(dict.fromkeys([main, *fields, *job.get("dataset.keep_columns")]))


def open_split(job: Job, limit: int | None = None) -> Split:
    streaming = job.get("dataset.streaming")
    split_spec = job.get("dataset.split")
    base_split, start, stop = _streaming_slice(split_spec) if streaming else (split_spec, None, None)
    rows = _load(job, base_split, streaming)
    columns = input_columns(job)
    _check_columns(job, rows.column_names, columns)
    rows = rows.select_columns(columns)
    if streaming:
        if start:
            rows = rows.skip(start)
        if stop is not None:
            rows = rows.take(max(stop - (start or 0), 0))
        total = _known_size(rows, base_split, start, stop, _parquet_rows(job, base_split))
    else:
        total = len(rows)
    if limit is not None:
        rows = rows.take(limit) if streaming else rows.select(range(min(limit, len(rows))))
        total = min(total, limit) if total is not None else None
    return Split(rows.with_format("arrow"), total, columns)


def _streaming_slice(split: str) -> tuple[str, int | None, int | None]:
    if "[" not in split and "+" not in split:
        return split, None, None
    match = _SLICE.fullmatch(split)
    if not match:
        raise UsageError(
            f"dataset.split={split!r}: a streamed split can be sliced only by row numbers (train[100:200]); "
            "for percentages or several splits set dataset.streaming: false"
        )
    start, stop = match["start"], match["stop"]
    return match["name"], int(start) if start else None, int(stop) if stop else None


def _load(job: Job, split: str, streaming: bool):
    path = job.get("dataset.path")
    try:
        return datasets.load_dataset(
            path,
            name=job.get("dataset.name"),
            data_files=job.get("dataset.data_files"),
            split=split,
            revision=job.get("dataset.revision"),
            streaming=streaming,
        )
    except FileNotFoundError as error:
        raise BatchrunError(f"dataset.data_files / dataset.path: {error}") from error
    except pa.ArrowException as error:  # a damaged file; ArrowInvalid is also a ValueError, so it comes first
        raise BatchrunError(f"dataset {path!r}: a data file cannot be read: {error}") from error
    except ValueError as error:  # unknown split, bad data_files pattern, bad config name
        raise UsageError(f"dataset {path!r}: {error}") from error
    except (OSError, ConnectionError) as error:
        raise BatchrunError(f"dataset {path!r} could not be opened: {error}") from error


def _check_columns(job: Job, available: list[str] | None, needed: list[str]) -> None:
    if available is None:  # some streamed sources only know their columns after the first row
        return
    missing = [column for column in needed if column not in available]
    if missing:
        raise UsageError(
            f"dataset {job.get('dataset.path')!r} ({job.get('dataset.split')}) has no column "
            f"{', '.join(repr(column) for column in missing)}; its columns are {', '.join(available)} "
            "(check dataset.input_column, dataset.keep_columns and model.prompt)"
        )


def _known_size(rows, split: str, start: int | None, stop: int | None, counted: int | None) -> int | None:
    """Rows a streamed split will yield, from the dataset's metadata or the Parquet footers, when known."""
    splits = getattr(rows.info, "splits", None) or {}
    size = splits[split].num_examples if split in splits and splits[split].num_examples else counted
    if size is None:
        return None
    end = min(size, stop) if stop is not None else size
    return max(end - (start or 0), 0)


def _parquet_rows(job: Job, split: str) -> int | None:
    """Local Parquet files state their row counts in their footers: a total for the progress bar, for free."""
    files = job.get("dataset.data_files")
    if job.get("dataset.path") != "parquet" or files is None:
        return None
    if isinstance(files, dict):
        files = files.get(split)
    paths = [files] if isinstance(files, str) else list(files or [])
    if not paths or any("://" in path for path in paths):
        return None
    matched = sorted({match for path in paths for match in glob.glob(path, recursive=True)})
    try:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in matched) if matched else None
    except (OSError, pa.ArrowInvalid):
        return None  # unreadable here: datasets will say why when it reads
