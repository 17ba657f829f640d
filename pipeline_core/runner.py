"""The run: initialize once, stream prepared parts from the workers, run their batches, commit each part.

Resuming is part-wise: a part whose file is committed is never recomputed, so a rerun of the same command
finishes the job with the rows, values and order of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass

import torch

from pipeline_core import __version__
from pipeline_core.data.loader import (
    BatchLimits,
    EndOfSplit,
    PreparedPart,
    PreparedParts,
    SourceFailure,
    part_loader,
)
from pipeline_core.data.source import open_split
from pipeline_core.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TOO_MANY_ERRORS, BatchrunError, UsageError
from pipeline_core.execute import Interrupted, PartRunner, StopFlag, TokenBudget
from pipeline_core.heap import HeapTrimmer
from pipeline_core.initializer import initialize, plan_summary
from pipeline_core.manifest import Job
from pipeline_core.output import PROGRESS, RUN_INFO, SUCCESS
from pipeline_core.output.identity import differences, fingerprint, identity
from pipeline_core.output.lock import RunLock
from pipeline_core.output.parts import (
    PartFacts,
    assemble_part,
    commit_part,
    committed_parts,
    part_name,
    read_part_facts,
)
from pipeline_core.output.progress import Progress
from pipeline_core.output.store import LocalStore
from pipeline_core.signals import StopOnSignals
from pipeline_core.tasks import build_task

log = logging.getLogger("batchrun")


@dataclass
class RunOptions:
    limit: int | None = None
    fresh: bool = False
    progress_bar: bool | None = None  # None: a bar when stderr is a terminal


def run_job(job: Job, options: RunOptions) -> int:
    store = LocalStore(job.get("output.path"))
    with RunLock(store):
        remove_leftovers(store)
        if options.fresh:
            _discard(store)
        run_identity = identity(job, options.limit)
        if _already_finished(store, run_identity):
            log.info("%s already holds this finished run; nothing to do", store)
            return EXIT_OK
        with StopOnSignals() as stop:
            return _run(job, options, store, run_identity, stop)


def _run(job: Job, options: RunOptions, store: LocalStore, run_identity: dict, stop: StopFlag) -> int:
    started = time.monotonic()
    pipeline = initialize(job)
    task = build_task(job, pipeline, should_stop=lambda: stop.requested)
    split = open_split(job, options.limit)
    info = _run_info(job, run_identity, pipeline)
    rows_per_part = job.get("output.rows_per_part")
    done = verified_parts(store, info["fingerprint"], rows_per_part)
    store.put(RUN_INFO, json.dumps(info, indent=2, default=str).encode())
    log.info("run %s: %s rows, %d parts already committed, device %s", info["fingerprint"],
             split.total if split.total is not None else "unknown", len(done), pipeline.device)
    max_tokens = token_budget(job.get("batching.max_tokens"), pipeline.device)
    limits = BatchLimits(max_tokens, job.get("batching.max_batch_size"), 8 if pipeline.device.type == "cuda" else 1)
    parts = PreparedParts(split, task, rows_per_part, job.get("dataset.keep_columns"), limits, frozenset(done))
    loader = part_loader(parts, job.get("batching.num_workers"), pin_memory=pipeline.device.type == "cuda")
    progress = Progress(store, split.total, rows_per_part, sum(f.rows for f in done.values()), len(done),
                        options.progress_bar)
    progress.failed_rows = sum(f.failed_rows for f in done.values())
    heap = HeapTrimmer()

    def after_batch(rows: int, tokens: int) -> None:
        progress.advance(rows, tokens)
        heap.after_batch()

    runner = PartRunner(task, pipeline.model, pipeline.device, TokenBudget(max_tokens), stop, on_batch=after_batch)
    total_parts, first = 0, True
    try:
        for item in _until_stopped(loader, stop):
            if first and isinstance(item, PreparedPart):  # how long skipping committed parts took
                log.info("first part to compute (part %d) ready %.1fs after the run started",
                         item.index, time.monotonic() - started)
                first = False
            if isinstance(item, EndOfSplit):
                total_parts = max(total_parts, item.parts)
                continue
            if isinstance(item, SourceFailure):
                raise BatchrunError(f"dataset {job.get('dataset.path')!r}: {item.message}; committed parts are kept")
            done[item.index] = _process_part(item, runner, job, store, progress, info["fingerprint"])
    except Interrupted:
        store.put(PROGRESS, json.dumps(progress.snapshot(), indent=2).encode())
        log.warning("stopped by %s after committing %d parts; rerun the same command to resume",
                    stop.signal_name, progress.parts_done)
        return EXIT_INTERRUPTED
    finally:
        progress.close()
    missing = sorted(set(range(total_parts)) - set(done))
    if missing:
        raise BatchrunError(f"parts {missing[:5]} were not committed; rerun to resume")
    rows = sum(facts.rows for facts in done.values())
    progress.total_parts, progress.total_rows = total_parts, rows  # known for sure now, even for a stream
    info["finished"] = _now()
    store.put(RUN_INFO, json.dumps(info, indent=2, default=str).encode())
    store.put(PROGRESS, json.dumps(progress.snapshot(complete=True), indent=2).encode())
    store.put(SUCCESS, b"")
    log.info("done: %s", progress.line())
    return _exit_for_errors(sum(facts.failed_rows for facts in done.values()), rows,
                            job.get("errors.max_error_rate"))


def token_budget(setting, device) -> int:
    """batching.max_tokens: auto is 4096 on a CPU, where cache-sized batches ran 27% faster than 16384
    (benchmarks/RESULTS.md), and 16384 on accelerators, which need large batches to fill."""
    if setting != "auto":
        return setting
    return 4096 if device.type == "cpu" else 16384


def _until_stopped(loader, stop: StopFlag):
    """The loader's items until a stop is requested; workers killed by the same Ctrl-C end it quietly too."""
    iterator = iter(loader)
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


