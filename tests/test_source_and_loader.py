"""Reading and preparing parts: the rows and totals open_split gives for streamed and converted sources, slices and
limits, the columns it reads, its error messages; which parts a worker prepares, and what a prepared part holds."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline_core.data import loader as loader_module
from pipeline_core.data.loader import (
    BatchLimits,
    EndOfSplit,
    PreparedPart,
    PreparedParts,
    SourceFailure,
    _pass_through,
    _quiet_worker,
    part_loader,
    prepare_part,
)
from pipeline_core.data.parquet import ParquetFiles, ParquetRows, find_parquet
from pipeline_core.data.source import (
    Split,
    _check_columns,
    _known_size,
    _streaming_slice,
    input_columns,
    open_split,
)
from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.layout import Layout, Share
from pipeline_core.manifest import Job
from pipeline_core.output.claims import Claims
from pipeline_core.output.run_dir import part_name
from pipeline_core.output.store import LocalStore
from pipeline_core.tasks.text import Encoded


def make_job(data_files=None, path="parquet", split="train", streaming=True, input_column="text", keep=(),
             prompt=None, task="text-classification", name=None, revision=None, reference=None,
             options=None) -> Job:
    """The keys source.py reads, as load_job would fill them."""
    return Job(Path("job.yaml"), {
        "task": task,
        "model": {"prompt": prompt},
        "dataset": {"path": path, "name": name, "data_files": data_files, "split": split, "revision": revision,
                    "streaming": streaming, "input_column": input_column, "image_column": "image",
                    "keep_columns": list(keep), "storage_options": {}, "options": options or {}},
        "evaluate": {"reference_column": reference, "metrics": None},
    })


def write_rows(path: Path, first: int, count: int) -> str:
    ids = list(range(first, first + count))
    pq.write_table(pa.table({"id": ids, "text": [f"row {i}" for i in ids], "extra": [i * 10 for i in ids]}), path)
    return str(path)


@pytest.fixture
def files(tmp_path) -> SimpleNamespace:
    """a.parquet holds rows 0-9, b.parquet rows 10-16."""
    return SimpleNamespace(a=write_rows(tmp_path / "a.parquet", 0, 10), b=write_rows(tmp_path / "b.parquet", 10, 7))


def ids_of(split: Split, rows_per_part: int = 4) -> list[int]:
    tables = [table for _, table in split.parts(rows_per_part, lambda index: True)]
    assert all(isinstance(table, pa.Table) for table in tables)
    return [value for table in tables for value in table.column("id").to_pylist()]


# --- open_split ----------------------------------------------------------------------------------------------


@pytest.fixture
def through_datasets(monkeypatch):
    """Streamed Parquet files read by datasets, as when parquet.py declines them (datasets would cast their tables);
    their footers still give the total."""
    monkeypatch.setattr(ParquetFiles, "rows", lambda self: None)


@pytest.fixture(params=["parquet", "datasets"])
def streamed(request) -> type:
    """Each streamed-Parquet test runs on both readers; the class its split's rows have."""
    if request.param == "datasets":
        request.getfixturevalue("through_datasets")
        return datasets.IterableDataset
    return ParquetRows


