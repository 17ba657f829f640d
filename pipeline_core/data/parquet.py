"""Random access to a job's Parquet files: a part is read from the row groups that hold its rows, and no others.

Streamed through `datasets`, a Parquet split can only be read from its first row, so a process that wants part 11
reads parts 0-10 first. The footers say where each row group starts, which is enough to read any part on its own.
The rows must be exactly those `datasets` would stream: the files are resolved by datasets' own data-files code, in
its order, and an input that datasets would cast (its files' schemas differ from the features it infers) is left to
datasets (`rows()` answers None) rather than risk other values.
"""

from __future__ import annotations

import bisect
import itertools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.data_files import DataFilesDict, sanitize_patterns
from datasets.download import DownloadConfig

from pipeline_core.errors import BatchrunError
from pipeline_core.remote import options_for

# What resolving the patterns or reading a footer can raise: a missing or damaged file (OSError, ArrowInvalid), a bad
# pattern (ValueError), and a remote filesystem's own errors (botocore's credentials and connection errors are no
# OSErrors). Any of them means "let datasets open it and say why".
_UNREADABLE = Exception


@dataclass
class ReadStats:
    """What a reader has read: row groups, their rows, and the compressed bytes of the column chunks read."""

    row_groups: int = 0
    rows: int = 0
    bytes: int = 0

    def __sub__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.row_groups - other.row_groups, self.rows - other.rows, self.bytes - other.bytes)

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.row_groups + other.row_groups, self.rows + other.rows, self.bytes + other.bytes)


@dataclass(frozen=True)
class RowGroup:
    file: int  # position of its file among the split's files
    index: int  # position in its file
    first_row: int  # position of its first row in the split's files taken end to end
    num_rows: int
    sizes: dict[str, int]  # compressed bytes of each column's chunks, from the footer

    @property
    def end(self) -> int:
        return self.first_row + self.num_rows


@dataclass
class ParquetFiles:
    """A split's Parquet files in datasets' order, their footers as datasets' scan reads them, and the schema datasets
    casts every table to (the features of the first file of the first split)."""

    paths: list[str]
    footers: list[pq.FileMetaData]
    schemas: list[pa.Schema]
    cast_to: pa.Schema
    storage_options: dict = field(default_factory=dict)  # dataset.storage_options, for files behind URLs

    @property
    def num_rows(self) -> int:
        return sum(footer.num_rows for footer in self.footers)

    def rows(self) -> ParquetRows | None:
        """A random-access reader, or None where datasets would cast a file's tables (their values could change)."""
        if any(not schema.equals(self.cast_to) for schema in self.schemas):  # the test table_cast makes, metadata aside
            return None
        return ParquetRows(self.paths, _row_groups(self.footers), self.cast_to, self.storage_options)


def find_parquet(path: str, data_files, split: str, storage_options: dict | None = None) -> ParquetFiles | None:
    """The split's Parquet files and footers when the job names Parquet data files this module can read as datasets
    would; None leaves the source to datasets, which also reports any file that is missing or unreadable."""
    if path != "parquet" or not data_files:
        return None
    try:
        resolved = _resolve(data_files, storage_options or {})
    except _UNREADABLE:
        return None
    paths = list(resolved.get(split) or [])
    first_split = next(iter(resolved.values()))
    if not paths or not first_split or any("::" in file for file in [*paths, first_split[0]]):
        return None  # no files (datasets says so), or a file inside an archive: left to datasets' own opener
    try:
        return _read_footers(paths, first_split[0], storage_options or {})
    except _UNREADABLE:
        return None


def _resolve(data_files, storage_options: dict) -> DataFilesDict:
    """split -> files, exactly as `load_dataset("parquet", data_files=...)` resolves them (PackagedDatasetModuleFactory
    with no data_dir): relative patterns from the working directory, globs sorted, duplicates kept."""
    return DataFilesDict.from_patterns(sanitize_patterns(data_files), base_path=Path().resolve().as_posix(),
                                      download_config=DownloadConfig(storage_options=storage_options))


def _read_footers(paths: list[str], reference: str, storage_options: dict) -> ParquetFiles:
    footers, schemas = [], []
    for path in paths:
        parquet = _open(path, storage_options)
        try:
            footers.append(parquet.metadata)
            schemas.append(parquet.schema_arrow)
        finally:
            parquet.close(force=True)
    # datasets infers the features with pq.read_schema (Arrow extension types on), then casts every table to them
    with _reading(reference, storage_options) as file:
        features = datasets.Features.from_arrow_schema(pq.read_schema(file))
    return ParquetFiles(paths, footers, schemas, features.arrow_schema, storage_options)