def _process_part(part, runner: PartRunner, job: Job, store, progress: Progress, run_fingerprint: str) -> PartFacts:
    results = runner.run(part)
    failed = [row for row, error in enumerate(part.encoded.errors) if error is not None]
    if failed and job.get("errors.on_error") == "fail":
        row = failed[0]
        raise BatchrunError(f"row {part.first_row + row} failed: {part.encoded.errors[row]} (errors.on_error: fail)")
    progress.advance(len(part.encoded.errors) - sum(len(rows) for rows, _ in results), 0)
    table = assemble_part(part, results, runner.task.columns)
    commit_part(store, part.index, table, job.get("output.compression"), run_fingerprint)
    progress.part_committed(len(failed))
    return PartFacts(part.index, part.num_rows, len(failed))


def verified_parts(store: LocalStore, run_fingerprint: str, rows_per_part: int) -> dict[int, PartFacts]:
    """Committed parts whose footers check out; a truncated, unreadable or foreign part is removed and redone."""
    done = {}
    for index in sorted(committed_parts(store.names())):
        facts = read_part_facts(store, index, run_fingerprint, rows_per_part)
        if facts is None:
            log.warning("%s is damaged or not from this run: it will be computed again", part_name(index))
            store.remove(part_name(index))
        else:
            done[index] = facts
    return done


def remove_leftovers(store: LocalStore) -> None:
    """Temporary files of a run killed mid-write (the lock is held, so none belongs to a live run)."""
    for name in store.names():
        if name.startswith(".") and ".tmp-" in name:
            store.remove(name)


def _exit_for_errors(failed_rows: int, rows: int, max_error_rate: float) -> int:
    if rows and failed_rows / rows > max_error_rate:
        log.warning("%d of %d rows failed (%.2f%%), above errors.max_error_rate=%s", failed_rows, rows,
                    100 * failed_rows / rows, max_error_rate)
        return EXIT_TOO_MANY_ERRORS
    if failed_rows:
        log.info("%d of %d rows failed; see the error column", failed_rows, rows)
    return EXIT_OK


def _already_finished(store: LocalStore, run_identity: dict) -> bool:
    """True when OUTPUT holds this job's finished run; exit 2 when it holds another job's run."""
    raw = store.get(RUN_INFO)
    if raw is None:
        if committed_parts(store.names()):
            raise UsageError(f"{store} holds parts but no {RUN_INFO}; it is not a batchrun run of this job "
                             "(use --fresh to discard it, or another output.path)")
        return False
    previous = json.loads(raw)
    changed = differences(previous.get("identity", {}), run_identity)
    if changed:
        raise UsageError(
            f"{store} holds a run of a different job (fingerprint {previous.get('fingerprint')}); what differs:\n"
            + "\n".join(f"  - {change}" for change in changed)
            + "\nuse --fresh to discard it, or another output.path"
        )
    return store.exists(SUCCESS)


def _discard(store: LocalStore) -> None:
    """--fresh: remove the run's own files (leftover temporaries are already gone), keeping our lock."""
    for name in store.names():
        if committed_parts([name]) or name in (RUN_INFO, SUCCESS, PROGRESS):
            store.remove(name)


def _run_info(job: Job, run_identity: dict, pipeline) -> dict:
    import datasets
    import pyarrow
    import transformers

    summary = plan_summary(pipeline)
    return {
        "name": job.get("name"),
        "fingerprint": fingerprint(run_identity),
        "identity": run_identity,
        "manifest": job.config,
        "versions": {"batchrun": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "datasets": datasets.__version__,
                     "pyarrow": pyarrow.__version__},
        "device": summary["device"],
        "dtype": summary["dtype"],
        "generation_config": summary["generation_config"],
        "stages": summary["stages"],
        "host": platform.node(),
        "started": _now(),
        "finished": None,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

