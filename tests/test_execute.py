"""PartRunner on stand-in tasks: batches in order, failing rows isolated by bisection with their reason, out of
memory lowering the token budget and re-packing the batches still to come, and the progress it reports."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from pipeline_core import execute
from pipeline_core.data.loader import BatchLimits, prepare_part
from pipeline_core.execute import PartRunner, StopFlag, TokenBudget, _empty_cache, is_out_of_memory
from pipeline_core.tasks.text import Encoded

CPU = torch.device("cpu")


class SumTask:
    """Stand-in task: row r's token ids are r + 1, `length` times; the model sums each row's ids.

    It records the rows of every collate and forward call; `fail(rows, inputs)` may raise to fail a forward pass.
    """

    def __init__(self, fail=None):
        self.fail = fail or (lambda rows, inputs: None)
        self.collated: list[list[int]] = []
        self.forwarded: list[list[int]] = []

    def encode(self, table: pa.Table) -> Encoded:
        lengths = table.column("length").to_pylist()
        return Encoded([[row + 1] * length for row, length in enumerate(lengths)], [None] * len(lengths))

    def collate(self, encoded: Encoded, rows: list[int]) -> dict:
        self.collated.append(list(rows))
        longest = max(len(encoded.ids[row]) for row in rows)
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for position, row in enumerate(rows):
            length = len(encoded.ids[row])
            ids[position, :length] = torch.tensor(encoded.ids[row])
            mask[position, :length] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, model, inputs: dict):
        rows = (inputs["input_ids"][:, 0] - 1).tolist()
        self.forwarded.append(rows)
        self.fail(rows, inputs)
        return model(inputs["input_ids"])

    def decode(self, outputs, inputs: dict, encoded: Encoded, rows: list[int]) -> dict:
        return {"sum": outputs.tolist(), "real_tokens": inputs["attention_mask"].sum(dim=1).tolist(),
                "length": [len(encoded.ids[row]) for row in rows]}


def row_sums(ids: torch.Tensor) -> torch.Tensor:
    return ids.sum(dim=1)


def part_of(task: SumTask, lengths: list[int], max_batch_size: int, first_row: int = 0, max_tokens: int = 10_000):
    """A prepared part (as a worker hands it over) with rows of these lengths; the task's records start empty."""
    part = prepare_part(0, first_row, pa.table({"length": lengths}), task, [],
                        BatchLimits(max_tokens=max_tokens, max_batch_size=max_batch_size))
    task.collated.clear()
    return part


def out_of_memory_over(limit: int):
    def fail(rows, inputs):
        if inputs["input_ids"].numel() > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return fail


@pytest.fixture
def cache_calls(monkeypatch) -> list:
    """The devices whose cache the runner emptied."""
    calls = []
    monkeypatch.setattr(execute, "_empty_cache", calls.append)
    return calls


def test_batches_run_in_packed_order_and_report_rows_and_real_tokens():
    task = SumTask()
    part = part_of(task, [3, 5, 2, 4], max_batch_size=2)
    assert [batch["rows"] for batch in part.batches] == [[1, 3], [0, 2]]  # longest first
    reported = []
    results = PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag(),
                         on_batch=lambda rows, tokens: reported.append((rows, tokens))).run(part)
    assert results == [
        ([1, 3], {"sum": [2 * 5, 4 * 4], "real_tokens": [5, 4], "length": [5, 4]}),
        ([0, 2], {"sum": [1 * 3, 3 * 2], "real_tokens": [3, 2], "length": [3, 2]}),
    ]
    assert reported == [(2, 9), (2, 5)]  # real tokens, not the padded 10 and 6
    assert task.collated == []  # within the budget, the worker's tensors are used as they are
    assert part.encoded.errors == [None] * 4
    # without on_batch, the same results
    assert PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag()).run(part) == results


