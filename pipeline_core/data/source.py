"""Reading: open the job's split, streamed by default, and hand it out one part at a time.

A part is `rows_per_part` consecutive rows of the split (after `--limit`), read as one Arrow table; row ids are
positions in the split. Streaming sources do not support split slicing, so `train[a:b]` is applied here with
skip/take; percentages need the split's size, which only a non-streaming source knows for sure. A streamed split of
Parquet data files is read by row group instead (parquet.py), so that any part can be read without the ones before.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import datasets
import pyarrow as pa
from datasets.data_files import sanitize_patterns
from datasets.exceptions import DatasetGenerationError

from pipeline_core import remote
from pipeline_core.data.files import blame, one_line, reader_error, split_data_files
from pipeline_core.data.layouts import dataset_source, saved_split_name
from pipeline_core.data.parquet import ParquetRows, ReadStats, find_parquet
from pipeline_core.data.parse_errors import check_text, find_unparsable, is_parse_error
from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.manifest import Job
from pipeline_core.manifest.options import unknown_option_in
from pipeline_core.manifest.spec import reference_output_column

_SLICE = re.compile(r"(?P<name>[\w.-]+)\[(?P<start>\d*):(?P<stop>\d*)\]")
_SPLIT_NAME = re.compile(r"(?P<name>[\w.-]+)(?:\[[^\]]*\])?")
log = logging.getLogger("batchrun")


@dataclass
class Split:
    """The rows to process (a datasets object formatted as Arrow, or Parquet rows), its size when known, the columns
    read, and where it starts in the unsliced split (the start of `train[a:b]`): the first row's row_id, and for
    Parquet rows the row of the files it is read from."""

    rows: datasets.Dataset | datasets.IterableDataset | ParquetRows
    total: int | None
    columns: list[str]
    offset: int = 0

    @property
    def random_access(self) -> bool:
        """Whether any part can be read on its own (read_part); a stream is read in order (parts)."""
        return not isinstance(self.rows, datasets.IterableDataset)

    def read_part(self, index: int, rows_per_part: int) -> pa.Table:
        """Part `index` as one table; from Parquet files, only the row groups that hold its rows are read. Its text
        is checked to be UTF-8 (InvalidText otherwise), so that no part is computed from, or writes, broken strings."""
        assert self.random_access, "a streamed split is read in order, with parts()"
        first = index * rows_per_part
        if isinstance(self.rows, ParquetRows):
            stop = min(first + rows_per_part, self.total)
            return check_text(self.rows.read(self.offset + first, self.offset + stop), self.offset + first)
        return check_text(self.rows[first:first + rows_per_part], self.offset + first)

    def reads(self) -> ReadStats:
        """What has been read so far in this process (a copy, so that callers can subtract); zeros for sources
        that do not count."""
        return replace(self.rows.stats) if isinstance(self.rows, ParquetRows) else ReadStats()

    def parts(self, rows_per_part: int, wanted: Callable[[int], bool]) -> Iterator[tuple[int, pa.Table]]:
        """(part index, table) for each wanted part, in order. Unwanted parts are skipped without conversion."""
        if self.random_access:  # read only the wanted parts
            size = len(self.rows) if isinstance(self.rows, datasets.Dataset) else self.total
            for index in range(-(-size // rows_per_part)):
                if wanted(index):
                    yield index, self.read_part(index, rows_per_part)
            return
        for index, table in enumerate(self.rows.iter(batch_size=rows_per_part)):
            if wanted(index):
                yield index, check_text(table, self.offset + index * rows_per_part)


def input_columns(job: Job) -> list[str]:
    """Columns the job reads: the input (or image) column, the prompt's fields, and the kept ones."""
    image = job.get("task") == "image-classification"
    main = job.get("dataset.image_column") if image else job.get("dataset.input_column")
    prompt = job.get("model.prompt")
    fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field] if prompt else []
    return list(dict.fromkeys([main, *fields, *kept_columns(job)]))


def kept_columns(job: Job) -> dict[str, str]:
    """Columns copied to the output unchanged, {dataset name: output name}: dataset.keep_columns, then
    evaluate.reference_column (scored from the output's own rows, so `batchrun evaluate` can recompute the scores
    from the parts), renamed reference_<name> where the task's output has a column of that name."""
    kept = {column: column for column in job.get("dataset.keep_columns")}
    reference = job.get("evaluate.reference_column")
    if reference is not None:
        kept.setdefault(reference, reference_output_column(job.get("task"), reference))
    return kept