def test_a_streamed_split_reads_only_the_needed_columns_and_counts_its_rows_from_the_footers(files, streamed):
    split = open_split(make_job([files.a, files.b], keep=["id"]))
    assert isinstance(split.rows, streamed)
    assert split.total == 17 and split.columns == ["text", "id"]
    tables = [table for _, table in split.parts(5, lambda index: True)]
    assert [table.column_names for table in tables] == [["text", "id"]] * 4
    assert [table.column("id").to_pylist() for table in tables] == [
        [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]


@pytest.mark.parametrize("spec, limit, ids, total", [
    ("train[3:9]", None, [3, 4, 5, 6, 7, 8], 6),
    ("train[12:]", None, [12, 13, 14, 15, 16], 5),
    ("train[:4]", None, [0, 1, 2, 3], 4),
    ("train[0:2]", None, [0, 1], 2),
    ("train[9:3]", None, [], 0),
    ("train[14:40]", None, [14, 15, 16], 3),
    ("train[3:9]", 2, [3, 4], 2),
    ("train", 5, [0, 1, 2, 3, 4], 5),
    ("train", 40, list(range(17)), 17),
])
def test_a_streamed_split_is_sliced_by_row_numbers_then_limited(files, streamed, spec, limit, ids, total):
    split = open_split(make_job([files.a, files.b], split=spec, keep=["id"]), limit=limit)
    assert isinstance(split.rows, streamed)
    assert ids_of(split) == ids
    assert split.total == total


def test_a_streamed_split_of_a_mapping_of_files_counts_the_chosen_splits_files(files, streamed):
    split = open_split(make_job({"train": files.a, "test": [files.b]}, split="test[2:]", keep=["id"]))
    assert isinstance(split.rows, streamed)
    assert ids_of(split) == [12, 13, 14, 15, 16]
    assert split.total == 5


def test_a_streamed_json_split_has_no_known_total(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"id": {i}, "text": "row {i}"}}\n' for i in range(5)))
    assert open_split(make_job(str(rows), path="json", keep=["id"])).total is None
    split = open_split(make_job(str(rows), path="json", keep=["id"]), limit=2)
    assert ids_of(split) == [0, 1] and split.total is None


