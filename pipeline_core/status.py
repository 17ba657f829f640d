"""`batchrun status OUTPUT`: how far a run directory is, from its own files, without loading anything heavy.

Parts and rows come from the part files' footers; rates and the ETA from `_progress.json`; liveness from the lock.
"""

from __future__ import annotations

import json
import time

from pipeline_core.errors import UsageError
from pipeline_core.output import PROGRESS, RUN_INFO, SUCCESS
from pipeline_core.output.lock import lock_state
from pipeline_core.output.parts import committed_parts, read_part_facts
from pipeline_core.output.store import LocalStore


def run_status(output: str) -> dict:
    store = LocalStore(output)
    raw = store.get(RUN_INFO)
    if raw is None:
        raise UsageError(f"{output} holds no batchrun run (no {RUN_INFO}); check the path")
    info = json.loads(raw)
    progress = json.loads(store.get(PROGRESS) or b"{}")
    rows_per_part = info["identity"]["output.rows_per_part"]
    facts = [read_part_facts(store, index, info["fingerprint"], rows_per_part)
             for index in sorted(committed_parts(store.names()))]
    good = [fact for fact in facts if fact is not None]
    lock = lock_state(store)
    complete = store.exists(SUCCESS)
    return {
        "output": output,
        "name": info.get("name"),
        "fingerprint": info["fingerprint"],
        "complete": complete,
        "parts_done": len(good),
        "parts_total": progress.get("parts_total"),
        "damaged_parts": len(facts) - len(good),
        "rows_done": sum(fact.rows for fact in good),
        "rows_total": progress.get("rows_total"),
        "failed_rows": sum(fact.failed_rows for fact in good),
        "rows_per_second": progress.get("rows_per_second"),
        "eta_seconds": None if complete else progress.get("eta_seconds"),
        "running": bool(lock and not lock["stale"]),
        "lock": None if lock is None else {key: lock.get(key) for key in ("pid", "host", "heartbeat", "stale")},
        "started": info.get("started"),
        "finished": info.get("finished"),
    }


def render_status(status: dict) -> str:
    total = f"/{status['parts_total']}" if status["parts_total"] is not None else ""
    rows_total = f"/{status['rows_total']:,}" if status["rows_total"] is not None else ""
    if status["complete"]:
        state = "complete"
    elif status["running"]:
        lock = status["lock"]
        state = f"running (pid {lock['pid']} on {lock['host']}, heartbeat {time.time() - lock['heartbeat']:.0f}s ago)"
    else:
        state = "stopped before the end: rerun the same command to resume"
    lines = [
        f"{status['output']}: {status['name']} ({status['fingerprint']}), {state}",
        f"  parts   {status['parts_done']}{total}" + (f", {status['damaged_parts']} damaged (redone on resume)"
                                                     if status["damaged_parts"] else ""),
        f"  rows    {status['rows_done']:,}{rows_total}, {status['failed_rows']:,} failed",
    ]
    if status["rows_per_second"] is not None:
        eta = status["eta_seconds"]
        lines.append(f"  speed   {status['rows_per_second']:,.1f} rows/s" + (f", ETA {eta:,.0f}s" if eta else ""))
    return "\n".join(lines)
