"""Dynamic batching: both limits hold, every row lands in exactly one batch, sorting cuts padding."""

from __future__ import annotations

import random

import pytest

from pipeline_core.data.batching import pack_batches, padded_length, padding_cost


def random_lengths(count: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.choice([generator.randint(1, 30), generator.randint(30, 500)]) for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_tokens, max_batch_size, multiple", [(2048, 64, 1), (512, 8, 8), (100, 1000, 1)])
def test_limits_hold_and_every_row_is_batched_once(seed, max_tokens, max_batch_size, multiple):
    lengths = random_lengths(300, seed)
    batches = pack_batches(lengths, max_tokens, max_batch_size, multiple)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= max_batch_size
        longest = max(padded_length(lengths[index], multiple) for index in batch)
        assert longest * len(batch) <= max_tokens or len(batch) == 1


def test_a_row_over_the_budget_runs_alone():
    assert pack_batches([10, 5000, 10], max_tokens=100, max_batch_size=8) == [[1], [0, 2]]


def test_longest_rows_come_first_and_ties_keep_input_order():
    assert pack_batches([3, 9, 3, 9], max_tokens=18, max_batch_size=4) == [[1, 3], [0, 2]]


def test_sorting_reduces_padding_against_arrival_order():
    lengths = random_lengths(2000, seed=7)
    sorted_batches = pack_batches(lengths, max_tokens=4096, max_batch_size=64)
    real, sorted_padded = padding_cost(lengths, sorted_batches)
    # the same number of rows per batch, in arrival order, as a hand-written loop would do
    size = max(len(batch) for batch in sorted_batches)
    arrival = [list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]
    _, arrival_padded = padding_cost(lengths, arrival)
    assert sorted_padded < 1.25 * real
    assert arrival_padded > 2 * sorted_padded


def test_pad_multiple_rounds_up():
    assert [padded_length(n, 8) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]
    assert pack_batches([9, 9], max_tokens=32, max_batch_size=8, pad_multiple=8) == [[0, 1]]
    assert pack_batches([9, 9], max_tokens=31, max_batch_size=8, pad_multiple=8) == [[0], [1]]


def test_empty_and_one_token_rows_cost_one_token_each():
    assert pack_batches([0, 1, 1], max_tokens=3, max_batch_size=8) == [[1, 2, 0]]
    assert pack_batches([0, 1, 1], max_tokens=2, max_batch_size=8) == [[1, 2], [0]]