def test_inputs_are_copied_to_the_device_without_blocking(monkeypatch):
    """Pinned batches are copied asynchronously, so the copy overlaps the previous batch's compute."""
    copies = []
    to = torch.Tensor.to

    def recording_to(tensor, *args, **kwargs):
        copies.append((args, kwargs))
        return to(tensor, *args, **kwargs)

    task = SumTask()
    part = part_of(task, [3, 2], max_batch_size=2)
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag()).run(part)
    assert copies == [((CPU,), {"non_blocking": True})] * 2  # input_ids and attention_mask


def test_bisection_isolates_exactly_the_failing_rows_with_their_reason(caplog):
    def fail(rows, inputs):
        if {2, 5} & set(rows):
            raise ValueError("bad row")

    task = SumTask(fail)
    part = part_of(task, [3] * 8, max_batch_size=8, first_row=10)
    reported = []
    runner = PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag(),
                        on_batch=lambda rows, tokens: reported.append((rows, tokens)))
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        results = runner.run(part)
    assert task.forwarded == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3], [0, 1], [2, 3], [2], [3],
                              [4, 5, 6, 7], [4, 5], [4], [5], [6, 7]]
    assert [rows for rows, _ in results] == [[0, 1], [3], [4], [6, 7]]
    assert results[1] == ([3], {"sum": [4 * 3], "real_tokens": [3], "length": [3]})
    reason = "forward pass failed: ValueError: bad row"
    assert part.encoded.errors == [None, None, reason, None, None, reason, None, None]
    assert reported == [(2, 6), (1, 3), (1, 3), (2, 6)]
    assert runner.budget.lowered == []  # not out of memory: the budget stays
    assert caplog.messages == ["row 12 failed in the forward pass: ValueError: bad row",
                               "row 15 failed in the forward pass: ValueError: bad row"]


def test_a_long_reason_is_cut_to_1000_characters_in_the_row_and_200_in_the_log(caplog):
    def fail(rows, inputs):
        raise RuntimeError("x" * 3000)

    task = SumTask(fail)
    part = part_of(task, [4], max_batch_size=1)
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        assert PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag()).run(part) == []
    assert part.encoded.errors == [("forward pass failed: RuntimeError: " + "x" * 3000)[:1000]]
    assert len(part.encoded.errors[0]) == 1000
    assert caplog.messages == ["row 0 failed in the forward pass: " + ("RuntimeError: " + "x" * 3000)[:200]]


def test_out_of_memory_splits_the_batch_lowers_the_budget_and_repacks_the_next_batches(caplog, cache_calls):
    task = SumTask(out_of_memory_over(14))
    part = part_of(task, [7] * 6, max_batch_size=3)
    assert [batch["rows"] for batch in part.batches] == [[0, 1, 2], [3, 4, 5]]  # 21 padded tokens each
    reported = []
    runner = PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag(),
                        on_batch=lambda rows, tokens: reported.append((rows, tokens)))
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        results = runner.run(part)
    assert runner.budget.max_tokens == 10 and runner.budget.lowered == [10]  # min(100, 21) // 2
    assert cache_calls == [CPU]
    assert caplog.messages == ["out of device memory at 21 padded tokens: batching.max_tokens is now 10 for this run"]
    # the failed batch is bisected; the next one, packed for the old budget, is re-packed for the new one
    assert task.forwarded == [[0, 1, 2], [0], [1, 2], [3], [4], [5]]
    assert task.collated == [[0], [1, 2], [3], [4], [5]]
    assert [rows for rows, _ in results] == [[0], [1, 2], [3], [4], [5]]
    assert [values["sum"] for _, values in results] == [[7], [14, 21], [28], [35], [42]]
    assert reported == [(1, 7), (2, 14), (1, 7), (1, 7), (1, 7)]
    assert part.encoded.errors == [None] * 6


