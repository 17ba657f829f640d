"""Preprocessing in DataLoader workers: each worker claims parts of the process's share and prepares them in slices.

A source with random access (Parquet files, a converted split) is read only where a claimed part lies; a stream is
read through, preparing only the claimed parts. A prepared part holds its rows' encodings and the padded tensors
of its length-sorted batches, ready for the device; the model's process only runs forward passes and writes. Every
worker ends with a marker saying how many parts the split has.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import torch

from pipeline_core.data.batching import pack_batches
from pipeline_core.data.files import one_line
from pipeline_core.data.parquet import ReadStats
from pipeline_core.data.parse_errors import is_parse_error
from pipeline_core.data.source import Split, broken_file_note, unparsable
from pipeline_core.errors import BatchrunError
from pipeline_core.layout import Share
from pipeline_core.manifest import Job
from pipeline_core.output.run_dir import part_name
from pipeline_core.signals import STOP_SIGNALS

if TYPE_CHECKING:  # the contract the loader needs of a task, and nothing of any one task
    from pipeline_core.tasks.base import Encoding

# A part is prepared and handed over in slices of this many rows, each length-sorted into batches on its own: a part
# of 50,000 rows starts computing once its first slice is tokenized (0.3 s here), not all of it (4.3 s), and a
# worker's prefetch holds slices rather than whole parts. At the default rows_per_part a part is one slice. A task
# may say a number of its own (`slice_rows`): an image row is its pixels, 600 KB at 224x224, not a few tokens.
SLICE_ROWS = 4096


@dataclass
class PreparedPart:
    """A prepared slice of part `index` (the whole part when it has at most SLICE_ROWS rows)."""

    index: int
    first_row: int
    num_rows: int
    kept: pa.Table  # the keep_columns of the part's rows, in input order (possibly no columns)
    encoded: Encoding
    batches: list[dict]  # {"rows": positions in the part, "inputs": {name: tensor}}
    tokens: int  # real (unpadded) input tokens
    read: ReadStats | None = None  # what reading the part cost (row groups, rows, bytes), where the source counts
    offset: int = 0  # the slice's first row within the part
    part_rows: int = 0  # rows of the whole part: it is complete when its slices hold that many
    seconds: float = 0.0  # preparing the slice (and, for a part read on its own, reading it): num_workers auto
    cpu_seconds: float = 0.0  # the same in CPU time, all of this process's threads: one worker's time alone


@dataclass
class EndOfSplit:
    parts: int  # how many parts the split has in all


@dataclass
class SourceFailure:
    """A worker could not read or prepare its data (a truncated file, an unreachable source). Raised as an
    exception it would reach the user wrapped in the worker's traceback; as an item it becomes one message."""

    message: str
    unparsable: bool = False  # the reader failed on the bytes themselves (parse_errors.is_parse_error)

    @classmethod
    def of(cls, index: int | None, error: Exception) -> SourceFailure:
        return cls(f"reading part {index} failed: {type(error).__name__}: {one_line(str(error))}",
                   is_parse_error(error))

    def error(self, job: Job) -> BatchrunError:
        """What the run ends with: exit 2 naming the file and line for data that cannot be parsed, else exit 1 (a
        retry may read it), naming the file that fails where the local files tell. Committed parts stay."""
        if self.unparsable:
            return unparsable(job, self.message, "; committed parts are kept")
        return BatchrunError(f"dataset {job.get('dataset.path')!r}: {self.message}"
                             f"{broken_file_note(job, self.message)}; committed parts are kept")


@dataclass
class BatchLimits:
    max_tokens: int
    max_batch_size: int
    pad_multiple: int = 1


