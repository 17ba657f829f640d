"""Running one prepared part's batches on the device, so that one bad row never costs its neighbours.

A batch whose forward pass fails is bisected until the failing rows stand alone; they get the reason in
`error`, the rest succeed. Out of device memory, a batch is split and the token budget lowered for the rest of
the run. A stop request (SIGTERM / SIGINT) ends the part between batches, or mid-generation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from pipeline_core.data.batching import pack_batches
from pipeline_core.signals import StopFlag

log = logging.getLogger("batchrun")


class Interrupted(Exception):
    """A stop was requested; the part being run is incomplete and must not be committed."""


@dataclass
class TokenBudget:
    """batching.max_tokens, lowered for the rest of the run after an out-of-memory error."""

    max_tokens: int
    lowered: list[int] = field(default_factory=list)

    def lower(self, failed_tokens: int) -> None:
        self.max_tokens = max(1, min(self.max_tokens, failed_tokens) // 2)
        self.lowered.append(self.max_tokens)
        log.warning("out of device memory at %d padded tokens: batching.max_tokens is now %d for this run",
                    failed_tokens, self.max_tokens, extra={"event": "out_of_memory", "max_tokens": self.max_tokens})


def token_budget(setting, device) -> int:
    """batching.max_tokens: auto is 4096 on a CPU, where cache-sized batches ran 27% faster than 16384
    (benchmarks/RESULTS.md), and 16384 on accelerators, which need large batches to fill."""
    if setting != "auto":
        return setting
    return 4096 if device.type == "cpu" else 16384


@dataclass
class Computed:
    """A slice computed in this process: done as soon as it is submitted."""

    results: list[tuple[list[int], dict]]

    def done(self) -> bool:
        return True


class PartRunner:
    """Runs parts' batches on one model and device, with the run's token budget and stop flag.

    work.py hands it slices with `submit` and takes their rows back with `result`, the seam a server's runner
    (engines/served.py) shares: in this process a slice is computed when submitted, so nothing is held ahead."""

    ahead = 0  # slices submitted before the oldest is waited on

    def __init__(self, task, model, device, budget: TokenBudget, stop: StopFlag, on_batch=None):
        self.task, self.model, self.device = task, model, device
        self.budget, self.stop = budget, stop
        self.on_batch = on_batch or (lambda rows, tokens: None)
        # per batch run: (ended, seconds, rows, real tokens, padded tokens); the run's metrics take them per slice
        self.measured: list[tuple[float, float, int, int, int]] = []

    def take_measured(self) -> list[tuple[float, float, int, int, int]]:
        measured, self.measured = self.measured, []
        return measured

    def take_requests(self) -> None:
        """A server's request figures; this process sends none."""
        return None

    def submit(self, part) -> Computed:
        return Computed(self.run(part))

    def result(self, submitted: Computed) -> list[tuple[list[int], dict]]:
        return submitted.results

    def run(self, part) -> list[tuple[list[int], dict]]:
        """Per batch, (part positions, task columns). Failed rows get their reason in part.encoded.errors."""
        results: list = []
        for batch in part.batches:
            for rows, inputs in self._within_budget(batch, part):
                if self.stop.requested:
                    raise Interrupted
                self._run_rows(rows, inputs, part, results)
        return results

    def _within_budget(self, batch: dict, part):
        """The batch as packed by the worker, or re-packed here if an OOM lowered the budget since."""
        rows, inputs = batch["rows"], batch["inputs"]
        if batch_cost(inputs, rows) <= self.budget.max_tokens or len(rows) == 1:
            yield rows, inputs
            return
        lengths = [part.encoded.length(row) for row in rows]
        for group in pack_batches(lengths, self.budget.max_tokens, len(rows)):
            subset = [rows[position] for position in group]
            yield subset, self.task.collate(part.encoded, subset)

    def _run_rows(self, rows: list[int], inputs: dict, part, results: list) -> None:
        started = time.perf_counter()
        try:
            moved = {name: tensor.to(self.device, non_blocking=True) for name, tensor in inputs.items()}
            with torch.inference_mode():
                outputs = self.task.forward(self.model, moved)
                values = self.task.decode(outputs, moved, part.encoded, rows)
        except Exception as error:  # noqa: BLE001 - a failure of these rows is recorded on the rows
            if self.stop.requested:
                raise Interrupted from error
            self._recover(error, rows, inputs, part, results)
            return
        if self.stop.requested:  # generation may have been cut short by the stop: these outputs are incomplete
            raise Interrupted
        results.append((rows, values))
        real, padded = padding(inputs)
        self.measured.append((time.time(), time.perf_counter() - started, len(rows), real, padded))
        self.on_batch(len(rows), real)

    def _recover(self, error: Exception, rows: list[int], inputs: dict, part, results: list) -> None:
        out_of_memory = is_out_of_memory(error)
        if out_of_memory:
            self.budget.lower(batch_cost(inputs, rows))
            _empty_cache(self.device)
        if len(rows) == 1:
            reason = "out of device memory even alone" if out_of_memory else f"{type(error).__name__}: {error}"
            part.encoded.errors[rows[0]] = f"forward pass failed: {reason}"[:1000]
            log.warning("row %d failed in the forward pass: %s", part.first_row + rows[0], reason[:200],
                        extra={"event": "row_failed", "row": part.first_row + rows[0], "part": part.index})
            return
        half = len(rows) // 2
        for subset in (rows[:half], rows[half:]):
            self._run_rows(subset, self.task.collate(part.encoded, subset), part, results)


def batch_cost(inputs: dict, rows: list[int]) -> int:
    """What a batch costs in the token budget: its padded tokens; a batch of images, one per image (every image is
    resized to the same size, so the images in a batch are what its memory grows with)."""
    ids = inputs.get("input_ids")
    return ids.numel() if ids is not None else len(rows)


def padding(inputs: dict) -> tuple[int, int]:
    """(real tokens, padded tokens) of a batch: its attention mask's ones and its input tensor's size, padding
    included. (0, 0) for inputs that are not token sequences (images)."""
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if ids is None:
        return 0, 0
    return (int(mask.sum()) if mask is not None else ids.numel()), ids.numel()


def is_out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _empty_cache(device) -> None:
    backend = getattr(torch, getattr(device, "type", "cpu"), None)
    empty = getattr(backend, "empty_cache", None)
    if callable(empty):
        empty()