def test_a_streamed_split_takes_its_total_from_the_dataset_card(tmp_path):
    """A dataset folder whose README states the split's size: no footer is read (the path is not `parquet`)."""
    write_rows(tmp_path / "rows.parquet", 0, 10)
    (tmp_path / "README.md").write_text(
        "---\ndataset_info:\n  splits:\n  - name: train\n    num_bytes: 100\n    num_examples: 10\n"
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: rows.parquet\n---\n")
    assert open_split(make_job(path=str(tmp_path))).total == 10
    split = open_split(make_job(path=str(tmp_path), split="train[4:]", keep=["id"]))
    assert split.total == 6 and ids_of(split) == [4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("spec, limit, ids", [
    ("train[10%:30%]", None, [1, 2]),
    ("train+test", None, list(range(17))),
    ("train", 4, [0, 1, 2, 3]),
    ("train", 40, list(range(10))),
])
def test_a_converted_split_takes_any_datasets_split_spec_then_the_limit(files, spec, limit, ids):
    data_files = {"train": files.a, "test": files.b}
    split = open_split(make_job(data_files, split=spec, streaming=False, keep=["id"]), limit=limit)
    assert isinstance(split.rows, datasets.Dataset)
    assert ids_of(split) == ids and split.total == len(ids)


def test_load_passes_the_jobs_dataset_keys_to_datasets(files, monkeypatch, through_datasets):
    calls = []
    load_dataset = datasets.load_dataset

    def recording(path, **kwargs):
        calls.append((path, dict(kwargs)))
        kwargs.pop("revision")  # a local builder has no revisions to choose from
        return load_dataset(path, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    split = open_split(make_job(files.a, split="train[1:3]", name="reviews", revision="v2"))
    assert calls == [("parquet", {"name": "reviews", "data_files": files.a, "split": "train", "revision": "v2",
                                  "streaming": True, "storage_options": None})]
    assert split.rows.info.config_name == "reviews"


@pytest.mark.parametrize("error, kind, message", [
    (FileNotFoundError("Unable to find 'x.parquet'"), UsageError,
     "dataset.data_files / dataset.path: Unable to find 'x.parquet'"),
    (pa.ArrowInvalid("Parquet magic bytes not found"), BatchrunError,
     "dataset 'parquet': a data file cannot be read: Parquet magic bytes not found (in {file})"),
    (ValueError("Unknown split \"validation\""), UsageError, "dataset 'parquet': Unknown split \"validation\""),
    (OSError("no route to host"), BatchrunError, "dataset 'parquet' could not be opened: no route to host"),
    (ConnectionError("refused"), BatchrunError, "dataset 'parquet' could not be opened: refused"),
])
def test_load_failures_become_one_plain_message(monkeypatch, files, error, kind, message):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(BatchrunError) as raised:
        open_split(make_job(files.a, streaming=False))  # a file that exists, read by datasets (which fails here)
    assert type(raised.value) is kind and str(raised.value) == message.format(file=files.a)
    assert raised.value.__cause__ is error


@pytest.mark.parametrize("streaming", [True, False])
def test_real_load_failures_are_classified(files, tmp_path, streaming):
    with pytest.raises(UsageError, match=r"^dataset.data_files: '.*nope.parquet' is not a file \(looked in "):
        open_split(make_job(str(tmp_path / "nope.parquet"), streaming=streaming))
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(Path(files.a).read_bytes()[:200])
    with pytest.raises(BatchrunError, match=r"^dataset 'parquet': a data file cannot be read: ") as raised:
        open_split(make_job(str(damaged), streaming=streaming))
    assert type(raised.value) is BatchrunError
    with pytest.raises(UsageError, match=r"^dataset 'parquet': .*validation"):
        open_split(make_job(files.a, split="validation", streaming=streaming))


def test_a_missing_column_is_named_with_the_columns_there_are(files):
    with pytest.raises(UsageError) as raised:
        open_split(make_job(files.a, input_column="body", keep=["id", "title"]))
    assert str(raised.value) == (
        "dataset 'parquet' (train) has no column 'body', 'title'; its columns are id, text, extra "
        "(check dataset.input_column, dataset.keep_columns, model.prompt and evaluate.reference_column)")


def test_columns_are_checked_only_when_the_source_knows_them():
    _check_columns(make_job(), None, ["text"])  # some streams learn their columns from the first row
    _check_columns(make_job(), ["id", "text"], ["text", "id"])


# --- the pieces of open_split --------------------------------------------------------------------------------


@pytest.mark.parametrize("job, columns", [
    (make_job(keep=["id"]), ["text", "id"]),
    (make_job(input_column="body", prompt="Review by {author}: {body} ({stars:.1f}) {{literal}}",
              keep=["id", "author"]), ["body", "author", "stars", "id"]),
    (make_job(task="image-classification", keep=["id"]), ["image", "id"]),
    (make_job(keep=["id", "gold"], reference="gold"), ["text", "id", "gold"]),  # the reference column: read once
    (make_job(keep=["id"], reference="label"), ["text", "id", "label"]),
])
def test_input_columns_are_the_input_the_prompts_fields_and_the_kept_ones_once_each(job, columns):
    assert input_columns(job) == columns


@pytest.mark.parametrize("spec, parsed", [
    ("train", ("train", None, None)),
    ("validation.clean", ("validation.clean", None, None)),
    ("train[100:200]", ("train", 100, 200)),
    ("train[:50]", ("train", None, 50)),
    ("train[10:]", ("train", 10, None)),
    ("train[0:5]", ("train", 0, 5)),
])
def test_a_streamed_split_spec_is_parsed_into_name_start_and_stop(spec, parsed):
    assert _streaming_slice(spec) == parsed


@pytest.mark.parametrize("spec", ["train[10%:20%]", "train+test", "train[:10]+test", "train[-5:]"])
def test_a_streamed_split_cannot_take_percentages_or_several_splits(spec):
    with pytest.raises(UsageError) as raised:
        _streaming_slice(spec)
    assert str(raised.value) == (
        f"dataset.split={spec!r}: a streamed split can be sliced only by row numbers (train[100:200]); "
        "for percentages or several splits set dataset.streaming: false")


def stream_with(splits) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(splits=splits))


CARD = {"train": datasets.SplitInfo(name="train", num_examples=100),
        "test": datasets.SplitInfo(name="test", num_examples=0)}


@pytest.mark.parametrize("splits, split, start, stop, counted, total", [
    (CARD, "train", None, None, None, 100),  # the card's size
    (CARD, "train", None, None, 7, 100),  # the card wins over the footers
    (CARD, "validation", None, None, 7, 7),  # not on the card: the footers
    (CARD, "test", None, None, 5, 5),  # a size of 0 on a card means unknown
    (None, "train", None, None, None, None),
    ({}, "train", None, None, 10, 10),
    (None, "train", 3, 8, 10, 5),
    (None, "train", 3, 50, 10, 7),
    (None, "train", None, 4, 10, 4),
    (None, "train", 12, None, 10, 0),
    (None, "train", 0, None, 10, 10),
    (CARD, "train", 95, 120, None, 5),
])
def test_known_size_of_a_slice(splits, split, start, stop, counted, total):
    assert _known_size(stream_with(splits), split, start, stop, counted) == total


def test_known_size_without_split_metadata():
    assert _known_size(SimpleNamespace(info=SimpleNamespace()), "train", 2, None, 10) == 8


def test_parquet_footers_count_files_globs_and_mappings_as_datasets_resolves_them(files, tmp_path):
    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    write_rows(nested / "c.parquet", 0, 3)

    def total(data_files, split="train", path="parquet"):
        found = find_parquet(path, data_files, split)
        return found.num_rows if found else None

    assert total(files.a) == 10
    assert total([files.a, files.b]) == 17
    assert total([files.a, str(tmp_path / "*.parquet")]) == 27  # a.parquet matched twice: datasets streams it twice
    assert total(str(tmp_path / "**" / "*.parquet")) == 20  # ** reaches any depth
    assert total({"train": files.a, "test": [files.b]}, split="test") == 7
    assert total({"train": files.a}, split="test") is None
    assert total(str(tmp_path / "none-*.parquet")) is None  # nothing matched: unknown, not 0
    assert total(None) is None
    assert total([]) is None
    assert total(files.a, path="json") is None
    assert total(["s3://bucket/rows.parquet", files.a]) is None  # not reachable from here: left to datasets
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    assert total([files.a, str(bad)]) is None  # unreadable here; datasets will say why


# --- Split.parts and PreparedParts -------------------------------------------------------------------------


def in_memory(count: int, streamed: bool) -> Split:
    rows = datasets.Dataset.from_dict({"id": list(range(count)), "text": [f"w{i} x" * (i % 3 + 1) for i in
                                                                          range(count)]})
    if streamed:
        rows = rows.to_iterable_dataset()
    return Split(rows.with_format("arrow"), count, ["text", "id"])


@pytest.mark.parametrize("streamed", [False, True])
def test_split_parts_are_consecutive_rows_and_unwanted_ones_are_skipped(streamed):
    asked = []

    def wanted(index):
        asked.append(index)
        return index != 1

    parts = [(index, table.column("id").to_pylist()) for index, table in in_memory(10, streamed).parts(4, wanted)]
    assert parts == [(0, [0, 1, 2, 3]), (2, [8, 9])]
    assert asked == [0, 1, 2]


class WordTask:
    """Stand-in task (tasks/base.py's Task): a row's token ids are the lengths of its words; a null text fails the
    row."""

    slice_rows = None

    def __init__(self, fail_on_id=None):
        self.fail_on_id = fail_on_id

    def encode(self, table: pa.Table) -> Encoded:
        if self.fail_on_id in table.column("id").to_pylist():
            raise ValueError(f"cannot encode row {self.fail_on_id}")
        texts = table.column("text").to_pylist()
        return Encoded([None if text is None else [len(word) for word in text.split()] for text in texts],
                       ["input column 'text' is null" if text is None else None for text in texts])

    def collate(self, encoded: Encoded, rows: list[int]) -> dict:
        longest = max(len(encoded.ids[row]) for row in rows)
        return {"input_ids": torch.tensor([encoded.ids[row] + [0] * (longest - len(encoded.ids[row]))
                                           for row in rows])}


LIMITS = BatchLimits(max_tokens=8, max_batch_size=2)


def test_prepare_part_packs_the_valid_rows_and_keeps_the_kept_columns():
    table = pa.table({"id": [7, 8, 9, 10, 11], "text": ["a bb ccc", None, "dd", "e f g h i j", "k"],
                      "other": [1, 2, 3, 4, 5]})
    part = prepare_part(3, 15, table, WordTask(), ["id"], LIMITS)
    assert (part.index, part.first_row, part.num_rows, part.tokens) == (3, 15, 5, 3 + 1 + 6 + 1)
    assert part.kept == pa.table({"id": [7, 8, 9, 10, 11]})
    assert part.encoded.errors == [None, "input column 'text' is null", None, None, None]
    # longest first: row 3 (6 tokens) alone, rows 0 and 2 (3 x 2 <= 8), then row 4 (at most 2 rows a batch)
    assert [batch["rows"] for batch in part.batches] == [[3], [0, 2], [4]]
    assert [batch["inputs"]["input_ids"].tolist() for batch in part.batches] == [
        [[1, 1, 1, 1, 1, 1]], [[1, 2, 3], [2, 0, 0]], [[1]]]


@pytest.mark.parametrize("pad_multiple, batches", [(1, [[0, 1]]), (8, [[0], [1]])])
def test_prepare_part_packs_with_the_padding_multiple(pad_multiple, batches):
    table = pa.table({"id": [0, 1], "text": ["a b c", "d e f"]})
    part = prepare_part(0, 0, table, WordTask(), [], BatchLimits(15, 8, pad_multiple))
    assert [batch["rows"] for batch in part.batches] == batches
    assert part.kept.num_columns == 0 and part.kept.num_rows == 2


def prepared(items) -> list:
    return [(item.index, item.first_row, item.kept.column("id").to_pylist()) if isinstance(item, PreparedPart)
            else item for item in items]


ME = "node-1-abc123"  # the worker id of the process whose parts are prepared


@pytest.fixture
def claims(tmp_path) -> Claims:
    """The process's claims, in a store of their own (the run's OUTPUT)."""
    return Claims(LocalStore(tmp_path / "out"), ME)


def parts_of(split, claims, rows_per_part: int = 3, skip=frozenset(), layout: Layout | None = None,
             task=None) -> PreparedParts:
    """PreparedParts over the share `layout` (one process by default) has of `split`, as the runner builds it."""
    total_parts = None if split.total is None else -(-split.total // rows_per_part)
    return PreparedParts(split, task or WordTask(), rows_per_part, ["id"], LIMITS,
                         Share(layout or Layout(), total_parts), claims, frozenset(skip))


def other_worker(store: LocalStore, worker: str, live: bool) -> None:
    """The record of another process (on another host, so no pid of this machine is probed): live with a heartbeat
    3 s old, gone with one an hour old."""
    now = time.time()
    record = {"worker": worker, "host": "another-node", "pid": 4242, "state": "running", "started": now - 3600,
              "heartbeat": now - (3 if live else 3600)}
    store.put(f".worker-{worker}.json", json.dumps(record).encode())


def claim_files(store: LocalStore) -> dict[str, str]:
    """{claim file: the worker it names}."""
    return {name: json.loads(store.get(name))["worker"] for name in store.names() if name.startswith(".claim-")}


@pytest.mark.parametrize("streamed", [False, True])
def test_in_the_main_process_every_part_not_skipped_is_claimed_and_prepared_then_the_part_count(claims, streamed):
    items = list(parts_of(in_memory(10, streamed), claims, skip={1}))
    assert prepared(items) == [(0, 0, [0, 1, 2]), (2, 6, [6, 7, 8]), (3, 9, [9]), EndOfSplit(4)]
    assert all(type(item.first_row) is int for item in items[:-1])
    # each prepared part is held until its commit releases it; a skipped (committed) part is never claimed
    assert claim_files(claims.store) == {".claim-000000.0": ME, ".claim-000002.0": ME, ".claim-000003.0": ME}


def test_a_slices_preparation_is_timed_in_wall_and_in_cpu_seconds(claims):
    """num_workers auto weighs both: a worker prepares on one thread what this process may prepare on several."""

    class Waiting(WordTask):
        def encode(self, table):
            time.sleep(0.3)  # wall time, no CPU
            return super().encode(table)

    class Threaded(WordTask):
        def encode(self, table):
            def spin():
                end = time.thread_time() + 0.25
                while time.thread_time() < end:
                    pass

            threads = [threading.Thread(target=spin) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return super().encode(table)

    waited = next(iter(parts_of(in_memory(3, False), claims, task=Waiting())))
    assert waited.seconds >= 0.3 and waited.cpu_seconds < 0.1
    spun = next(iter(parts_of(in_memory(3, False), Claims(claims.store, "other-1"), task=Threaded())))
    assert spun.cpu_seconds >= 0.5  # both threads' CPU time, however long the wall took


def test_a_part_is_prepared_in_slices_and_only_its_first_carries_the_reading(claims):
    class Sliced(WordTask):
        slice_rows = 2

    parts = parts_of(in_memory(5, False), claims, rows_per_part=5, task=Sliced())
    table = pa.table({"id": list(range(5)), "text": ["a b", "c", "d e f", "g", "h i"]})
    slices = list(parts._prepare(0, table, read="the read", read_seconds=10.0))
    assert [(piece.offset, piece.first_row, piece.num_rows, piece.part_rows) for piece in slices] == [
        (0, 0, 2, 5), (2, 2, 2, 5), (4, 4, 1, 5)]
    assert [piece.read for piece in slices] == ["the read", None, None]
    assert 10.0 <= slices[0].seconds < 11.0 and 10.0 <= slices[0].cpu_seconds < 11.0
    assert all(piece.seconds < 1.0 and piece.cpu_seconds < 1.0 for piece in slices[1:])


@pytest.mark.parametrize("worker, workers, skip, expected", [
    (0, 2, frozenset(), [0, 2]),
    (1, 2, frozenset(), [1, 3]),
    (1, 3, frozenset(), [1]),
    (0, 3, frozenset({3}), [0]),
])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_worker_prepares_every_wth_part_of_the_share(monkeypatch, claims, streamed, worker, workers, skip,
                                                      expected):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    items = list(parts_of(in_memory(10, streamed), claims, skip=skip))
    assert [item.index for item in items[:-1]] == expected
    assert items[-1] == EndOfSplit(4)  # every worker counts every part
    assert sorted(claim_files(claims.store)) == [f".claim-{index:06d}.0" for index in sorted(expected)]


@pytest.mark.parametrize("layout, worker, workers, streamed, expected", [
    # shard 1 of 2 of 4 parts is the block of parts 2 and 3, dealt to its workers in turn
    (Layout(shard_index=1, num_shards=2), 0, 1, False, [2, 3]),
    (Layout(shard_index=1, num_shards=2), 0, 2, False, [2]),
    (Layout(shard_index=1, num_shards=2), 1, 2, True, [3]),
    (Layout(shard_index=0, num_shards=3), 0, 1, True, [0]),  # parts 0-3 in three blocks: [0], [1], [2, 3]
    (Layout(shard_index=2, num_shards=3), 0, 1, False, [2, 3]),
    # rank 1 of 2 starts at the second half of the block; a stream is read in order whatever the rank
    (Layout(rank=1, world_size=2), 0, 1, False, [2, 3, 0, 1]),
    (Layout(rank=1, world_size=2), 0, 2, False, [2, 0]),
    (Layout(rank=1, world_size=2), 1, 2, False, [3, 1]),
    (Layout(rank=1, world_size=2), 0, 2, True, [0, 2]),
    (Layout(rank=1, world_size=2, shard_index=1, num_shards=2), 0, 1, False, [3, 2]),
])
def test_a_worker_prepares_its_share_of_a_shard_and_of_a_rank(monkeypatch, claims, layout, worker, workers,
                                                              streamed, expected):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    items = list(parts_of(in_memory(10, streamed), claims, layout=layout))
    assert [item.index for item in items[:-1]] == expected
    assert items[-1] == EndOfSplit(4)


@pytest.mark.parametrize("worker, workers, expected", [(0, 1, [1, 3]), (0, 2, [1]), (1, 2, [3])])
def test_a_stream_of_unknown_length_is_dealt_round_robin_to_the_shards(monkeypatch, claims, worker, workers,
                                                                       expected):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    split = in_memory(10, True)
    split.total = None
    items = list(parts_of(split, claims, layout=Layout(shard_index=1, num_shards=2)))
    assert [item.index for item in items[:-1]] == expected
    assert items[-1] == EndOfSplit(4)  # read through: the stream's length is known now


@pytest.mark.parametrize("streamed", [False, True])
def test_parts_claimed_by_another_live_process_are_left_to_it(claims, streamed):
    store = claims.store
    other_worker(store, "node-2-def456", live=True)
    store.create(".claim-000001.0", json.dumps({"worker": "node-2-def456", "claimed": 0}).encode())
    store.create(".claim-000003.0", json.dumps({"worker": "node-2-def456", "claimed": 0}).encode())
    items = list(parts_of(in_memory(10, streamed), claims))
    assert prepared(items) == [(0, 0, [0, 1, 2]), (2, 6, [6, 7, 8]), EndOfSplit(4)]
    assert claim_files(store) == {".claim-000000.0": ME, ".claim-000001.0": "node-2-def456",
                                  ".claim-000002.0": ME, ".claim-000003.0": "node-2-def456"}


@pytest.mark.parametrize("streamed", [False, True])
def test_parts_claimed_by_a_process_that_is_gone_are_taken_over(claims, streamed):
    store = claims.store
    other_worker(store, "node-2-def456", live=False)
    store.create(".claim-000001.0", json.dumps({"worker": "node-2-def456", "claimed": 0}).encode())
    items = list(parts_of(in_memory(10, streamed), claims))
    assert [item.index for item in items[:-1]] == [0, 1, 2, 3]
    assert claim_files(store) == {".claim-000000.0": ME, ".claim-000001.0": "node-2-def456",
                                  ".claim-000001.1": ME, ".claim-000002.0": ME, ".claim-000003.0": ME}


@pytest.mark.parametrize("streamed", [False, True])
def test_a_part_committed_after_the_skip_list_was_made_is_released_and_not_prepared(claims, streamed):
    """Another process committed part 1 (and released its claim) after this process listed OUTPUT: the claim
    succeeds, but the part is there. Every generation of its claim goes, the stale one it took over included."""
    store = claims.store
    other_worker(store, "node-2-def456", live=False)
    store.create(".claim-000002.0", json.dumps({"worker": "node-2-def456", "claimed": 0}).encode())
    store.put(part_name(1), b"committed by another process")
    store.put(part_name(2), b"committed by a process that died before removing its claim")
    items = list(parts_of(in_memory(10, streamed), claims))
    assert prepared(items) == [(0, 0, [0, 1, 2]), (3, 9, [9]), EndOfSplit(4)]
    assert claim_files(store) == {".claim-000000.0": ME, ".claim-000003.0": ME}


def counted_stream(rows: int, read: list) -> Split:
    """A stream of `rows` rows, known to be that long, that appends the id of every row it yields to `read`."""
    def generate():
        for index in range(rows):
            read.append(index)
            yield {"id": index, "text": f"w{index}"}
    return Split(datasets.IterableDataset.from_generator(generate).with_format("arrow"), rows, ["text", "id"])


@pytest.mark.parametrize("layout, expected, last_row_read", [
    (Layout(shard_index=0, num_shards=3), [0], 5),  # 5 parts in blocks [0], [1, 2], [3, 4]: read up to part 1
    (Layout(shard_index=1, num_shards=3), [1, 2], 11),
    (Layout(shard_index=2, num_shards=3), [3, 4], 12),  # the last block reads the stream to its end
    (Layout(), [0, 1, 2, 3, 4], 12),
])
def test_a_stream_of_known_length_stops_reading_after_the_shards_last_part(claims, layout, expected, last_row_read):
    read = []
    items = list(parts_of(counted_stream(13, read), claims, layout=layout))
    assert [item.index for item in items[:-1]] == expected
    assert items[-1] == EndOfSplit(5)  # the whole split's parts, though not all were read
    assert read == list(range(last_row_read + 1))


def test_a_shard_with_an_empty_block_reads_nothing_past_the_first_part(claims):
    read = []
    items = list(parts_of(counted_stream(3, read), claims, layout=Layout(shard_index=0, num_shards=2)))
    assert items == [EndOfSplit(1)]  # one part for two shards: shard 1 has it
    assert read == [0, 1, 2] and claim_files(claims.store) == {}


def test_an_empty_split_has_no_parts(claims):
    assert list(parts_of(in_memory(0, False), claims)) == [EndOfSplit(0)]


def test_a_part_that_fails_is_named_in_one_message_and_ends_the_worker(claims):
    items = list(parts_of(in_memory(10, False), claims, task=WordTask(fail_on_id=7)))
    assert prepared(items[:2]) == [(0, 0, [0, 1, 2]), (1, 3, [3, 4, 5])]
    assert items[2:] == [SourceFailure("reading part 2 failed: ValueError: cannot encode row 7")]


class Unreadable:
    random_access = False
    total = None

    def parts(self, rows_per_part, wanted):
        raise OSError("connection reset")
        yield  # a generator, like Split.parts


class UnreadablePart(Split):
    """Random access whose reads of part 1 fail (a truncated file, a dropped connection)."""

    def read_part(self, index, rows_per_part):
        if index == 1:
            raise OSError("connection reset")
        return super().read_part(index, rows_per_part)


def test_a_source_that_fails_before_its_first_part_names_part_0(claims):
    items = list(parts_of(Unreadable(), claims))
    assert items == [SourceFailure("reading part 0 failed: OSError: connection reset")]


def test_a_random_access_read_that_fails_names_its_part(claims):
    split = in_memory(10, False)
    items = list(parts_of(UnreadablePart(split.rows, split.total, split.columns), claims))
    assert prepared(items[:1]) == [(0, 0, [0, 1, 2])]
    assert items[1:] == [SourceFailure("reading part 1 failed: OSError: connection reset")]


def failing_stream(rows: int):
    def generate():
        for index in range(rows):
            yield {"id": index, "text": f"w{index}"}
        raise OSError("connection reset")
    return Split(datasets.IterableDataset.from_generator(generate).with_format("arrow"), None, ["text", "id"])


def test_a_streamed_part_that_fails_to_read_is_named(claims):
    items = list(parts_of(failing_stream(7), claims))
    assert prepared(items[:2]) == [(0, 0, [0, 1, 2]), (1, 3, [3, 4, 5])]
    assert items[2:] == [SourceFailure("reading part 2 failed: OSError: connection reset")]  # rows 6-8


@pytest.mark.parametrize("skip", [{1}, {0, 1}])
def test_a_streamed_part_that_fails_to_read_after_skipped_parts_is_named(claims, skip):
    items = list(parts_of(failing_stream(7), claims, skip=skip))
    assert prepared(items[:-1]) == [(0, 0, [0, 1, 2])] * (0 not in skip)
    assert items[-1] == SourceFailure("reading part 2 failed: OSError: connection reset")


def test_a_streamed_part_that_fails_after_a_part_held_by_another_process_is_named(claims):
    other_worker(claims.store, "node-2-def456", live=True)
    claims.store.create(".claim-000001.0", json.dumps({"worker": "node-2-def456", "claimed": 0}).encode())
    items = list(parts_of(failing_stream(7), claims))
    assert prepared(items[:-1]) == [(0, 0, [0, 1, 2])]
    assert items[-1] == SourceFailure("reading part 2 failed: OSError: connection reset")


def test_claims_travel_to_dataloader_workers(claims):
    """DataLoader workers get the dataset pickled (or forked): the claims must survive it and claim as this worker."""
    copy = pickle.loads(pickle.dumps(claims))
    assert (copy.worker_id, copy.store.root) == (ME, claims.store.root)
    assert copy.claim(0) is True and claims.claim(0) is True  # the same worker's claim
    assert claim_files(claims.store) == {".claim-000000.0": ME}


# --- the DataLoader ------------------------------------------------------------------------------------------


def test_the_loader_hands_over_prepared_parts_unchanged_in_the_main_process(monkeypatch, claims):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    parts = parts_of(in_memory(5, False), claims)
    loader = part_loader(parts, num_workers=0, pin_memory=False)
    assert (loader.dataset, loader.batch_size, loader.num_workers, loader.collate_fn, loader.pin_memory,
            loader.prefetch_factor, loader.worker_init_fn) == (parts, None, 0, _pass_through, False, None, None)
    assert prepared(loader) == [(0, 0, [0, 1, 2]), (1, 3, [3, 4]), EndOfSplit(2)]
    assert "TOKENIZERS_PARALLELISM" not in loader_module.os.environ


def test_the_loader_with_workers_quiets_them_and_the_tokenizers_thread_pool(monkeypatch, claims):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    parts = parts_of(in_memory(5, False), claims)
    loader = part_loader(parts, num_workers=2, pin_memory=True)
    assert (loader.batch_size, loader.num_workers, loader.collate_fn, loader.pin_memory, loader.prefetch_factor,
            loader.worker_init_fn) == (None, 2, _pass_through, True, 2, _quiet_worker)
    assert loader_module.os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_a_worker_uses_one_thread():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _quiet_worker(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
