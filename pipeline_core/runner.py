"""The run: initialize once, stream prepared parts from the workers, run their batches, commit each part.

Resuming is part-wise: a part whose file is committed is never recomputed, so a rerun of the same command
finishes the job with the rows, values and order of an uninterrupted run. The same holds across processes: each
claims the parts it computes (output/claims.py), so any number of processes, launched together or as shards,
in any layout from one attempt to the next, write one OUTPUT; the last to see every part committed writes _SUCCESS.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from contextlib import closing
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from pipeline_core import __version__
from pipeline_core.data.loader import (
    BatchLimits,
    EndOfSplit,
    PreparedPart,
    PreparedParts,
    SourceFailure,
    part_loader,
    workers_started,
)
from pipeline_core.data.source import Split, kept_columns, open_split, split_name
from pipeline_core.data.workers import WorkerChoice, usable_cores
from pipeline_core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TOO_MANY_ERRORS, BatchrunError, UsageError
from pipeline_core.evaluation import EVAL, Evaluation, read_scores, score_parts, write_scores
from pipeline_core.execute import Interrupted, PartRunner, StopFlag, TokenBudget
from pipeline_core.heap import HeapTrimmer
from pipeline_core.initializer import initialize, plan_summary
from pipeline_core.initializer.embedding import EmbeddingSettings, resolve_embedding
from pipeline_core.initializer.preview import ModelPreview, preview_model
from pipeline_core.layout import Layout, Share, check_device_map
from pipeline_core.manifest import Job
from pipeline_core.output import PROGRESS, RUN_INFO, SUCCESS
from pipeline_core.output.claims import (
    CLAIM_PATTERN,
    FINISH,
    WORKER_PATTERN,
    OutputBusy,
    Worker,
    is_leftover,
    worker_records,
)
from pipeline_core.output.identity import differences, fingerprint, identity
from pipeline_core.output.lock import refuse_if_locked
from pipeline_core.output.metrics import RunMetrics, is_metrics, summary_line
from pipeline_core.output.parts import (
    PartFacts,
    assemble_part,
    changed_since_finished,
    commit_part,
    committed_parts,
    part_name,
    part_sizes,
    read_part_facts,
)
from pipeline_core.output.progress import Progress
from pipeline_core.output.provenance import input_provenance, model_provenance
from pipeline_core.output.run_info import read_run_info
from pipeline_core.output.store import Store, open_store
from pipeline_core.remote import redacted
from pipeline_core.signals import StopOnSignals
from pipeline_core.tasks import build_task

log = logging.getLogger("batchrun")
WAIT_POLL_SECONDS = 2.0  # how often a process whose share is held by others looks again
RANK_0_TIMEOUT = 600.0  # how long other ranks wait for rank 0 to prepare OUTPUT (it loads no model first)


@dataclass
class RunOptions:
    limit: int | None = None
    fresh: bool = False
    progress_bar: bool | None = None  # None: a bar when stderr is a terminal
    layout: Layout = field(default_factory=Layout)
    started: float = field(default_factory=time.monotonic)  # when the command started: the summary's wall time


def run_job(job: Job, options: RunOptions) -> int:
    store = open_store(job.get("output.path"), job.get("output.storage_options"))
    if not store.exclusive_create:
        log.warning("%s has no exclusive create, so claims cannot keep several processes apart: run one process at "
                    "a time on this OUTPUT (a local directory, s3://, gs:// and az:// have one)", store)
    layout = options.layout
    check_device_map(job.get("model.device_map"), layout)
    refuse_fresh_for_a_shard(options.fresh, layout)  # the options alone tell: before any file is read
    run_identity, embedding = job_identity(job, options.limit)  # a pattern that matches nothing: exit 2 now
    evaluation = Evaluation.from_manifest(job.config)  # ROUGE without its package: exit 2 now
    with StopOnSignals() as stop:
        # the dataset is opened and every column the job reads checked before OUTPUT is touched and before any weights
        # load: a misspelt file or column exits 2 in seconds, whatever the model's size, and its fix needs no --fresh
        split = open_split(job, options.limit)
        preview = preview_model(job)  # the model's files, its chat template and length limit, before OUTPUT too
        checked = None
        if not stop.requested:  # a signal during start-up (imports, reading the manifest) stops before OUTPUT
            if layout.rank == 0:
                checked = prepare_output(store, run_identity, options.fresh, layout)
            else:
                checked = wait_for_rank_0(store, run_identity, stop, layout)
        if stop.requested:  # also one that came while --fresh discarded OUTPUT: it completed, nothing more started
            log.warning("stopped by %s before starting; rerun the same command to resume", stop.signal_name)
            return EXIT_INTERRUPTED
        finished, run_identity = checked  # the identity OUTPUT's run recorded: its parts carry its fingerprint
        if finished:
            log.info("%s already holds this finished run; nothing to do", store, extra={"event": "already_finished"})
            code = finished_exit_code(store, job)
            if evaluation is not None and not _scored_as_asked(read_scores(store), evaluation):
                _score_finished_run(store, evaluation, run_identity)  # unscored, removed, or other metrics asked for
            _log_finished_summary(store, options, code)
            return code
        # the record comes before the model loads: rank 0's tells the other ranks that OUTPUT is ready
        with Worker(store, layout.labels()) as worker:
            try:
                code = _run(job, options, store, split, run_identity, stop, worker, embedding, evaluation, preview)
            except BaseException:
                _give_back_claims(worker)
                worker.beat(state="stopped")
                raise
            if code == EXIT_INTERRUPTED:
                worker.beat(state="stopped")
        if store.exists(SUCCESS):
            worker.retire()
        return code


def _give_back_claims(worker: Worker) -> None:
    """After a failure, the parts this process claimed ahead go back, where the store lets them: when it fails again
    (the server that failed the run is still gone), the run's own error is the one to report, and the claims are
    taken over once this process is seen to be gone."""
    try:
        worker.claims.release_all()
    except BatchrunError as error:
        log.warning("could not give back this process's claims (%s)", error)


def job_identity(job: Job, limit: int | None) -> tuple[dict, EmbeddingSettings | None]:
    """The run's identity, and feature-extraction's settings: they may come from the checkpoint, so they are
    resolved (from its JSON files, before any weights load) and recorded as what they resolved to. The model's and
    the input's provenance join it (file metadata, no weights read), so a change in place is caught on resume."""
    embedding = resolve_embedding(job) if job.get("task") == "feature-extraction" else None
    values = identity(job, limit, embedding.identity() if embedding else None)
    values["model.resolved"] = model_provenance(job)
    values["input.resolved"] = input_provenance(job, split_name(job.get("dataset.split")))
    return values, embedding


