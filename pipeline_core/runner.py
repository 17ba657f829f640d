"""The run: check what can be checked, prepare OUTPUT, load the model once, compute this process's share, finish.

Resuming is part-wise: a part whose file is committed is never recomputed, so a rerun of the same command
finishes the job with the rows, values and order of an uninterrupted run. The same holds across processes: each
claims the parts it computes (output/claims.py), so any number of processes, launched together or as shards,
in any layout from one attempt to the next, write one OUTPUT; the last to see every part committed writes _SUCCESS.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field

import torch

from pipeline_core import __version__
from pipeline_core.data.source import Split, open_split
from pipeline_core.engines import engine_identity, open_engine, preview_engine
from pipeline_core.errors import EXIT_INTERRUPTED, BatchrunError
from pipeline_core.evaluation import Evaluation, score_finished_run, score_line, scored_as_asked
from pipeline_core.execute import Interrupted, StopFlag
from pipeline_core.identity.job import job_identity
from pipeline_core.identity.keys import fingerprint
from pipeline_core.initializer.embedding import EmbeddingSettings
from pipeline_core.initializer.preview import ModelPreview
from pipeline_core.layout import Layout, Share, check_device_map
from pipeline_core.manifest import Job
from pipeline_core.output.claims import Worker
from pipeline_core.output.metrics import RunMetrics, recorded_summary, summary_line
from pipeline_core.output.progress import Progress
from pipeline_core.output.run_dir import (
    SUCCESS,
    RunDir,
    read_run_info,
    read_scores,
    refuse_fresh_for_a_shard,
    write_progress,
)
from pipeline_core.output.stores import open_store
from pipeline_core.remote import redacted
from pipeline_core.signals import StopOnSignals
from pipeline_core.work import Work, exit_for_errors

log = logging.getLogger("batchrun")


@dataclass
class RunOptions:
    limit: int | None = None
    fresh: bool = False
    progress_bar: bool | None = None  # None: a bar when stderr is a terminal
    layout: Layout = field(default_factory=Layout)
    started: float = field(default_factory=time.monotonic)  # when the command started: the summary's wall time


@dataclass
class Start:
    """What a run knows once OUTPUT is prepared, before its model loads: the job, OUTPUT, the split, the identity in
    force (the one OUTPUT's run recorded: its parts carry its fingerprint), and what was resolved on the way."""

    job: Job
    options: RunOptions
    run_dir: RunDir
    split: Split
    identity: dict
    stop: StopFlag
    embedding: EmbeddingSettings | None
    evaluation: Evaluation | None
    preview: ModelPreview


def run_job(job: Job, options: RunOptions) -> int:
    run_dir = RunDir(open_store(job.get("output.path"), job.get("output.storage_options")))
    if not run_dir.store.exclusive_create:
        log.warning("%s has no exclusive create, so claims cannot keep several processes apart: run one process at "
                    "a time on this OUTPUT (a local directory, s3://, gs:// and az:// have one)", run_dir)
    layout = options.layout
    check_device_map(job.get("model.device_map"), layout)
    refuse_fresh_for_a_shard(options.fresh, layout)  # the options alone tell: before any file is read
    identity, embedding = job_identity(job, options.limit)  # a pattern that matches nothing: exit 2 now
    evaluation = Evaluation.from_manifest(job.config)  # ROUGE without its package: exit 2 now
    with StopOnSignals() as stop:
        # the dataset and the model's files are checked before OUTPUT is touched and before any weights load: a
        # misspelt file, column or model exits 2 in seconds, whatever the model's size, and its fix needs no --fresh
        split = open_split(job, options.limit)
        preview = preview_engine(job)
        served = engine_identity(job, preview)  # a URL that does not answer, or serves another model: exit 2 now
        if served is not None:
            identity["model.engine"] = served
        checked = None if stop.requested else _prepare(run_dir, identity, options, stop)  # a signal in start-up
        if stop.requested:  # also one that came while --fresh discarded OUTPUT: it completed, nothing more started
            log.warning("stopped by %s before starting; rerun the same command to resume", stop.signal_name)
            return EXIT_INTERRUPTED
        finished, identity = checked
        if finished:
            return _already_finished(run_dir, job, evaluation, options)
        start = Start(job, options, run_dir, split, identity, stop, embedding, evaluation, preview)
        # the record comes before the model loads: rank 0's tells the other ranks that OUTPUT is ready
        with Worker(run_dir.store, layout.labels()) as worker:
            try:
                code = _run(start, worker)
            except BaseException:
                _give_back_claims(worker)
                worker.beat(state="stopped")
                raise
            if code == EXIT_INTERRUPTED:
                worker.beat(state="stopped")
        if run_dir.store.exists(SUCCESS):
            worker.retire()
        return code


def _prepare(run_dir: RunDir, identity: dict, options: RunOptions, stop: StopFlag) -> tuple[bool, dict] | None:
    """Rank 0 prepares OUTPUT; the other ranks of its launch wait until it has (None when stopped meanwhile)."""
    if options.layout.rank == 0:
        return run_dir.prepare(identity, options.fresh, options.layout)
    return run_dir.join(identity, stop, options.layout)


def _already_finished(run_dir: RunDir, job: Job, evaluation: Evaluation | None, options: RunOptions) -> int:
    """A rerun of a finished job exits as the run did: 3 when its failed rows exceed errors.max_error_rate (so a
    scheduler's retry of a run that exited 3 does not turn it green), else 0; scored first if it lacks its scores."""
    log.info("%s already holds this finished run; nothing to do", run_dir, extra={"event": "already_finished"})
    rows, failed_rows = run_dir.finished_totals(job.get("output.rows_per_part"))
    code = exit_for_errors(failed_rows, rows, job.get("errors.max_error_rate"))
    if evaluation is not None and not scored_as_asked(read_scores(run_dir.store), evaluation):
        score_finished_run(run_dir, evaluation, job.get("output.rows_per_part"))
    summary = recorded_summary(read_run_info(run_dir.store), time.monotonic() - options.started, code)
    _log_summary(summary, read_scores(run_dir.store))
    return code


def _run(start: Start, worker: Worker) -> int:
    """Load the model (or start the server), compute this process's share and, if it is the last, finish the job."""
    start.run_dir.check_still_ours(start.identity)
    started = time.monotonic()
    engine = open_engine(start.job, start.embedding, start.preview, start.options.layout, start.stop)
    try:
        return _run_on(start, worker, engine, started)
    finally:
        engine.close()


def _run_on(start: Start, worker: Worker, engine, started: float) -> int:
    job, run_dir, split, stop = start.job, start.run_dir, start.split, start.stop
    if stop.requested:  # stopped while the server started
        return _stopped(0)
    loaded = time.monotonic()
    evaluation = start.evaluation.with_labels(engine.label_names()) if start.evaluation else None
    run_fingerprint = fingerprint(start.identity)
    rows_per_part = job.get("output.rows_per_part")
    done = run_dir.verified_parts(run_fingerprint, rows_per_part, split.offset)
    run_dir.record_run(run_record(job, start.identity, engine))
    layout = start.options.layout
    share = Share(layout, -(-split.total // rows_per_part) if split.total is not None else None)
    log.info("run %s as %s: %s rows, %d parts already committed, device %s", run_fingerprint, layout.describe(),
             split.total if split.total is not None else "unknown", len(done), engine.device,
             extra={"event": "start", "fingerprint": run_fingerprint, "rows_total": split.total,
                    "parts_committed": len(done), "device": str(engine.device)})
    progress = _progress(run_dir, share, split, rows_per_part, done, start.options)
    task = engine.task()
    limits, runner = engine.runner(task, progress.advance)
    work = Work(job, run_dir, split, task, share, limits, runner, progress, stop, run_fingerprint, worker,
                evaluation=evaluation)
    worker.record.update(device=str(engine.device), round_robin=share.round_robin)
    worker.figures = progress.figures
    work.metrics = RunMetrics(_process_identity(worker, engine, start.options.started, loaded), run_fingerprint)
    code = None
    try:
        code = _compute(work, started, loaded)
        return code
    finally:
        summary = {**work.metrics.summary(time.monotonic() - start.options.started, loaded - start.options.started),
                   **work.output_totals, "exit_code": code}
        _log_summary(summary, summary.get("evaluation"))


def _compute(work: Work, started: float, loaded: float) -> int:
    """The share, then the job's finish; a stop request ends it between batches with exit 75."""
    try:
        work.compute_share(started, loaded)
    except Interrupted:
        work.worker.claims.release_all()
        write_progress(work.store, work.progress.snapshot())
        return _stopped(work.progress.parts_done, work.stop.signal_name)
    finally:
        work.progress.close()
    return work.finish()  # the record still says running: a finished one would let others take the finish claim


def _stopped(parts_done: int, signal_name: str | None = None) -> int:
    log.warning("stopped by %s after committing %d parts; rerun the same command to resume", signal_name, parts_done,
                extra={"event": "stopped", "signal": signal_name, "parts_done": parts_done})
    return EXIT_INTERRUPTED


def _progress(run_dir: RunDir, share: Share, split: Split, rows_per_part: int, done: dict,
              options: RunOptions) -> Progress:
    """The share's progress, counting the parts already committed in it."""
    mine = [facts for index, facts in done.items() if share.includes(index)]
    shown = options.layout.shows_progress
    progress = Progress(run_dir.store, _share_rows(share, split.total, rows_per_part), rows_per_part,
                        sum(facts.rows for facts in mine), len(mine), options.progress_bar if shown else False,
                        quiet=not shown)
    progress.failed_rows = sum(f.failed_rows for f in done.values())
    return progress


def _give_back_claims(worker: Worker) -> None:
    """After a failure, the parts this process claimed ahead go back, where the store lets them: when it fails again
    (the server that failed the run is still gone), the run's own error is the one to report, and the claims are
    taken over once this process is seen to be gone."""
    try:
        worker.claims.release_all()
    except BatchrunError as error:
        log.warning("could not give back this process's claims (%s)", error)


def run_record(job: Job, identity: dict, engine) -> dict:
    """_batchrun.json as the first process to load the model records it: the manifest, versions, resolved device."""
    import datasets
    import pyarrow
    import transformers

    summary = engine.summary()
    return {
        "name": job.get("name"),
        "fingerprint": fingerprint(identity),
        "identity": identity,
        "manifest": redacted(job.config),  # storage_options hold credentials
        "versions": {"batchrun": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "datasets": datasets.__version__,
                     "pyarrow": pyarrow.__version__},
        "device": summary["device"],
        "dtype": summary["dtype"],
        "generation_config": summary["generation_config"],
        "stages": summary["stages"],
        "label_names": engine.label_names(),  # how integer references are named when the run is scored
        **({"engine": summary["engine"]} if "engine" in summary else {}),
        "host": platform.node(),
        "started": None,  # kept from the record prepare created
        "finished": None,
    }


def _process_identity(worker: Worker, engine, command_started: float, loaded: float) -> dict:
    """Who computes a part, as its metrics record it: the worker record's identity, the device and dtype, and when
    the command started (wall clock) and loaded its model."""
    record = worker.record
    now, monotonic = time.time(), time.monotonic()
    return {"worker": worker.id, "host": record["host"], "pid": record["pid"], "rank": record.get("rank"),
            "world_size": record.get("world_size"), "shard_index": record.get("shard_index"),
            "num_shards": record.get("num_shards"), "device": str(engine.device), "dtype": engine.dtype,
            "started": round(now - (monotonic - command_started), 3), "loaded": round(now - (monotonic - loaded), 3)}


def _log_summary(summary: dict, scores: dict | None) -> None:
    """The run's last line, with the scores when the job was scored."""
    line = summary_line(summary) + (f"; scores: {score_line(scores)}" if scores else "")
    if scores is not None:
        summary["evaluation"] = scores
    log.info("%s", line, extra={"event": "summary", **summary})


def _share_rows(share: Share, total_rows: int | None, rows_per_part: int) -> int | None:
    if total_rows is None:
        return None
    block = share.parts()
    return max(0, min(block.stop * rows_per_part, total_rows) - block.start * rows_per_part)
