"""Parquet read by row group: every part equals what the datasets stream gives (rows, values, types, metadata) for
several files, row groups of many sizes, empty files, globs, split mappings, slices, limits and kept columns; reading a
part reads only the row groups that hold it; inputs datasets would cast are left to datasets; readers pickle."""

from __future__ import annotations

import pickle
from pathlib import Path

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_core.data.parquet import ParquetFiles, ParquetRows, ReadStats, find_parquet
from pipeline_core.data.source import Split, open_split
from pipeline_core.manifest import Job


def make_job(data_files, split="train", keep=("id",)) -> Job:
    return Job(Path("job.yaml"), {
        "task": "text-classification",
        "model": {"prompt": None},
        "dataset": {"path": "parquet", "name": None, "data_files": data_files, "split": split, "revision": None,
                    "streaming": True, "input_column": "text", "image_column": "image", "keep_columns": list(keep),
                    "storage_options": {}, "options": {}},
        "evaluate": {"reference_column": None, "metrics": None},
    })


def rows(first: int, count: int) -> pa.Table:
    """Rows of several kinds of column, some null, so that types and values are both compared."""
    ids = list(range(first, first + count))
    return pa.table({
        "id": ids,
        "text": [None if i % 7 == 3 else f"row {i} " + "word " * (i % 5) for i in ids],
        "score": [i / 4 if i % 3 else None for i in ids],
        "tags": [[f"t{j}" for j in range(i % 4)] for i in ids],
        "extra": [i * 10 for i in ids],
    })


def write(path: Path, first: int, count: int, row_group_size: int | None = None) -> str:
    pq.write_table(rows(first, count), path, row_group_size=row_group_size)
    return str(path)


def write_empty(path: Path) -> str:
    """A file with no row group at all. (A file holding one empty row group, as pq.write_table writes for no rows,
    makes datasets' stream fail: see test_a_file_holding_an_empty_row_group_reads_as_no_rows.)"""
    pq.ParquetWriter(path, rows(1, 1).schema).close()
    return str(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Rows 0-101 in five files with row groups of 7, 1, none (empty), 5 and 64 rows: parts straddle both."""
    write(tmp_path / "p0.parquet", 0, 30, row_group_size=7)
    write(tmp_path / "p1.parquet", 30, 3, row_group_size=1)
    write_empty(tmp_path / "p2.parquet")
    write(tmp_path / "p3.parquet", 33, 40, row_group_size=5)
    write(tmp_path / "p4.parquet", 73, 29)
    return tmp_path


def every(index: int) -> bool:
    return True


def streamed_by_datasets(job: Job, limit: int | None, monkeypatch) -> Split:
    """The split as datasets streams it: open_split when parquet.py declines the files."""
    with monkeypatch.context() as patch:
        patch.setattr(ParquetFiles, "rows", lambda self: None)
        split = open_split(job, limit=limit)
    assert isinstance(split.rows, datasets.IterableDataset)
    return split


def assert_same_parts(job: Job, rows_per_part: int, monkeypatch, limit: int | None = None) -> Split:
    expected = [table for _, table in streamed_by_datasets(job, limit, monkeypatch).parts(rows_per_part, every)]
    split = open_split(job, limit=limit)
    assert isinstance(split.rows, ParquetRows) and split.random_access
    assert split.total == sum(table.num_rows for table in expected)
    in_order = [table for _, table in split.parts(rows_per_part, every)]
    backwards = [split.read_part(index, rows_per_part) for index in reversed(range(len(expected)))][::-1]
    for got in (in_order, backwards):
        for table, want in zip(got, expected, strict=True):
            assert table.schema.equals(want.schema, check_metadata=True)  # types, order and datasets' features
            assert table.equals(want)
    return split


@pytest.mark.parametrize("rows_per_part", [1, 4, 6, 10, 33, 64, 200])
def test_every_part_of_several_files_equals_the_stream(folder, rows_per_part, monkeypatch):
    data_files = [str(folder / f"p{n}.parquet") for n in range(5)]
    split = assert_same_parts(make_job(data_files), rows_per_part, monkeypatch)
    assert split.total == 102


@pytest.mark.parametrize("spec, limit, rows_per_part", [
    ("train[3:50]", None, 6),
    ("train[29:34]", None, 2),  # across a file of single-row groups and an empty file
    ("train[70:]", None, 4),
    ("train[:40]", 13, 5),
    ("train[95:500]", None, 3),
    ("train[60:10]", None, 3),
    ("train", 0, 3),
    ("train", 31, 8),
    ("train[200:]", None, 4),
])
def test_every_part_of_a_slice_then_limit_equals_the_stream(folder, spec, limit, rows_per_part, monkeypatch):
    assert_same_parts(make_job(str(folder / "*.parquet"), split=spec), rows_per_part, monkeypatch, limit)


@pytest.mark.parametrize("keep", [(), ("id",), ("extra", "tags", "score")])
def test_only_the_kept_columns_are_read_in_the_jobs_order(folder, keep, monkeypatch):
    split = assert_same_parts(make_job(str(folder / "p*.parquet"), keep=keep), 9, monkeypatch)
    assert split.read_part(0, 9).column_names == ["text", *keep]


def test_a_split_of_a_mapping_by_glob_and_by_file_url_equals_the_stream(folder, monkeypatch):
    test_files = [f"file://{folder}/p3.parquet", str(folder / "p[01].parquet")]
    job = make_job({"train": str(folder / "p4.parquet"), "test": test_files}, split="test[5:]")
    split = assert_same_parts(job, 7, monkeypatch)
    assert split.read_part(0, 7).column("id").to_pylist() == [38, 39, 40, 41, 42, 43, 44]  # p3, then p0 and p1


def test_files_behind_a_url_are_read_through_fsspec(monkeypatch):
    memory = fsspec.filesystem("memory")
    for n, (first, count) in enumerate([(0, 12), (12, 9)]):
        with memory.open(f"/batchrun-test/m{n}.parquet", "wb") as file:
            pq.write_table(rows(first, count), file, row_group_size=4)
    try:
        split = assert_same_parts(make_job("memory://batchrun-test/*.parquet", split="train[2:]"), 5, monkeypatch)
        assert split.rows.paths == ["memory:///batchrun-test/m0.parquet", "memory:///batchrun-test/m1.parquet"]
    finally:
        memory.rm("/batchrun-test", recursive=True)


def test_files_written_by_datasets_keep_the_features_they_state(tmp_path, monkeypatch):
    """A file written by datasets states its features (here a ClassLabel) in its metadata: the stream's tables carry
    them, and so must the reader's."""
    features = datasets.Features({"text": datasets.Value("string"), "id": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["no", "yes"])})
    for n in range(2):
        rows_of_file = {"text": [f"t{i}" for i in range(n * 9, n * 9 + 9)], "id": list(range(n * 9, n * 9 + 9)),
                        "label": [i % 2 for i in range(9)]}
        datasets.Dataset.from_dict(rows_of_file, features=features).to_parquet(tmp_path / f"d{n}.parquet")
    assert_same_parts(make_job(str(tmp_path / "d*.parquet"), split="train[2:]", keep=("label",)), 5, monkeypatch)


