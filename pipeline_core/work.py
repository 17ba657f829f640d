"""This process's share of the job: claim parts, compute them slice by slice, commit each whole, wait on parts others
hold, and, when the job is whole, finish it.

Passes over the share run until every part of it is committed, by this process or by others: a pass walks the
share's parts, skipping those committed or claimed by a live process; a holder that dies is taken over on the next
pass. The last process to see every part committed takes the finish claim and writes _SUCCESS (run_dir.finish).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from pipeline_core.data.loader import (
    BatchLimits,
    EndOfSplit,
    PreparedPart,
    PreparedParts,
    SourceFailure,
    part_loader,
    workers_started,
)
from pipeline_core.data.source import Split, kept_columns
from pipeline_core.data.workers import WorkerCount
from pipeline_core.errors import EXIT_OK, EXIT_TOO_MANY_ERRORS, BatchrunError
from pipeline_core.evaluation import Evaluation, score_parts
from pipeline_core.execute import Interrupted, PartRunner, StopFlag
from pipeline_core.layout import Share
from pipeline_core.manifest import Job
from pipeline_core.output.claims import FINISH, Worker
from pipeline_core.output.metrics import RunMetrics
from pipeline_core.output.parts import assemble_part
from pipeline_core.output.progress import Progress
from pipeline_core.output.run_dir import (
    SUCCESS,
    PartFacts,
    RunDir,
    commit_part,
    committed_parts,
    first_few,
    worker_records,
)

log = logging.getLogger("batchrun")
WAIT_POLL_SECONDS = 2.0  # how often a process whose share is held by others looks again


@dataclass
class Work:
    """This process's share of the job: claim parts, compute and commit them, then, if last, finish the job."""

    job: Job
    run_dir: RunDir
    split: Split
    task: object
    share: Share
    limits: BatchLimits
    runner: PartRunner
    progress: Progress
    stop: StopFlag
    fingerprint: str
    worker: Worker
    metrics: RunMetrics | None = None  # what this process measures, written per part (output/metrics.py)
    evaluation: Evaluation | None = None  # how parts are scored, when the job has an evaluate section
    output_totals: dict = field(default_factory=dict)  # rows and failed rows of OUTPUT's parts, once finished
    pending: dict = field(default_factory=dict)  # {part: {slice offset: computed table}} of parts in progress
    workers: WorkerCount = None  # DataLoader workers of the next pass (num_workers auto: chosen once measured)
    in_flight: deque = field(default_factory=deque)  # (slice, submitted, when) handed to the runner, oldest first

    def __post_init__(self) -> None:
        self.workers = WorkerCount(self.job.get("batching.num_workers"))

    @property
    def store(self):
        return self.run_dir.store

    def compute_share(self, started: float, loaded: float) -> None:
        """Passes over the share until every part of it is committed, by this process or others."""
        try:
            self._passes(started, loaded)
        except Interrupted:
            self._finish_whole()  # a stop: the slices whose answers are all in still count
            raise

    def _passes(self, started: float, loaded: float) -> None:
        first, waiting = True, False
        while True:
            switched = False
            with closing(_until_stopped(self._loader(), self.stop)) as items:
                for item in items:
                    if first and isinstance(item, PreparedPart):  # how long skipping committed parts took
                        log.info("first part to compute (part %d) ready %.1fs after the run started, %.2fs after "
                                 "the model was loaded", item.index, time.monotonic() - started,
                                 time.monotonic() - loaded, extra={"event": "first_part", "part": item.index})
                        first = False
                    if isinstance(item, EndOfSplit):
                        if self.share.total_parts is None or item.parts > self.share.total_parts:
                            self.share.total_parts = item.parts  # a stream of unknown length has been read through
                        continue
                    if isinstance(item, SourceFailure):
                        raise item.error(self.job)
                    self._take(item)
                    if not self.pending and not self.in_flight and self._switch_workers():
                        switched = True
                        break
                self._drain()  # the pass is read through: the slices still in flight are what is left of it
            if switched:
                continue  # a stream of unknown length may have parts left that _outstanding cannot name yet
            outstanding = self._outstanding()
            if not outstanding:
                return
            if any(self.worker.claims.available(index) for index in outstanding):
                continue  # a holder is gone: another pass takes its parts over
            if not waiting:
                log.info("waiting for %d parts held by other processes (%s)", len(outstanding),
                         first_few(outstanding), extra={"event": "waiting", "parts": outstanding[:100]})
                waiting = True
            if self.stop.wait(WAIT_POLL_SECONDS):
                raise Interrupted

    def _loader(self):
        done = committed_parts(self.store.names())
        parts = PreparedParts(self.split, self.task, self.job.get("output.rows_per_part"),
                              kept_columns(self.job), self.limits, self.share, self.worker.claims,
                              frozenset(done))
        return part_loader(parts, self.workers.workers, pin_memory=self.runner.device.type == "cuda")

    def _switch_workers(self) -> bool:
        return self.workers.switch(self.share.layout.local_world_size, torch.get_num_threads(),
                                   self.runner.device.type, self.share.total_parts is not None, self._outstanding)

    def _take(self, part: PreparedPart) -> None:
        """Hand one slice to the runner; finish the slices handed over before it, beyond what the runner keeps
        ahead (in this process, none: each slice is computed when handed over)."""
        started = time.perf_counter()  # computing the slice, in this process, happens in submit
        self.in_flight.append((part, self.runner.submit(part), started))
        while len(self.in_flight) > self.runner.ahead:
            self._finish_slice(*self.in_flight.popleft())

    def _drain(self) -> None:
        while self.in_flight:
            self._finish_slice(*self.in_flight.popleft())

    def _finish_whole(self) -> None:
        """After a stop: finish the slices in flight whose rows all have their answers, oldest first."""
        while self.in_flight and self.in_flight[0][1].done():
            try:
                self._finish_slice(*self.in_flight.popleft())
            except Interrupted:  # rows of it were never sent
                break
        self.in_flight.clear()

    def _finish_slice(self, part: PreparedPart, submitted, started: float) -> None:
        """A slice's rows, in row order; once a part's slices are all computed, commit the part."""
        slices = self.pending.setdefault(part.index, {})
        slices[part.offset] = _compute_slice(part, self.runner.result(submitted), self.job, self.progress,
                                             self.runner.task.columns)
        if self.metrics is not None:
            self.metrics.slice_done(part.index, slices[part.offset], self.runner.take_measured(),
                                    time.perf_counter() - started, part.seconds if not self.workers.workers else 0.0,
                                    part.encoded.truncated_rows, self.runner.take_requests())
        if part.read is not None:
            self.progress.input_read(part.read)
        if sum(table.num_rows for table in slices.values()) >= part.part_rows:
            del self.pending[part.index]
            self._commit(part.index, slices)
        # the commit too is measured: it stays in this process
        self.workers.measure(part.seconds, time.perf_counter() - started, part.num_rows, part.cpu_seconds)

    def _commit(self, index: int, slices: dict[int, pa.Table]) -> None:
        # the part's metrics first: a part is never committed without them, and one killed in between is redone
        measured = self.metrics.write_part(self.store, index) if self.metrics is not None else {}
        facts = _commit_whole_part(index, slices, self.job, self.store, self.fingerprint, self.evaluation)
        self.worker.claims.release(index, done=True)
        committed = committed_parts(self.store.names())  # one listing for both figures
        parts, rows, peers = self._share_figures(committed)
        if self.share.layout.num_shards > 1:
            self.progress.job = self._job_figures(committed)
        self.progress.part_committed(facts.failed_rows, parts, rows, peers)
        self.worker.beat()  # its figures, fresh for status and for the others' rates
        log.info("committed part %d (%d rows, %d failed)", index, facts.rows, facts.failed_rows,
                 extra={"event": "part_committed", "json_only": True, "part": index, "rows": facts.rows,
                        "failed_rows": facts.failed_rows, "seconds": measured.get("seconds"),
                        **self.progress.fields()})

    def _outstanding(self) -> list[int]:
        committed = committed_parts(self.store.names())
        if self.share.total_parts is None:
            return []
        return [index for index in range(self.share.total_parts)
                if self.share.includes(index) and index not in committed]

    def _share_figures(self, committed: set[int]) -> tuple[int, int, float]:
        """(parts, rows) of this share committed by every process, and the other live processes' rows/s."""
        mine = [index for index in committed if self.share.includes(index)]
        rows_per_part = self.job.get("output.rows_per_part")
        parts, rows = len(mine), sum(part_rows(index, self.split.total, rows_per_part) for index in mine)
        peers = sum(record.get("rows_per_second") or 0 for record in worker_records(self.store)
                    if record["live"] and record.get("worker") != self.worker.id
                    and record.get("shard_index") == self.share.layout.shard_index)
        return parts, rows, peers

    def _job_figures(self, committed: set[int]) -> dict:
        """The whole job's committed parts and rows, for `_progress.json` written by one shard."""
        rows_per_part = self.job.get("output.rows_per_part")
        total_rows = self.split.total
        return {"parts_done": len(committed),
                "parts_total": self.share.total_parts if total_rows is not None else None,
                "rows_done": sum(part_rows(index, total_rows, rows_per_part) for index in committed),
                "rows_total": total_rows}

    def finish(self) -> int:
        """Every part of the share is committed. The process that sees the whole job committed writes _SUCCESS,
        exactly once even when processes finish together; the exit code judges the rows of this share."""
        rows_per_part = self.job.get("output.rows_per_part")
        total = self.share.total_parts
        done = self.run_dir.verified_parts(self.fingerprint, rows_per_part, self.split.offset)
        damaged = [index for index in self.share.parts() if index not in done]
        if damaged:  # removed by verified_parts: committed, then damaged or replaced by another job's file
            raise BatchrunError(f"{first_few(damaged)} of {self.store} were damaged after being committed and "
                                "have been removed; rerun the same command to compute them again")
        own = [facts for index, facts in done.items() if self.share.includes(index)]
        self.output_totals = {"output_rows": sum(f.rows for f in done.values()),
                              "output_failed_rows": sum(f.failed_rows for f in done.values())}
        read = self.progress.input
        log.info("%s computed %d parts (%d rows) here%s", self.share.layout.describe(), self.progress.parts_here,
                 self.progress.rows_this_run, f"; read {read.rows} input rows in {read.row_groups} row groups "
                 f"({read.bytes / 1e6:.1f} MB)" if read is not None else "",
                 extra={"event": "share_done", "parts": self.progress.parts_here, "rows": self.progress.rows_this_run})
        if total == 0:  # a nightly partition may be empty: that is a finished run, not a failure
            log.warning("dataset %r split %s has no rows: a run of 0 rows", self.job.get("dataset.path"),
                        self.job.get("dataset.split"))
        if set(range(total)) <= set(done) and self._finish_claimed():
            try:
                self._finish_job(done, total)
            except BaseException:
                self.worker.claims.release(FINISH, done=False)  # another process may finish the job
                raise
            self.worker.claims.release(FINISH, done=True)
            own = list(done.values())
        elif self.share.layout.num_shards > 1 and not self.store.exists(SUCCESS):
            log.info("%s done: %d parts; the job completes when every shard has finished",
                     self.share.layout.describe(), len(own), extra={"event": "shard_done", "parts": len(own)})
        return exit_for_errors(sum(f.failed_rows for f in own), sum(f.rows for f in own),
                               self.job.get("errors.max_error_rate"))

    def _finish_claimed(self) -> bool:
        if self.store.exists(SUCCESS) or not self.worker.claims.claim(FINISH):
            return False
        if self.store.exists(SUCCESS):  # written by the holder we took the claim over from, or just before
            self.worker.claims.release(FINISH, done=True)
            return False
        return True

    def _finish_job(self, done: dict, total: int) -> None:
        progress = self.progress
        snapshot = progress.complete(total, sum(facts.rows for facts in done.values()),
                                     sum(facts.failed_rows for facts in done.values()))
        scores = score_parts(self.evaluation, self.store, done) if self.evaluation is not None else None
        if scores is not None:
            self.output_totals["evaluation"] = scores
        if self.run_dir.finish(done, total, snapshot, scores):
            log.info("done: %s; wrote %s", progress.line(), SUCCESS, extra={"event": "done", **progress.fields(),
                                                                       "failed_rows": progress.failed_rows})
        else:  # the output is complete either way; the claim should have made this impossible
            log.warning("%s appeared while this process held the finish claim: another process judged it dead "
                        "(check the hosts' clocks)", SUCCESS)