def open_split(job: Job, limit: int | None = None) -> Split:
    """The job's split, sliced and limited, its columns checked (exit 2 naming those it has). Streamed Parquet data
    files are read by row group where that gives exactly what datasets would stream; a save_to_disk directory is
    memory-mapped; anything else goes through datasets. Data files without rows are left out, and a split without
    any rows is a split of 0 rows (an empty nightly partition), not a failure."""
    streaming = job.get("dataset.streaming")
    split_spec = job.get("dataset.split")
    columns = input_columns(job)
    require_data_backends(job)
    source = dataset_source(job, split_name(split_spec))
    if source.saved:
        return _saved_split(job, source.path, split_spec, columns, limit)
    base_split, start, stop = _streaming_slice(split_spec) if streaming else (split_spec, None, None)
    local = split_data_files(job, split_name(split_spec))  # exit 2 for a pattern that matches nothing
    data_files = source.data_files
    if local is not None and local.empty:
        if not local.with_rows:
            return _empty_split(job, columns, f"its {len(local.files)} data file(s) hold no rows")
        data_files = {split_name(split_spec): local.with_rows}
    storage_options = job.get("dataset.storage_options") or {}
    # the row-group reader knows no builder options (columns, filters, ...): with options, datasets reads the files
    by_row_group = streaming and not job.get("dataset.options")
    parquet = find_parquet(source.path, data_files, base_split, storage_options) if by_row_group else None
    parquet_rows = parquet.rows() if parquet else None
    if parquet_rows is not None:
        _check_columns(job, parquet_rows.column_names, columns)
        return _parquet_split(parquet_rows.select_columns(columns), columns, start, stop, limit)
    rows = _load(job, source.path, base_split, streaming, data_files, storage_options)
    if rows is None:
        return _empty_split(job, columns, "datasets found no rows in it")
    _check_columns(job, _column_names(rows), columns)
    rows = rows.select_columns(columns)
    if streaming:
        if start:
            rows = rows.skip(start)
        if stop is not None:
            rows = rows.take(max(stop - (start or 0), 0))
        total = _known_size(rows, base_split, start, stop, parquet.num_rows if parquet else None)
    else:
        total, start = len(rows), _converted_start(split_spec, rows)
    if limit is not None:
        rows = rows.take(limit) if streaming else rows.select(range(min(limit, len(rows))))
        total = min(total, limit) if total is not None else None
    return Split(rows.with_format("arrow"), total, columns, offset=start or 0)


def _saved_split(job: Job, path: str, spec: str, columns: list[str], limit: int | None) -> Split:
    """A save_to_disk directory, memory-mapped whether streamed or not (nothing is converted or copied): every part
    can be read on its own. Slices and `a+b` are applied here, as load_dataset would."""
    splits = _saved_splits(path, split_name(spec))
    try:
        pieces = datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(rows) for name, rows in
                                                                        splits.items()})
    except (ValueError, AssertionError) as error:
        raise UsageError(f"dataset.split={spec!r}: {error} ({path} holds {', '.join(splits)})") from error
    chosen = [splits[piece.splitname].select(range(piece.from_, piece.to)) for piece in pieces]
    rows = chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)
    _check_columns(job, rows.column_names, columns)
    rows = rows.select_columns(columns)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return Split(rows.with_format("arrow"), len(rows), columns, offset=_slice_start(pieces))


def _saved_splits(path: str, wanted: str | None) -> dict[str, datasets.Dataset]:
    """name -> split of a saved DatasetDict; a saved Dataset is the one split the job names (or the one it records)."""
    try:
        saved = datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError, pa.ArrowException) as error:
        raise BatchrunError(f"dataset.path={path!r} (written by save_to_disk) cannot be read: "
                            f"{type(error).__name__}: {one_line(str(error))}") from error
    if isinstance(saved, datasets.DatasetDict):
        return dict(saved)
    recorded = saved_split_name(path)
    if recorded and wanted and recorded != wanted:
        raise UsageError(f"dataset.split names {wanted!r}, but {path} holds the {recorded!r} split only "
                         f"(set dataset.split: {recorded})")
    return {wanted or recorded or "train": saved}


def _converted_start(spec: str, rows: datasets.Dataset) -> int:
    """Where a converted split's slice (`train[10:50]`, `train[10%:]`) starts in the unsliced split, by datasets'
    own rounding; 0 for an unsliced split or several (`train+test`)."""
    if "[" not in spec:
        return 0
    sizes = {name: info.num_examples for name, info in (rows.info.splits or {}).items()}
    return _slice_start(datasets.ReadInstruction.from_spec(spec).to_absolute(sizes))


def _slice_start(pieces: list) -> int:
    """The row of the unsliced split where one slice (datasets' absolute read instructions) starts; several splits
    (`train+test`) count from 0 across them."""
    return pieces[0].from_ if len(pieces) == 1 else 0


def _column_names(rows) -> list[str] | None:
    """The split's columns; a streamed CSV learns them only by reading, so its first row is read to check them
    before any model loads. None when it has no row to read, or reading fails (the read reports that)."""
    if rows.column_names is not None:
        return rows.column_names
    try:
        first = next(iter(rows.take(1)), None)
    except Exception:  # noqa: BLE001 - a broken file is reported, naming it, when the split is read
        return None
    return list(first) if first is not None else None


def _parquet_split(rows: ParquetRows, columns: list[str], start: int | None, stop: int | None,
                   limit: int | None) -> Split:
    """`train[a:b]` then `--limit` on Parquet rows: an offset and a row count, the rows skip/take give on a stream."""
    first = start or 0
    end = rows.num_rows if stop is None else min(stop, rows.num_rows)
    total = max(end - first, 0)
    return Split(rows, total if limit is None else min(total, limit), columns, offset=first)


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