def test_a_batch_at_exactly_the_budget_and_a_single_row_over_it_run_as_packed():
    task = SumTask()
    part = part_of(task, [5, 5, 40], max_batch_size=2, max_tokens=10)
    assert [batch["rows"] for batch in part.batches] == [[2], [0, 1]]
    results = PartRunner(task, row_sums, CPU, TokenBudget(10), StopFlag()).run(part)
    assert [rows for rows, _ in results] == [[2], [0, 1]]
    assert task.collated == []  # neither the 40-token row alone nor the 10-token pair is re-packed


def test_a_batch_over_a_lowered_budget_is_repacked_with_its_row_lengths():
    task = SumTask()
    part = part_of(task, [6, 2, 2, 1], max_batch_size=4)
    assert [batch["rows"] for batch in part.batches] == [[0, 1, 2, 3]]  # 24 padded tokens
    results = PartRunner(task, row_sums, CPU, TokenBudget(8), StopFlag()).run(part)
    # pack_batches([6, 2, 2, 1], max_tokens=8, max_batch_size=4): 6 alone, then 2 x 3 rows
    assert task.collated == [[0], [1, 2, 3]]
    assert [rows for rows, _ in results] == [[0], [1, 2, 3]]
    assert results[1][1]["real_tokens"] == [2, 2, 1]


def test_a_row_out_of_memory_even_alone_fails_with_that_reason(caplog, cache_calls):
    task = SumTask(out_of_memory_over(20))
    part = part_of(task, [30, 4], max_batch_size=2, first_row=5)
    runner = PartRunner(task, row_sums, CPU, TokenBudget(100), StopFlag())
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        results = runner.run(part)
    assert task.forwarded == [[0, 1], [0], [1]]
    assert runner.budget.lowered == [30, 15]  # min(100, 60) // 2, then min(30, 30) // 2
    assert cache_calls == [CPU, CPU]
    assert part.encoded.errors == ["forward pass failed: out of device memory even alone", None]
    assert [rows for rows, _ in results] == [[1]]
    assert caplog.messages[-1] == "row 5 failed in the forward pass: out of device memory even alone"


def test_the_budget_halves_the_smaller_of_itself_and_the_failed_batch_and_never_drops_below_one(caplog):
    budget = TokenBudget(1000)
    with caplog.at_level(logging.WARNING, logger="batchrun"):
        for failed in (101, 300, 3, 1):
            budget.lower(failed)
    assert budget.lowered == [50, 25, 1, 1] and budget.max_tokens == 1
    assert all(type(value) is int for value in budget.lowered)
    assert caplog.messages == [
        f"out of device memory at {failed} padded tokens: batching.max_tokens is now {now} for this run"
        for failed, now in [(101, 50), (300, 25), (3, 1), (1, 1)]
    ]


@pytest.mark.parametrize("error, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (torch.OutOfMemoryError("allocation failed"), True),  # by its type, whatever it says
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), True),  # by its message
    (RuntimeError("HIP error: Out Of Memory"), True),
    (RuntimeError("index out of range in self"), False),
    (ValueError("bad row"), False),
])
def test_out_of_memory_is_recognised_by_type_or_by_message(error, expected):
    assert is_out_of_memory(error) is expected


def test_empty_cache_calls_the_device_backends_empty_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch, "fakedev", SimpleNamespace(empty_cache=lambda: emptied.append("fakedev")),
                        raising=False)
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: emptied.append("cpu"), raising=False)
    _empty_cache(SimpleNamespace(type="fakedev"))
    assert emptied == ["fakedev"]
    _empty_cache(None)  # a device that does not say its type is taken for the CPU
    assert emptied == ["fakedev", "cpu"]


@pytest.mark.parametrize("backend", [None, SimpleNamespace(), SimpleNamespace(empty_cache=None)])
def test_empty_cache_does_nothing_without_a_callable_backend(monkeypatch, backend):
    if backend is not None:
        monkeypatch.setattr(torch, "fakedev", backend, raising=False)
    _empty_cache(SimpleNamespace(type="fakedev" if backend is not None else "no_such_backend"))
    _empty_cache(CPU)  # torch.cpu has no empty_cache