def exit_for_errors(failed_rows: int, rows: int, max_error_rate: float) -> int:
    fields = {"failed_rows": failed_rows, "rows": rows}
    if rows and failed_rows / rows > max_error_rate:
        log.warning("%d of %d rows failed (%.2f%%), above errors.max_error_rate=%s", failed_rows, rows,
                    100 * failed_rows / rows, max_error_rate, extra={"event": "too_many_failed_rows", **fields})
        return EXIT_TOO_MANY_ERRORS
    if failed_rows:
        log.info("%d of %d rows failed; see the error column", failed_rows, rows,
                 extra={"event": "failed_rows", **fields})
    return EXIT_OK


def _until_stopped(loader, stop: StopFlag):
    """The loader's items until a stop is requested; workers killed by the same Ctrl-C end it quietly too."""
    with workers_started():
        iterator = iter(loader)
    try:
        while True:
            if stop.requested:
                raise Interrupted
            try:
                item = next(iterator)
            except StopIteration:
                return
            except RuntimeError:
                if stop.requested:
                    raise Interrupted from None
                raise
            yield item
    finally:
        # the DataLoader iterator shuts its workers down when it goes; the exception's traceback would keep it (and
        # workers still claiming parts ahead) alive while the stopped run gives its claims back
        del iterator


