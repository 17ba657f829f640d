"""`batching.num_workers: auto`: how many preprocessing workers pay for themselves, measured on the run itself.

The run starts with no workers, so that preparing (read, tokenize, pack, pad) happens in the model's process and
its time can be told apart from the model's. Once enough is measured, `choose_workers` weighs the two: a worker
takes preparation off the model's process, but on a CPU it also takes a core the model's matmuls would use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("batchrun")
MEASURE_SECONDS = 2.0  # preparation + model time measured before deciding: a few batches, past the first one's warm-up
MARGIN = 0.05  # more workers only when the estimate is clearly better: each costs memory, start-up and IPC
MAX_WORKERS = 8


def choose_workers(prepare_seconds: float, compute_seconds: float, cores: int, model_threads: int,
                   device_type: str, prepare_cpu_seconds: float | None = None) -> int:
    """The worker count with the shortest estimated time per row, preferring fewer unless more are >5% faster.

    With no workers a row costs prepare + compute in one process. With k workers preparation runs beside the
    model, so a row costs the slower of the two: the preparation's CPU time / k (the workers sharing it, each on one
    thread, where the model's process may have prepared on several: image decoding threads, the tokenizers' pool),
    and compute, which on a CPU slows by the cores the workers take from the model's threads (each busy worker
    holds one core). An accelerator barely uses the CPU, so there the model keeps its speed and only the cores
    bound the count."""
    if prepare_seconds <= 0 or cores < 2:
        return 0
    threads = max(1, min(model_threads, cores))
    one_worker = prepare_seconds if prepare_cpu_seconds is None else max(prepare_seconds, prepare_cpu_seconds)

    def estimate(workers: int) -> float:
        if workers == 0:
            return prepare_seconds + compute_seconds
        slowdown = 1.0 if device_type != "cpu" else threads / min(threads, cores - workers)
        return max(one_worker / workers, compute_seconds * slowdown)

    best = 0
    for workers in range(1, min(cores - 1, MAX_WORKERS) + 1):  # the model's process keeps a core
        if estimate(workers) < estimate(best) * (1 - MARGIN):
            best = workers
    return best


def usable_cores(local_processes: int) -> int:
    """The cores this process may use: those it may run on, shared with the other processes of a launch here."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_processes))


@dataclass
class WorkerChoice:
    """num_workers auto in one run: seconds measured with no workers, then the count chosen (None until then)."""

    prepare_seconds: float = 0.0
    compute_seconds: float = 0.0
    prepare_cpu_seconds: float = 0.0
    rows: int = 0
    chosen: int | None = None

    def measure(self, prepare_seconds: float, compute_seconds: float, rows: int,
                prepare_cpu_seconds: float | None = None) -> None:
        self.prepare_seconds += prepare_seconds
        self.compute_seconds += compute_seconds
        self.prepare_cpu_seconds += prepare_seconds if prepare_cpu_seconds is None else prepare_cpu_seconds
        self.rows += rows

    def enough(self) -> bool:
        return self.prepare_seconds + self.compute_seconds >= MEASURE_SECONDS

    def decide(self, cores: int, model_threads: int, device_type: str) -> int:
        self.chosen = choose_workers(self.prepare_seconds, self.compute_seconds, cores, model_threads, device_type,
                                     self.prepare_cpu_seconds)
        return self.chosen

    def describe(self, cores: int) -> str:
        share = self.prepare_seconds / max(self.prepare_seconds + self.compute_seconds, 1e-9)
        return (f"num_workers auto: {self.chosen} (preparing rows took {100 * share:.0f}% of the time with none, "
                f"{self.rows} rows measured, {cores} cores)")


class WorkerCount:
    """batching.num_workers in one run: a number kept as it is, or auto: none while measuring, then the count
    chosen, once, at a part boundary."""

    def __init__(self, setting):
        self.choice = WorkerChoice() if setting == "auto" else None  # measure with none first: preparing is timed
        self.workers = 0 if setting == "auto" else setting  # DataLoader workers of the next pass

    @property
    def measuring(self) -> bool:
        return self.choice is not None and self.choice.chosen is None

    def measure(self, prepare_seconds: float, compute_seconds: float, rows: int, prepare_cpu_seconds: float) -> None:
        if self.measuring:
            self.choice.measure(prepare_seconds, compute_seconds, rows, prepare_cpu_seconds)

    def switch(self, local_processes: int, model_threads: int, device_type: str, length_known: bool,
               outstanding) -> bool:
        """At a part boundary with no part half computed: once enough is measured, choose the count. True when the
        pass should end here for one with workers. It can: with no workers the parts are prepared lazily, in this
        process, so the loader has claimed nothing beyond the part just committed. `outstanding`: the parts of the
        share left, asked only when it matters."""
        choice = self.choice
        if choice is None:
            return False
        if choice.chosen is None:
            if not choice.enough():
                return False
            cores = usable_cores(local_processes)
            self.workers = choice.decide(cores, model_threads, device_type)
            log.info(choice.describe(cores), extra={"event": "workers_chosen", "num_workers": self.workers})
            if self.workers and not length_known:
                # a stream of unknown length: one more part with none first. If there is none, its end comes
                # without a claim and names the length, and a split of one part does not start workers for nothing
                return False
        self.choice = None  # decided: measured no more
        # with every part of the share committed, workers would start for nothing
        return self.workers > 0 and (not length_known or bool(outstanding()))