def prepare_output(store: Store, run_identity: dict, fresh: bool, layout: Layout) -> tuple[bool, dict]:
    """Before any model loads: --fresh, leftovers, the job's identity against OUTPUT's, and batchrun's own lock: a
    live process of another start at work on this share refuses this one with exit 75 (a finished job is still
    reported as finished). (finished, the identity in force: the one OUTPUT's run recorded, else this job's)."""
    if fresh:
        refuse_fresh_for_a_shard(fresh, layout)
        _discard(store)
    remove_leftovers(store)
    finished, recorded = _run_in_output(store, run_identity)
    if not finished:
        refuse_if_locked(store, layout.labels())
    if recorded is not None:
        return finished, recorded
    info = {"fingerprint": fingerprint(run_identity), "identity": run_identity, "started": _now()}
    if not store.create(RUN_INFO, json.dumps(info, indent=2, default=str).encode()):
        finished, recorded = _run_in_output(store, run_identity)  # another process created it first: this job's?
    return finished, recorded or run_identity


def refuse_fresh_for_a_shard(fresh: bool, layout: Layout) -> None:
    if fresh and layout.num_shards > 1:
        raise UsageError("--fresh with --num-shards would discard the other shards' parts; "
                         "discard OUTPUT once before starting the shards (or use a new output.path)")