def _reading(path: str, storage_options: dict):
    """A data file to read: a local path opened by Python, a URL through fsspec with dataset.storage_options."""
    return fsspec.open(path, "rb", **options_for(path, storage_options)) if "://" in path else open(path, "rb")


def _open(path: str, storage_options: dict) -> pq.ParquetFile:
    """A local path is opened by Arrow itself, a URL through fsspec as datasets does. Extension types stay off, as in
    the `pyarrow.dataset` scan datasets reads with, so the columns come out with the same types."""
    source = fsspec.open(path, "rb", **options_for(path, storage_options)).open() if "://" in path else path
    return pq.ParquetFile(source, arrow_extensions_enabled=False)


def _row_groups(footers: list[pq.FileMetaData]) -> list[RowGroup]:
    """Every row group that holds rows, with its place in the files taken end to end. Empty ones are never read."""
    groups, first_row = [], 0
    for file, footer in enumerate(footers):
        leaves = _leaves_by_column(footer)
        for index in range(footer.num_row_groups):
            meta = footer.row_group(index)
            if meta.num_rows:
                sizes = {name: sum(meta.column(leaf).total_compressed_size for leaf in leaves[name]) for name in leaves}
                groups.append(RowGroup(file, index, first_row, meta.num_rows, sizes))
                first_row += meta.num_rows
    return groups


def _leaves_by_column(footer: pq.FileMetaData) -> dict[str, list[int]]:
    """Top-level column -> its Parquet leaf columns (a list or struct column has several chunks per row group)."""
    paths = [footer.schema.column(leaf).path for leaf in range(footer.num_columns)]
    return {name: [leaf for leaf, path in enumerate(paths) if path == name or path.startswith(name + ".")]
            for name in footer.schema.to_arrow_schema().names}


class ParquetRows:
    """Rows of Parquet files taken end to end, read by position. Mirrors the bits of a datasets object the source
    uses (`column_names`, `select_columns`). Picklable: it holds paths and row-group offsets, and each process opens
    its own files (a forked worker must not share the parent's open files)."""

    def __init__(self, paths: list[str], groups: list[RowGroup], schema: pa.Schema,
                 storage_options: dict | None = None):
        self.paths = paths
        self.storage_options = storage_options or {}
        self.groups = groups
        self.schema = schema  # of the tables read, metadata included (datasets' features, as it streams them)
        self.num_rows = groups[-1].end if groups else 0
        self.stats = ReadStats()
        self._starts = [group.first_row for group in groups]
        self._files: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def select_columns(self, columns: list[str]) -> ParquetRows:
        groups = [replace(group, sizes={name: group.sizes[name] for name in columns}) for group in self.groups]
        schema = pa.schema([self.schema.field(name) for name in columns], metadata=self.schema.metadata)
        return ParquetRows(self.paths, groups, schema, self.storage_options)

    def read(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) as one table, reading only the row groups that hold them and only the selected columns."""
        groups = self._overlapping(start, stop)
        if not groups:
            return self.schema.empty_table()
        tables = [self._read_groups(file, [group.index for group in run])
                  for file, run in itertools.groupby(groups, key=lambda group: group.file)]
        self._count(groups)
        table = pa.concat_tables(tables).select(self.column_names)
        return table.slice(start - groups[0].first_row, stop - start).replace_schema_metadata(self.schema.metadata)

    def _overlapping(self, start: int, stop: int) -> list[RowGroup]:
        if start >= stop:
            return []
        first = max(bisect.bisect_right(self._starts, start) - 1, 0)
        last = bisect.bisect_left(self._starts, stop)
        return [group for group in self.groups[first:last] if group.end > start]

    def _read_groups(self, file: int, indices: list[int]) -> pa.Table:
        path = self.paths[file]
        try:
            return self._file(file).read_row_groups(indices, columns=self.column_names)
        except (OSError, pa.ArrowException) as error:  # changed or damaged since its footer was read
            raise BatchrunError(f"dataset.data_files: {path} cannot be read: {error}") from error

    def _file(self, file: int) -> pq.ParquetFile:
        if self._pid != os.getpid():  # forked: open files of our own
            self._files, self._pid = {}, os.getpid()
        if file not in self._files:
            # parts are read in order, so a new file means the earlier ones are done with
            for parquet in self._files.values():
                parquet.close(force=True)
            self._files = {file: _open(self.paths[file], self.storage_options)}
        return self._files[file]

    def _count(self, groups: list[RowGroup]) -> None:
        self.stats.row_groups += len(groups)
        self.stats.rows += sum(group.num_rows for group in groups)
        self.stats.bytes += sum(sum(group.sizes.values()) for group in groups)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}
