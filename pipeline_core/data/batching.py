"""Dynamic batching: pack one part's rows into batches under a padded-token budget.

Rows are taken longest first, so each batch holds rows of similar length (little padding) and the batch most
likely to run out of memory comes first. A batch costs (its longest row) x (its rows) padded tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


def padded_length(length: int, multiple: int) -> int:
    """Round up to a multiple (8 on CUDA, where tensor cores want aligned shapes)."""
    return -(-length // multiple) * multiple


def pack_batches(
    lengths: Sequence[int], max_tokens: int, max_batch_size: int, pad_multiple: int = 1
) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches of at most max_batch_size rows and max_tokens padded tokens.

    A row longer than the whole budget gets a batch of its own rather than being dropped.
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in order:
        length = padded_length(max(lengths[index], 1), pad_multiple)
        grown = max(longest, length) * (len(batch) + 1)
        if batch and (len(batch) >= max_batch_size or grown > max_tokens):
            batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, length)
    if batch:
        batches.append(batch)
    return batches


def padding_cost(lengths: Sequence[int], batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a batching: how much compute goes to padding."""
    real = sum(lengths)
    padded = sum(max(lengths[index] for index in batch) * len(batch) for batch in batches)
    return real, padded