def test_a_file_holding_an_empty_row_group_reads_as_no_rows(tmp_path, monkeypatch):
    """pq.write_table of no rows writes one empty row group, on which datasets' stream fails ("BatchSize must be
    greater than 0"); the reader skips it, and gives the rows the stream gives without that file."""
    first, second = write(tmp_path / "a.parquet", 0, 10, 3), write(tmp_path / "c.parquet", 10, 5, 2)
    pq.write_table(rows(1, 1).slice(0, 0), tmp_path / "b.parquet")
    stream = streamed_by_datasets(make_job([first, second]), None, monkeypatch)
    expected = [table for _, table in stream.parts(4, every)]
    split = open_split(make_job([first, str(tmp_path / "b.parquet"), second]))
    assert [split.read_part(index, 4) for index in range(4)] == expected
    only_empty = open_split(make_job(str(tmp_path / "b.parquet")))
    assert only_empty.total == 0 and list(only_empty.parts(4, every)) == []


# --- what is read ------------------------------------------------------------------------------------------


@pytest.fixture
def six_files(tmp_path) -> list[str]:
    """600 rows in six files of 100 rows, each in four row groups of 25."""
    return [write(tmp_path / f"s{n}.parquet", n * 100, 100, row_group_size=25) for n in range(6)]


def chunk_bytes(path: str, groups: list[int], columns: list[str]) -> int:
    footer = pq.read_metadata(path)
    return sum(footer.row_group(group).column(leaf).total_compressed_size for group in groups
               for leaf in range(footer.num_columns) if footer.schema.column(leaf).path.split(".")[0] in columns)


def test_reading_a_part_reads_only_the_row_groups_that_hold_it(six_files):
    split = open_split(make_job(six_files))
    assert split.reads() == ReadStats(0, 0, 0)
    table = split.read_part(3, 60)  # rows 180-239: row group 3 of s1, row groups 0 and 1 of s2
    assert table.column("id").to_pylist() == list(range(180, 240))
    assert split.reads() == ReadStats(row_groups=3, rows=75, bytes=chunk_bytes(six_files[1], [3], ["text", "id"])
                                      + chunk_bytes(six_files[2], [0, 1], ["text", "id"]))
    before = split.reads()
    split.read_part(0, 25)  # exactly one row group
    assert split.reads() - before == ReadStats(1, 25, chunk_bytes(six_files[0], [0], ["text", "id"]))


