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
from pipeline_core.data.loader import BatchLimits, EndOfSplit, PreparedParts, part_loader
from pipeline_core.data.source import open_split
from pipeline_core.errors import EXIT_OK, EXIT_TOO_MANY_ERRORS, BatchrunError, UsageError
from pipeline_core.initializer import initialize, plan_summary
from pipeline_core.manifest import Job
from pipeline_core.output.identity import differences, fingerprint, identity
from pipeline_core.output.parts import assemble_part, commit_part, committed_parts
from pipeline_core.output.progress import Progress
from pipeline_core.output.store import LocalStore
from pipeline_core.tasks import build_task

log = logging.getLogger("batchrun")
RUN_INFO = "_batchrun.json"
SUCCESS = "_SUCCESS"


@dataclass
class RunOptions:
    limit: int | None = None
    fresh: bool = False
    progress_bar: bool | None = None  # None: a bar when stderr is a terminal


def run_job(job: Job, options: RunOptions) -> int:
    store = LocalStore(job.get("output.path"))
    run_identity = identity(job, options.limit)
    if options.fresh:
        _discard(store)
    if _already_finished(store, run_identity):
        log.info("%s already holds this finished run; nothing to do", store)
        return EXIT_OK
    pipeline = initialize(job)
    task = build_task(job, pipeline)
    split = open_split(job, options.limit)
    done = committed_parts(store.names())
    info = _run_info(job, run_identity, pipeline)
    store.put(RUN_INFO, json.dumps(info, indent=2, default=str).encode())
    log.info("run %s: %s rows, %d parts already committed, device %s", info["fingerprint"],
             split.total if split.total is not None else "unknown", len(done), pipeline.device)
    rows_per_part = job.get("output.rows_per_part")
    limits = BatchLimits(job.get("batching.max_tokens"), job.get("batching.max_batch_size"),
                         8 if pipeline.device.type == "cuda" else 1)
    parts = PreparedParts(split, task, rows_per_part, job.get("dataset.keep_columns"), limits, frozenset(done))
    loader = part_loader(parts, job.get("batching.num_workers"), pin_memory=pipeline.device.type == "cuda")
    rows_done = _rows_in(done, split.total, rows_per_part)
    progress = Progress(store, split.total, rows_per_part, rows_done, len(done), options.progress_bar)
    total_parts, failed_rows, rows_seen = 0, 0, 0
    try:
        for item in loader:
            if isinstance(item, EndOfSplit):
                total_parts = max(total_parts, item.parts)
                continue
            failed = _process_part(item, task, pipeline, job, store, progress)
            failed_rows += failed
            rows_seen += item.num_rows
    finally:
        progress.close()
    missing = set(range(total_parts)) - committed_parts(store.names())
    if missing:
        raise BatchrunError(f"parts {sorted(missing)[:5]} were not committed; rerun to resume")
    info["finished"] = _now()
    store.put(RUN_INFO, json.dumps(info, indent=2, default=str).encode())
    store.put("_progress.json", json.dumps(progress.snapshot(complete=True), indent=2).encode())
    store.put(SUCCESS, b"")
    log.info("done: %s", progress.line())
    return _exit_for_errors(failed_rows, rows_seen, job.get("errors.max_error_rate"))


def _process_part(part, task, pipeline, job, store, progress) -> int:
    results = []
    for batch in part.batches:
        inputs = {name: tensor.to(pipeline.device, non_blocking=True) for name, tensor in batch["inputs"].items()}
        with torch.inference_mode():
            outputs = task.forward(pipeline.model, inputs)
            results.append((batch["rows"], task.decode(outputs, inputs, part.encoded, batch["rows"])))
        progress.advance(len(batch["rows"]), int(batch["inputs"]["attention_mask"].sum()))
    failed = [row for row, error in enumerate(part.encoded.errors) if error is not None]
    if failed and job.get("errors.on_error") == "fail":
        row = failed[0]
        raise BatchrunError(f"row {part.first_row + row} failed: {part.encoded.errors[row]} (errors.on_error: fail)")
    progress.advance(len(failed), 0)
    commit_part(store, part.index, assemble_part(part, results, task.columns), job.get("output.compression"))
    progress.part_committed(len(failed))
    return len(failed)


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
    for name in store.names():
        if committed_parts([name]) or name in (RUN_INFO, SUCCESS, "_progress.json") or name.startswith("."):
            store.remove(name)


def _rows_in(done: set[int], total: int | None, rows_per_part: int) -> int:
    rows = len(done) * rows_per_part
    if total is not None and done and max(done) == -(-total // rows_per_part) - 1:
        rows -= rows_per_part - (total - max(done) * rows_per_part)  # the last part is short
    return rows


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