def finished_exit_code(store: Store, job: Job) -> int:
    """A rerun of a finished job exits as the run did: 3 when its failed rows exceed errors.max_error_rate (so a
    scheduler's retry of a run that exited 3 does not turn it green), else 0. The totals are those _batchrun.json
    recorded when the run finished; runs finished before it recorded them are counted from the part footers."""
    info = read_run_info(store)
    rows, failed_rows = _recorded_totals(info)
    if rows is None:
        done = verified_parts(store, info.get("fingerprint"), job.get("output.rows_per_part"), split_start=None)
        rows, failed_rows = sum(f.rows for f in done.values()), sum(f.failed_rows for f in done.values())
    return _exit_for_errors(failed_rows, rows, job.get("errors.max_error_rate"))


def wait_for_rank_0(store: Store, run_identity: dict, stop: StopFlag,
                    layout: Layout | None = None) -> tuple[bool, dict] | None:
    """Ranks other than 0 wait until rank 0 has prepared OUTPUT (its --fresh must not discard their parts): the
    live worker record of their launch's rank 0 says so, or _SUCCESS when it found the job finished. Then the same
    identity check, and prepare_output's answer. No collective operation: a rank 0 that fails makes the launcher
    stop the group. Meanwhile another start's live process on this share refuses them as it refuses rank 0 (exit
    75): on another node the launcher may not stop them at once. None when stopped."""
    deadline = time.monotonic() + RANK_0_TIMEOUT
    labels = layout.labels() if layout is not None else {}
    while True:
        records = worker_records(store)
        if store.exists(SUCCESS) or any(record["live"] and record.get("rank") == 0
                                        and record.get("launch") == labels.get("launch")
                                        and record.get("attempt") == labels.get("attempt") for record in records):
            break
        if layout is not None:
            refuse_if_locked(store, labels, records)
        if time.monotonic() > deadline:
            raise BatchrunError(f"rank 0 did not start writing {store} within {RANK_0_TIMEOUT:.0f}s; see its log")
        if stop.wait(0.2):
            return None
    finished, recorded = _run_in_output(store, run_identity)
    return finished, recorded or run_identity