def test_a_shard_of_a_sixth_of_the_parts_reads_a_sixth_of_the_bytes(six_files):
    split = open_split(make_job(six_files, keep=("id", "tags")))
    for index in range(2):  # shard 0 of 6: parts 0 and 1 of 12
        split.read_part(index, 50)
    shard = split.reads()
    whole = open_split(make_job(six_files, keep=("id", "tags")))
    list(whole.parts(50, every))
    assert shard.row_groups == 4 and shard.rows == 100
    assert whole.reads().row_groups == 24 and whole.reads().rows == 600
    assert shard.bytes == chunk_bytes(six_files[0], [0, 1, 2, 3], ["text", "id", "tags"])
    assert abs(shard.bytes / whole.reads().bytes - 1 / 6) < 0.01


def test_a_slice_reads_from_where_it_starts(six_files):
    split = open_split(make_job(six_files, split="train[550:]"))
    assert split.total == 50 and split.offset == 550
    assert split.read_part(1, 20).column("id").to_pylist() == list(range(570, 590))
    # rows 570-589: row groups 2 and 3 of s5 (rows 550-599)
    assert split.reads() == ReadStats(2, 50, chunk_bytes(six_files[5], [2, 3], ["text", "id"]))


# --- left to datasets ----------------------------------------------------------------------------------------


def declined_files(tmp_path) -> dict[str, pa.Table]:
    """Second files that datasets would cast to the first file's features."""
    table = rows(10, 5)
    int32 = table.set_column(0, "id", table.column("id").cast(pa.int32()))
    required = pa.schema([field.with_nullable(field.name != "id") for field in table.schema])
    return {"another type": int32, "columns in another order": table.select(["text", "id", "score", "tags", "extra"]),
            "a required column": table.cast(required)}


@pytest.mark.parametrize("case", ["another type", "columns in another order", "a required column"])
def test_files_whose_schemas_differ_are_left_to_datasets(tmp_path, case, monkeypatch):
    first = write(tmp_path / "a.parquet", 0, 10)
    pq.write_table(declined_files(tmp_path)[case], tmp_path / "b.parquet")
    found = find_parquet("parquet", [first, str(tmp_path / "b.parquet")], "train")
    assert found.num_rows == 15 and found.rows() is None
    split = open_split(make_job([first, str(tmp_path / "b.parquet")]))
    assert isinstance(split.rows, datasets.IterableDataset) and not split.random_access
    assert split.total == 15  # still counted from the footers
    assert [table.column("id").to_pylist() for _, table in split.parts(8, every)] == [list(range(8)),
                                                                                     list(range(8, 15))]


def test_the_first_split_sets_the_schema_every_split_is_cast_to(tmp_path):
    """datasets infers the features from the first file of the first split, even when another split is read."""
    table = rows(0, 5)
    pq.write_table(table.set_column(0, "id", table.column("id").cast(pa.int32())), tmp_path / "train.parquet")
    test = write(tmp_path / "test.parquet", 0, 5)
    assert find_parquet("parquet", {"train": str(tmp_path / "train.parquet"), "test": test}, "test").rows() is None
    assert find_parquet("parquet", {"test": test, "train": str(tmp_path / "train.parquet")}, "test").rows()


# --- Split and its reader --------------------------------------------------------------------------------------


def test_a_reader_pickled_for_a_worker_reads_the_same_rows(six_files):
    split = open_split(make_job(six_files, split="train[130:]"))
    expected = split.read_part(2, 40)  # the parent has a file open: it does not travel
    copy = pickle.loads(pickle.dumps(split))
    assert copy.rows._files == {} and copy.read_part(2, 40).equals(expected)
    assert copy.reads() - split.reads() == ReadStats(2, 50, chunk_bytes(six_files[2], [0, 1], ["text", "id"]))


def test_a_converted_split_reads_any_part_and_counts_nothing():
    table = datasets.Dataset.from_dict({"id": list(range(10)), "text": [f"w{i}" for i in range(10)]})
    split = Split(table.with_format("arrow"), 10, ["text", "id"])
    assert split.random_access
    assert split.read_part(2, 4).column("id").to_pylist() == [8, 9]
    assert split.reads() == ReadStats(0, 0, 0)
    streamed = Split(table.to_iterable_dataset().with_format("arrow"), 10, ["text", "id"])
    assert not streamed.random_access and streamed.reads() == ReadStats(0, 0, 0)


def test_reads_are_a_copy_callers_can_subtract(six_files):
    split = open_split(make_job(six_files))
    before = split.reads()
    split.read_part(0, 10)
    assert before == ReadStats(0, 0, 0) and split.reads() - before == split.reads()