class PreparedParts(torch.utils.data.IterableDataset):
    """The parts of this process's share that it claims, prepared. Worker w of W tries every W-th part of the
    share's order, so the workers of one process never meet; other processes are kept off by the claims."""

    def __init__(self, split: Split, task, rows_per_part: int, keep_columns: list[str] | dict[str, str],
                 limits: BatchLimits, share: Share, claims, skip: frozenset[int] = frozenset()):
        self.split = split
        self.task = task
        self.rows_per_part = rows_per_part
        self.keep_columns = keep_columns
        self.limits = limits
        self.share = share
        self.claims = claims
        self.skip = skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.split.random_access:
            yield from self._read_share(worker, workers)
        else:
            yield from self._read_through(worker, workers)

    def _read_share(self, worker: int, workers: int):
        """Random access: read only the parts this worker claims, nothing of the rest."""
        order = self.share.order()
        index = None
        try:
            for position, index in enumerate(order):
                if position % workers == worker and index not in self.skip and self._claim(index):
                    before, started = self.split.reads(), time.perf_counter()
                    table = self.split.read_part(index, self.rows_per_part)
                    cost = self.split.reads() - before
                    yield from self._prepare(index, table, cost if cost.row_groups else None,  # zero: not counted
                                             time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 - reported by the main process as one plain message
            yield SourceFailure.of(index, error)
            return
        yield EndOfSplit(self.share.total_parts)

    def _read_through(self, worker: int, workers: int):
        """A source read in sequence: every part is read, only the claimed ones are prepared."""
        # `current` is the part being read or prepared, named if it fails: a stream reads part i before asking
        # whether it is wanted, so after a part is skipped or handed over, the next one is the current one
        seen, current, last = 0, 0, self.share.last()

        def wanted(index: int) -> bool:
            nonlocal seen, current
            if last is not None and index > last:
                raise _PastShare
            seen = max(seen, index + 1)
            mine = (self.share.includes(index) and self._position(index) % workers == worker
                    and index not in self.skip and self._claim(index))
            current = index if mine else index + 1
            return mine

        try:
            for index, table in self.split.parts(self.rows_per_part, wanted):
                yield from self._prepare(index, table, None)
                current = index + 1
        except _PastShare:
            seen = self.share.total_parts
        except Exception as error:  # noqa: BLE001 - reported by the main process as one plain message
            yield SourceFailure.of(current, error)
            return
        yield EndOfSplit(seen)

    def _position(self, index: int) -> int:
        """The part's place in the share, which deals the share's parts to this process's workers in turn."""
        if self.share.round_robin:
            return index // self.share.layout.num_shards
        return index - self.share.parts().start

    def _claim(self, index: int) -> bool:
        """Claim the part, unless it was committed meanwhile (its committer may have released its claim already)."""
        if not self.claims.claim(index):
            return False
        if self.claims.store.exists(part_name(index)):
            self.claims.release(index, done=True)
            return False
        return True

    def _prepare(self, index: int, table: pa.Table, read, read_seconds: float = 0.0):
        """The part in slices of SLICE_ROWS rows, each prepared and handed over as soon as it is ready. A stream's
        reading is not timed: it is cheap beside tokenizing (about 1 us a row), and it runs through parts not
        prepared here too, on a rerun above all, which would make preparing look dearer than it is."""
        slice_rows = self.task.slice_rows or SLICE_ROWS  # images: fewer, each row is large
        for offset in range(0, max(table.num_rows, 1), slice_rows):
            started, cpu_started = time.perf_counter(), time.process_time()
            piece = table.slice(offset, slice_rows)
            first_row = self.split.offset + index * self.rows_per_part + offset  # row ids count the unsliced split
            part = prepare_part(index, first_row, piece, self.task, self.keep_columns, self.limits)
            part.offset, part.part_rows = offset, table.num_rows
            part.read = read if offset == 0 else None
            reading = read_seconds if offset == 0 else 0.0
            part.seconds = time.perf_counter() - started + reading
            part.cpu_seconds = time.process_time() - cpu_started + reading
            yield part


class _PastShare(Exception):
    """A sequential read has passed the share's last part: the rest of the stream is not this process's."""


def prepare_part(index: int, first_row: int, table: pa.Table, task, keep_columns: list[str] | dict[str, str],
                 limits: BatchLimits) -> PreparedPart:
    """`keep_columns`: the columns to carry, or {column: its name in the output}."""
    encoded = task.encode(table)
    valid = [row for row, error in enumerate(encoded.errors) if error is None]
    lengths = [encoded.length(row) for row in valid]
    packed = pack_batches(lengths, limits.max_tokens, limits.max_batch_size, limits.pad_multiple)
    batches = []
    for batch in packed:
        rows = [valid[position] for position in batch]
        batches.append({"rows": rows, "inputs": task.collate(encoded, rows)})
    kept = table.select(list(keep_columns))
    if isinstance(keep_columns, dict):
        kept = kept.rename_columns(list(keep_columns.values()))
    return PreparedPart(index, first_row, table.num_rows, kept, encoded, batches, sum(lengths))


def _pass_through(item):
    return item


def _quiet_worker(_worker_id: int) -> None:
    # The model's process owns the cores for its matmuls; a worker tokenizing with many threads would fight it.
    torch.set_num_threads(1)
    # Stopping is the model process's decision: launchers (torchrun) and Slurm signal the whole process group, and a
    # worker dead of that SIGTERM would end the run with "DataLoader worker killed" before it could commit and exit
    # 75. The model process shuts its workers down itself; they also exit when it dies.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the fork (workers_started): now ignored



@contextmanager
def workers_started():
    """Around starting the workers (iter(loader) forks them): SIGTERM and SIGINT are held, and a forked worker
    inherits them held, until its _quiet_worker ignores them. Between the fork and _quiet_worker torch installs a
    SIGTERM handler of its own that ends the worker, and a launcher's SIGTERM to the process group landing there
    failed the run with "DataLoader worker killed by signal". A signal held here reaches the model process after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def part_loader(parts: PreparedParts, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    if num_workers:
        # forked workers must not inherit a running Rust thread pool (the tokenizers library warns, then serialises)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return torch.utils.data.DataLoader(
        parts,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_pass_through,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=_quiet_worker if num_workers else None,
    )