def _run(job: Job, options: RunOptions, store: Store, split: Split, run_identity: dict, stop: StopFlag,
         worker: Worker, embedding: EmbeddingSettings | None = None, evaluation: Evaluation | None = None,
         preview: ModelPreview | None = None) -> int:
    started = time.monotonic()
    layout = options.layout
    _check_still_ours(store, run_identity)
    pipeline = initialize(job, embedding, preview)
    loaded = time.monotonic()
    if evaluation is not None:
        evaluation = evaluation.with_labels(_label_names(pipeline))
    task = build_task(job, pipeline, should_stop=lambda: stop.requested)
    run_fingerprint = fingerprint(run_identity)
    rows_per_part = job.get("output.rows_per_part")
    done = verified_parts(store, run_fingerprint, rows_per_part, split.offset)
    _record_run_info(store, job, run_identity, pipeline)
    share = Share(layout, -(-split.total // rows_per_part) if split.total is not None else None)
    log.info("run %s as %s: %s rows, %d parts already committed, device %s", run_fingerprint, layout.describe(),
             split.total if split.total is not None else "unknown", len(done), pipeline.device,
             extra={"event": "start", "fingerprint": run_fingerprint, "rows_total": split.total,
                    "parts_committed": len(done), "device": str(pipeline.device)})
    max_tokens = token_budget(job.get("batching.max_tokens"), pipeline.device)
    limits = BatchLimits(max_tokens, job.get("batching.max_batch_size"), 8 if pipeline.device.type == "cuda" else 1)
    share_rows = _share_rows(share, split.total, rows_per_part)
    progress = Progress(store, share_rows, rows_per_part, *_rows_and_parts(done, share),
                        options.progress_bar if layout.shows_progress else False, quiet=not layout.shows_progress)
    progress.failed_rows = sum(f.failed_rows for f in done.values())
    heap = HeapTrimmer()

    def after_batch(rows: int, tokens: int) -> None:
        progress.advance(rows, tokens)
        heap.after_batch()

    runner = PartRunner(task, pipeline.model, pipeline.device, TokenBudget(max_tokens), stop, on_batch=after_batch)
    work = Work(job, store, split, task, share, limits, runner, progress, stop, run_fingerprint, worker,
                evaluation=evaluation)
    worker.record.update(device=str(pipeline.device), round_robin=share.round_robin)
    worker.figures = progress.figures
    work.metrics = RunMetrics(_process_identity(worker, pipeline, options.started, loaded), run_fingerprint)
    code = None
    try:
        try:
            work.compute_share(started, loaded)
        except Interrupted:
            worker.claims.release_all()
            store.put(PROGRESS, json.dumps(progress.snapshot(), indent=2).encode())
            log.warning("stopped by %s after committing %d parts; rerun the same command to resume",
                        stop.signal_name, progress.parts_done, extra={"event": "stopped", "signal": stop.signal_name,
                                                                      "parts_done": progress.parts_done})
            code = EXIT_INTERRUPTED
            return code
        finally:
            progress.close()
        code = work.finish()  # the record still says running: a finished one would let others take the finish claim
        return code
    finally:
        summary = {**work.metrics.summary(time.monotonic() - options.started, loaded - options.started),
                   **work.output_totals, "exit_code": code}
        log.info("%s", summary_line(summary), extra={"event": "summary", **summary})


@dataclass
class Work:
    """This process's share of the job: claim parts, compute and commit them, then, if last, finish the job."""

    job: Job
    store: Store
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
    workers: int = 0  # DataLoader workers of the next pass
    choice: WorkerChoice | None = None  # num_workers auto, until it has chosen

    def __post_init__(self) -> None:
        setting = self.job.get("batching.num_workers")
        if setting == "auto":
            self.choice = WorkerChoice()  # measure with none first: preparation then runs where it can be timed
        else:
            self.workers = setting

    def compute_share(self, started: float, loaded: float) -> None:
        """Passes over the share until every part of it is committed, by this process or others."""
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
                    if self._choose_workers():
                        switched = True
                        break
            if switched:
                continue  # a stream of unknown length may have parts left that _outstanding cannot name yet
            outstanding = self._outstanding()
            if not outstanding:
                return
            if any(self.worker.claims.available(index) for index in outstanding):
                continue  # a holder is gone: another pass takes its parts over
            if not waiting:
                log.info("waiting for %d parts held by other processes (%s)", len(outstanding),
                         _first_few(outstanding), extra={"event": "waiting", "parts": outstanding[:100]})
                waiting = True
            if self.stop.wait(WAIT_POLL_SECONDS):
                raise Interrupted

    def _loader(self):
        done = committed_parts(self.store.names())
        parts = PreparedParts(self.split, self.task, self.job.get("output.rows_per_part"),
                              kept_columns(self.job), self.limits, self.share, self.worker.claims,
                              frozenset(done))
        return part_loader(parts, self.workers, pin_memory=self.runner.device.type == "cuda")

    def _choose_workers(self) -> bool:
        """num_workers auto: once enough is measured and no part is half computed, choose the count. True when
        the pass should end here for one with workers. It can: with no workers the parts are prepared lazily, in
        this process, so the loader has claimed nothing beyond the part just committed."""
        choice = self.choice
        if choice is None or self.pending:
            return False
        if choice.chosen is None:
            if not choice.enough():
                return False
            cores = usable_cores(self.share.layout.local_world_size)
            self.workers = choice.decide(cores, torch.get_num_threads(), self.runner.device.type)
            log.info(choice.describe(cores), extra={"event": "workers_chosen", "num_workers": self.workers})
            if self.workers and self.share.total_parts is None:
                # a stream of unknown length: one more part with none first. If there is none, its end comes
                # without a claim and names the length, and a split of one part does not start workers for nothing
                return False
        self.choice = None  # decided: measured no more
        # with every part of the share committed, workers would start for nothing
        return self.workers > 0 and (self.share.total_parts is None or bool(self._outstanding()))

    def _take(self, part: PreparedPart) -> None:
        """Compute one slice; once a part's slices are all computed, commit the part."""
        started = time.perf_counter()
        slices = self.pending.setdefault(part.index, {})
        slices[part.offset] = _compute_slice(part, self.runner, self.job, self.progress)
        if self.metrics is not None:
            self.metrics.slice_done(part.index, slices[part.offset], self.runner.take_measured(),
                                    time.perf_counter() - started, part.seconds if not self.workers else 0.0,
                                    part.encoded.truncated_rows)
        if part.read is not None:
            self.progress.input_read(part.read)
        if sum(table.num_rows for table in slices.values()) >= part.part_rows:
            del self.pending[part.index]
            self._commit(part.index, slices)
        if self.choice is not None and self.choice.chosen is None:  # the commit too: it stays in this process
            self.choice.measure(part.seconds, time.perf_counter() - started, part.num_rows, part.cpu_seconds)

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
        parts, rows = len(mine), sum(_part_rows(index, self.split.total, rows_per_part) for index in mine)
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
                "rows_done": sum(_part_rows(index, total_rows, rows_per_part) for index in committed),
                "rows_total": total_rows}

    def finish(self) -> int:
        """Every part of the share is committed. The process that sees the whole job committed writes _SUCCESS,
        exactly once even when processes finish together; the exit code judges the rows of this share."""
        rows_per_part = self.job.get("output.rows_per_part")
        total = self.share.total_parts
        done = verified_parts(self.store, self.fingerprint, rows_per_part, self.split.offset)
        damaged = [index for index in self.share.parts() if index not in done]
        if damaged:  # removed by verified_parts: committed, then damaged or replaced by another job's file
            raise BatchrunError(f"{_first_few(damaged)} of {self.store} were damaged after being committed and "
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
                self._write_success(done, total)
            except BaseException:
                self.worker.claims.release(FINISH, done=False)  # another process may finish the job
                raise
            self.worker.claims.release(FINISH, done=True)
            own = list(done.values())
        elif self.share.layout.num_shards > 1 and not self.store.exists(SUCCESS):
            log.info("%s done: %d parts; the job completes when every shard has finished",
                     self.share.layout.describe(), len(own), extra={"event": "shard_done", "parts": len(own)})
        return _exit_for_errors(sum(f.failed_rows for f in own), sum(f.rows for f in own),
                                self.job.get("errors.max_error_rate"))

    def _finish_claimed(self) -> bool:
        if self.store.exists(SUCCESS) or not self.worker.claims.claim(FINISH):
            return False
        if self.store.exists(SUCCESS):  # written by the holder we took the claim over from, or just before
            self.worker.claims.release(FINISH, done=True)
            return False
        return True

    def _write_success(self, done: dict, total: int) -> None:
        rows = sum(facts.rows for facts in done.values())
        progress = self.progress
        progress.total_parts, progress.total_rows = total, rows  # known for sure now, even for a stream
        progress.parts_done, progress.rows_done, progress.rows_committed = total, rows, rows
        progress.failed_rows = sum(facts.failed_rows for facts in done.values())
        info = read_run_info(self.store)
        info["finished"] = _now()
        info["rows"], info["failed_rows"] = rows, progress.failed_rows  # what a rerun's exit code is judged by
        info["part_bytes"] = part_sizes(self.store, total)  # what a rerun and status check the parts against
        info["processes"] = _process_summaries(worker_records(self.store))
        if self.evaluation is not None:  # before _SUCCESS: a finished run has its scores
            scores = score_parts(self.evaluation, self.store, done)
            write_scores(self.store, scores)
            self.output_totals["evaluation"] = scores
        self.store.put(RUN_INFO, json.dumps(info, indent=2, default=str).encode())
        self.store.put(PROGRESS, json.dumps(progress.snapshot(complete=True), indent=2).encode())
        if self.store.create(SUCCESS, b""):
            log.info("done: %s; wrote %s", progress.line(), SUCCESS, extra={"event": "done", **progress.fields(),
                                                                       "failed_rows": progress.failed_rows})
        else:  # the output is complete either way; the claim should have made this impossible
            log.warning("%s appeared while this process held the finish claim: another process judged it dead "
                        "(check the hosts' clocks)", SUCCESS)
        remove_claims_and_records(self.store)


def token_budget(setting, device) -> int:
    """batching.max_tokens: auto is 4096 on a CPU, where cache-sized batches ran 27% faster than 16384
    (benchmarks/RESULTS.md), and 16384 on accelerators, which need large batches to fill."""
    if setting != "auto":
        return setting
    return 4096 if device.type == "cpu" else 16384


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


def _compute_slice(part, runner: PartRunner, job: Job, progress: Progress) -> pa.Table:
    """A prepared slice's rows, computed and assembled in row order."""
    results = runner.run(part)
    failed = [row for row, error in enumerate(part.encoded.errors) if error is not None]
    if failed and job.get("errors.on_error") == "fail":
        row = failed[0]
        raise BatchrunError(f"row {part.first_row + row} failed: {part.encoded.errors[row]} (errors.on_error: fail)")
    progress.advance(len(part.encoded.errors) - sum(len(rows) for rows, _ in results), 0)
    return assemble_part(part, results, runner.task.columns)


def _commit_whole_part(index: int, slices: dict[int, pa.Table], job: Job, store, run_fingerprint: str,
                       evaluation: Evaluation | None = None) -> PartFacts:
    table = pa.concat_tables([slices[offset] for offset in sorted(slices)])
    statistics = evaluation.part_statistics(table) if evaluation is not None else None
    commit_part(store, index, table, job.get("output.compression"), run_fingerprint, statistics)
    return PartFacts(index, table.num_rows, table.num_rows - table.column("error").null_count, statistics)


def verified_parts(store: Store, run_fingerprint: str, rows_per_part: int,
                   split_start: int | None = None) -> dict[int, PartFacts]:
    """Committed parts whose footers check out; a truncated, unreadable or foreign part is removed and redone."""
    done = {}
    for index in sorted(committed_parts(store.names())):
        facts = read_part_facts(store, index, run_fingerprint, rows_per_part, split_start)
        if facts is None:
            log.warning("%s is damaged or not from this run: it will be computed again", part_name(index))
            store.remove(part_name(index))
        else:
            done[index] = facts
    return done


def remove_leftovers(store: Store) -> None:
    """Temporary files of processes killed mid-write (never one of a live process, which may be mid-write)."""
    for name in store.names():
        if is_leftover(store, name):
            store.remove(name)


def remove_claims_and_records(store: Store) -> None:
    """The finished job needs no claims, no records of processes that have stopped, and no leftovers."""
    remove_leftovers(store)
    for name in store.names():
        if CLAIM_PATTERN.fullmatch(name):
            store.remove(name)
    for record in worker_records(store):
        if not record["live"]:
            store.remove(f".worker-{record['worker']}.json")


def _exit_for_errors(failed_rows: int, rows: int, max_error_rate: float) -> int:
    fields = {"failed_rows": failed_rows, "rows": rows}
    if rows and failed_rows / rows > max_error_rate:
        log.warning("%d of %d rows failed (%.2f%%), above errors.max_error_rate=%s", failed_rows, rows,
                    100 * failed_rows / rows, max_error_rate, extra={"event": "too_many_failed_rows", **fields})
        return EXIT_TOO_MANY_ERRORS
    if failed_rows:
        log.info("%d of %d rows failed; see the error column", failed_rows, rows,
                 extra={"event": "failed_rows", **fields})
    return EXIT_OK


def _run_in_output(store: Store, run_identity: dict) -> tuple[bool, dict | None]:
    """(finished, the identity recorded) when OUTPUT holds this job's run, (False, None) when it holds none; exit 2
    when it holds another job's run. The recorded identity stays in force: one recorded by an older batchrun lacks
    keys added since (not compared), and its parts carry its fingerprint."""
    previous = read_run_info(store)
    if not previous:
        if committed_parts(store.names()):
            raise UsageError(f"{store} holds parts but no {RUN_INFO}; it is not a batchrun run of this job "
                             "(use --fresh to discard it, or another output.path)")
        return False, None
    changed = differences(previous["identity"], run_identity)
    if changed and _abandoned_start(store):
        log.warning("%s holds the start of another job (fingerprint %s) that committed no part; it is replaced "
                    "(what differed: %s)", store, previous.get("fingerprint"), "; ".join(changed),
                    extra={"event": "abandoned_start_replaced"})
        _discard(store)
        return False, None
    if changed:
        raise UsageError(
            f"{store} holds a run of a different job (fingerprint {previous.get('fingerprint')}); what differs:\n"
            + "\n".join(f"  - {change}" for change in changed)
            + "\nuse --fresh to discard it, or another output.path"
        )
    return _still_finished(store, previous), previous["identity"]


def _abandoned_start(store: Store) -> bool:
    """A start that committed no part, and whose processes are gone, is not a run to protect: a job that failed
    before its first part (a model that would not load, a device out of memory) must not block the fixed job."""
    names = store.names()
    return (not committed_parts(names) and SUCCESS not in names
            and not any(record["live"] for record in worker_records(store)))


def _still_finished(store: Store, info: dict) -> bool:
    """Whether OUTPUT holds the finished run it says it does: _SUCCESS, and every part as the run recorded it when
    it finished (one listing of names and sizes, no part read). A part deleted or changed since is computed again:
    _SUCCESS goes first, so that no reader takes the output for whole meanwhile, then the changed parts."""
    if not store.exists(SUCCESS):
        return False
    changed = changed_since_finished(store, info)
    if not changed:
        return True
    log.warning("%s was finished, but parts are missing or changed since (%s): removing %s and computing them "
                "again", store, _first_few(changed), SUCCESS,
                extra={"event": "finished_run_incomplete", "parts": changed[:100]})
    store.remove(SUCCESS)
    for index in changed:
        store.remove(part_name(index))
    return False


def _check_still_ours(store: Store, run_identity: dict) -> None:
    """Once this process's record is live, OUTPUT must still hold its job's start: a start of another job that
    found the start abandoned just before (between its create and this record) replaced it."""
    info = read_run_info(store)
    if not info or differences(info["identity"], run_identity):
        raise UsageError(f"{store} was taken by another job starting at the same moment (fingerprint "
                         f"{info.get('fingerprint')}); use another output.path for this job")


def _discard(store: Store) -> None:
    """--fresh: remove the run's own files, refused while another process is writing OUTPUT.

    In an order that leaves a run a plain rerun can resume wherever the discard is killed: _SUCCESS first (a
    finished run that has lost parts would otherwise look finished), _batchrun.json last (parts without it would
    look like another program's files)."""
    live = [record for record in worker_records(store) if record["live"]]
    if live:
        raise OutputBusy(f"--fresh would discard {store} while {len(live)} live process(es) write it, e.g. pid "
                         f"{live[0].get('pid')} on {live[0].get('host')}; retry when they have finished")
    names = store.names()
    for name in (SUCCESS, EVAL, PROGRESS):
        store.remove(name)
    for name in names:
        if committed_parts([name]) or CLAIM_PATTERN.fullmatch(name) or WORKER_PATTERN.fullmatch(name):
            store.remove(name)
    for name in names:  # after the parts, so that a discard killed midway leaves no part without its metrics
        if is_metrics(name):
            store.remove(name)
    store.remove(RUN_INFO)


def _record_run_info(store: Store, job: Job, run_identity: dict, pipeline) -> None:
    """_batchrun.json gets the manifest, versions and resolved device from the first process to load the model."""
    info = read_run_info(store)
    if info.get("manifest") is not None:
        return
    store.put(RUN_INFO, json.dumps({**_run_info(job, run_identity, pipeline), "started": info.get("started", _now())},
                                   indent=2, default=str).encode())


def _run_info(job: Job, run_identity: dict, pipeline) -> dict:
    import datasets
    import pyarrow
    import transformers

    summary = plan_summary(pipeline)
    return {
        "name": job.get("name"),
        "fingerprint": fingerprint(run_identity),
        "identity": run_identity,
        "manifest": redacted(job.config),  # storage_options hold credentials
        "versions": {"batchrun": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "datasets": datasets.__version__,
                     "pyarrow": pyarrow.__version__},
        "device": summary["device"],
        "dtype": summary["dtype"],
        "generation_config": summary["generation_config"],
        "stages": summary["stages"],
        "label_names": _label_names(pipeline),  # how integer references are named when the run is scored
        "host": platform.node(),
        "started": _now(),
        "finished": None,
    }


def _process_summaries(records: list[dict]) -> list[dict]:
    """Who computed the job, for _batchrun.json: one entry per process that took part."""
    keys = ("host", "pid", "rank", "world_size", "shard_index", "num_shards", "device", "parts_done", "rows_done",
            "rows_per_second", "input_read")
    return [{key: record.get(key) for key in keys} for record in sorted(records, key=lambda r: r.get("started", 0))]


def _process_identity(worker: Worker, pipeline, command_started: float, loaded: float) -> dict:
    """Who computes a part, as its metrics record it: the worker record's identity, the device and dtype, and when
    the command started (wall clock) and loaded its model."""
    record = worker.record
    now, monotonic = time.time(), time.monotonic()
    return {"worker": worker.id, "host": record["host"], "pid": record["pid"], "rank": record.get("rank"),
            "world_size": record.get("world_size"), "shard_index": record.get("shard_index"),
            "num_shards": record.get("num_shards"), "device": str(pipeline.device),
            "dtype": str(pipeline.model.dtype).removeprefix("torch."),
            "started": round(now - (monotonic - command_started), 3), "loaded": round(now - (monotonic - loaded), 3)}


def _recorded_totals(info: dict) -> tuple[int | None, int | None]:
    """(rows, failed rows) _batchrun.json recorded when the run finished; (None, None) for a run finished by a
    batchrun that did not record them (its parts are counted instead)."""
    rows, failed_rows = info.get("rows"), info.get("failed_rows")
    if isinstance(rows, int) and isinstance(failed_rows, int):
        return rows, failed_rows
    return None, None


def _log_finished_summary(store: Store, options: RunOptions, code: int) -> None:
    """The summary of a rerun that found the run finished: nothing computed here, the output as it was recorded."""
    info = read_run_info(store)
    rows, failed_rows = _recorded_totals(info)
    wall = time.monotonic() - options.started
    summary = {"rows": 0, "failed_rows": 0, "truncated_rows": 0, "parts": 0, "wall_seconds": round(wall, 3),
               "load_seconds": 0.0, "rows_per_second": 0.0, "tokens_per_second": 0.0, "real_tokens": 0,
               "padded_tokens": 0, "padding_efficiency": None, "device": info.get("device"), "dtype": info.get("dtype"),
               "output_rows": rows, "output_failed_rows": failed_rows, "exit_code": code}
    scores = read_scores(store)
    if scores is not None:
        summary["evaluation"] = scores
    log.info("%s", summary_line(summary), extra={"event": "summary", **summary})


def _label_names(pipeline) -> dict | None:
    """text-classification's id2label (other models' configs have a default one that names nothing)."""
    if pipeline.task != "text-classification":
        return None
    return {str(key): value for key, value in (getattr(pipeline.model.config, "id2label", None) or {}).items()}


def _scored_as_asked(scores: dict | None, evaluation: Evaluation) -> bool:
    return scores is not None and list(scores.get("metrics") or {}) == list(evaluation.metrics)


def _score_finished_run(store: Store, evaluation: Evaluation, run_identity: dict) -> None:
    """_eval.json of a finished run that lacks it, from its parts."""
    info = read_run_info(store)
    evaluation = evaluation.with_labels(info.get("label_names"))
    done = verified_parts(store, info.get("fingerprint"), run_identity["output.rows_per_part"])
    write_scores(store, score_parts(evaluation, store, done))


def _share_rows(share: Share, total_rows: int | None, rows_per_part: int) -> int | None:
    if total_rows is None:
        return None
    block = share.parts()
    return max(0, min(block.stop * rows_per_part, total_rows) - block.start * rows_per_part)


def _rows_and_parts(done: dict[int, PartFacts], share: Share) -> tuple[int, int]:
    mine = [facts for index, facts in done.items() if share.includes(index)]
    return sum(facts.rows for facts in mine), len(mine)


def _part_rows(index: int, total_rows: int | None, rows_per_part: int) -> int:
    if total_rows is None:
        return rows_per_part
    return max(0, min(rows_per_part, total_rows - index * rows_per_part))


def _first_few(indices: list[int]) -> str:
    shown = ", ".join(str(index) for index in indices[:5])
    return f"parts {shown}" + (", ..." if len(indices) > 5 else "")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