def _compute_slice(part, results: list, job: Job, progress: Progress, columns: dict) -> pa.Table:
    """A computed slice's rows, assembled in row order."""
    failed = [row for row, error in enumerate(part.encoded.errors) if error is not None]
    if failed and job.get("errors.on_error") == "fail":
        row = failed[0]
        raise BatchrunError(f"row {part.first_row + row} failed: {part.encoded.errors[row]} (errors.on_error: fail)")
    progress.advance(len(part.encoded.errors) - sum(len(rows) for rows, _ in results), 0)
    return assemble_part(part, results, columns)


def _commit_whole_part(index: int, slices: dict[int, pa.Table], job: Job, store, run_fingerprint: str,
                       evaluation: Evaluation | None = None) -> PartFacts:
    table = pa.concat_tables([slices[offset] for offset in sorted(slices)])
    statistics = evaluation.part_statistics(table) if evaluation is not None else None
    commit_part(store, index, table, job.get("output.compression"), run_fingerprint, statistics)
    return PartFacts(index, table.num_rows, table.num_rows - table.column("error").null_count, statistics)


def part_rows(index: int, total_rows: int | None, rows_per_part: int) -> int:
    if total_rows is None:
        return rows_per_part
    return max(0, min(rows_per_part, total_rows - index * rows_per_part))