def _load(job: Job, path: str, split: str, streaming: bool, data_files, storage_options: dict):
    """The split through datasets, with dataset.options for its builder; None when it holds no rows at all (its JSON
    builder then stops at once)."""
    try:
        return datasets.load_dataset(
            path,
            name=job.get("dataset.name"),
            data_files=data_files,
            split=split,
            revision=job.get("dataset.revision"),
            streaming=streaming,
            storage_options=storage_options or None,
            **job.get("dataset.options"),
        )
    except StopIteration:  # files batchrun cannot look into first (remote ones): datasets found no table in them
        return None
    except FileNotFoundError as error:  # a missing directory or file, a hub id the hub does not have: not for a retry
        raise UsageError(f"dataset.data_files / dataset.path: {one_line(str(error))}") from error
    except (pa.ArrowException, DatasetGenerationError, ValueError) as error:  # ArrowInvalid is a ValueError
        if "corresponds to no data" in str(error):  # a converted split of files without rows (a JSON `[]`)
            return None
        raise _load_failure(job, path, error) from error
    except (OSError, ConnectionError) as error:
        raise BatchrunError(f"dataset {path!r} could not be opened: {error}") from error


def _load_failure(job: Job, path: str, error: Exception) -> BatchrunError:
    """A file that cannot be parsed, or an option its builder lacks: exit 2; a damaged file (a truncated download,
    Parquet without its footer): exit 1, naming the file where the local files tell; any other ValueError (an
    unknown split, a bad data_files pattern or config name): exit 2."""
    if is_parse_error(error):
        return unparsable(job, one_line(str(reader_error(error))))
    if isinstance(error, (pa.ArrowException, DatasetGenerationError)):
        message = f"dataset {path!r}: a data file cannot be read: {one_line(str(reader_error(error)))}"
        return BatchrunError(message + broken_file_note(job, message))
    return UsageError(unknown_option_in(str(error)) or f"dataset {path!r}: {error}")


def require_data_backends(job: Job) -> None:
    """Exit 2 naming the extra to install when a data file's URL needs a filesystem package that is missing."""
    data_files = job.get("dataset.data_files")
    patterns = sanitize_patterns(data_files) if data_files else {}
    for pattern in (pattern for split in patterns.values() for pattern in split):
        remote.require_backend(pattern, "dataset.data_files")


def split_name(spec: str) -> str | None:
    """The split a spec reads (`train` of `train[10:50]`); None for several splits (`train+test`)."""
    match = _SPLIT_NAME.fullmatch(spec)
    return match["name"] if match else None


def broken_file_note(job: Job, message: str) -> str:
    """After reading local data files failed with `message`, which file is to blame (files.blame); '' when the
    files are not local or none is."""
    split = split_name(job.get("dataset.split"))
    local = split_data_files(job, split)
    options = job.get("dataset.options")
    return blame(dataset_source(job, split).path, local.with_rows, message, options) if local else ""


def unparsable(job: Job, message: str, after: str = "") -> UsageError:
    """A data file the reader could not parse (`message`: its error), as exit 2 naming the file and line where the
    local files tell (parse_errors.find_unparsable): a retry would read the same bytes. `after`: more for the end."""
    split = split_name(job.get("dataset.split"))
    local = split_data_files(job, split)
    builder = dataset_source(job, split).path
    spot = find_unparsable(builder, local.with_rows, job.get("dataset.options")) if local else None
    where = str(spot) if spot else f"a data file cannot be parsed: {message}"
    fix = "fix or remove that line" if spot and spot.line else "fix the file"
    return UsageError(f"dataset {job.get('dataset.path')!r}: {where}; {fix} (a retry would read the same bytes)"
                      f"{after}")


def _empty_split(job: Job, columns: list[str], why: str) -> Split:
    log.info("dataset %r split %s: %s", job.get("dataset.path"), job.get("dataset.split"), why)
    empty = datasets.Dataset.from_dict({column: [] for column in columns})
    return Split(empty.with_format("arrow"), 0, columns)


def _check_columns(job: Job, available: list[str] | None, needed: list[str]) -> None:
    if available is None:  # some streamed sources only know their columns after the first row
        return
    missing = [column for column in needed if column not in available]
    if missing:
        keys = ("dataset.image_column and dataset.keep_columns" if job.get("task") == "image-classification"
                else "dataset.input_column, dataset.keep_columns, model.prompt and evaluate.reference_column")
        raise UsageError(
            f"dataset {job.get('dataset.path')!r} ({job.get('dataset.split')}) has no column "
            f"{', '.join(repr(column) for column in missing)}; its columns are {', '.join(available)} "
            f"(check {keys})"
        )


def _known_size(rows, split: str, start: int | None, stop: int | None, counted: int | None) -> int | None:
    """Rows a streamed split will yield, from the dataset's metadata or the Parquet footers, when known."""
    splits = getattr(rows.info, "splits", None) or {}
    size = splits[split].num_examples if split in splits and splits[split].num_examples else counted
    if size is None:
        return None
    end = min(size, stop) if stop is not None else size
    return max(end - (start or 0), 0)
