"""`batchrun status OUTPUT`: how far a run directory is, from its own files, without loading anything heavy.

Parts and rows come from the part files' footers; rates and the ETA from `_progress.json`; the processes at work,
their claims and rates from their worker records; which shards are finished from the parts of each shard's block.

`_batchrun.json` says whose run this is: one that is not JSON, or lacks what status needs, is a usage error naming
the file. Everything else is advisory: an unreadable `_progress.json`, or a field of a record of another type, is
shown as unknown rather than failing status.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline_core.errors import UsageError
from pipeline_core.evaluation import score_line
from pipeline_core.layout import Layout, Share
from pipeline_core.output.claims import held_claims
from pipeline_core.output.run_dir import (
    SUCCESS,
    changed_since_finished,
    committed_parts,
    read_part_facts,
    read_progress,
    read_scores,
    status_run_info,
    worker_records,
)
from pipeline_core.output.store import Store
from pipeline_core.output.stores import open_store
from pipeline_core.remote import is_remote


def run_status(output: str) -> dict:
    if not is_remote(output) and Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"{output} is a file, not a run directory; give status a job's output.path")
    store = open_store(output)  # a URL's credentials and endpoint come from the environment (AWS_* for s3://)
    info = status_run_info(store, output)
    progress = progress_figures(store)
    rows_per_part = info["identity"]["output.rows_per_part"]
    facts = [read_part_facts(store, index, info["fingerprint"], rows_per_part, split_start=None)
             for index in sorted(committed_parts(store.names()))]
    good = [fact for fact in facts if fact is not None]
    records = [_fitting(record, RECORD_FIELDS) | {"live": record["live"]} for record in worker_records(store)]
    held = held_claims(store)
    processes = [_process(record, held.get(record["worker"], []) if record["worker"] else [])
                 for record in records if record["live"]]
    # a finished run is complete only while its parts are as it recorded them (a listing; a rerun recomputes them)
    changed = changed_since_finished(store, info) if store.exists(SUCCESS) else []
    complete = store.exists(SUCCESS) and not changed
    return {
        "output": output,
        "name": info.get("name"),
        "fingerprint": info["fingerprint"],
        "complete": complete,
        "parts_done": len(good),
        "done": ranges(sorted(fact.index for fact in good)),
        "parts_total": progress.get("parts_total"),
        "damaged_parts": len(facts) - len(good),
        "changed_since_finished": changed,
        "rows_done": sum(fact.rows for fact in good),
        "rows_total": progress.get("rows_total"),
        "failed_rows": sum(fact.failed_rows for fact in good),
        "rows_per_second": progress.get("rows_per_second"),
        "eta_seconds": None if complete else progress.get("eta_seconds"),
        "running": bool(processes),
        "processes": processes,
        "shards": _shards(records, progress.get("parts_total"), {fact.index for fact in good}),
        "started": info.get("started"),
        "finished": info.get("finished"),
        "evaluation": read_scores(store) if complete else None,
    }


# What status reads of `_progress.json` and of worker records, and the type each must have to be shown.
NUMBER = (int, float)
PROGRESS_FIELDS = {"parts_total": int, "rows_total": int, "rows_per_second": NUMBER, "eta_seconds": NUMBER}
RECORD_FIELDS = {"worker": str, "host": str, "pid": int, "rank": int, "world_size": int, "shard_index": int,
                 "num_shards": int, "device": str, "rows_per_second": NUMBER, "parts_done": int,
                 "heartbeat": NUMBER, "started": NUMBER, "round_robin": bool}


def progress_figures(store: Store) -> dict:
    """`_progress.json`'s figures of the right type. It is advisory (rewritten after each part, by whichever
    process committed last): torn or edited, status goes on with what the part footers say."""
    return _fitting(read_progress(store), PROGRESS_FIELDS)


def _fitting(values: dict, fields: dict) -> dict:
    """Each of `fields` from `values` where it has the right type, else None (True is no number here)."""
    def fits(value, kind) -> bool:
        return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))

    return {key: values.get(key) if fits(values.get(key), kind) else None for key, kind in fields.items()}


def _process(record: dict, claims: list) -> dict:
    keys = ("host", "pid", "rank", "world_size", "shard_index", "num_shards", "device", "rows_per_second",
            "parts_done", "heartbeat")
    return {**{key: record.get(key) for key in keys}, "claims": claims}


def _shards(records: list[dict], parts_total: int | None, done: set[int]) -> list[dict] | None:
    """For a sharded run: each shard of the latest shard count, finished when every part of its block is done."""
    sharded = [record for record in records if (record.get("num_shards") or 1) > 1]
    if not sharded or parts_total is None:
        return None
    latest = max(sharded, key=lambda record: record["started"] or 0)
    count = latest["num_shards"]
    shards = []
    for index in range(count):
        share = Share(Layout(shard_index=index, num_shards=count), parts_total)
        share.round_robin = bool(latest.get("round_robin"))
        block = share.parts()
        shards.append({"shard": index, "parts": len(block), "parts_done": len(done.intersection(block)),
                       "finished": set(block) <= done})
    return shards


def ranges(indices: list[int]) -> str:
    """Sorted part indices as a person reads them: "0-5, 8, 10-11"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def render_status(status: dict) -> str:
    total = f"/{status['parts_total']}" if status["parts_total"] is not None else ""
    rows_total = f"/{status['rows_total']:,}" if status["rows_total"] is not None else ""
    if status["complete"]:
        state = "complete"
    elif status["changed_since_finished"]:
        several = len(status["changed_since_finished"]) > 1
        state = (f"incomplete: it finished, but part{'s' if several else ''} {ranges(status['changed_since_finished'])}"
                 f" went missing or changed since; rerun the same command to compute {'them' if several else 'it'} "
                 "again")
    elif status["running"]:
        state = f"running ({len(status['processes'])} process{'es' if len(status['processes']) > 1 else ''})"
    else:
        state = "stopped before the end: rerun the same command to resume"
    lines = [
        f"{status['output']}: {status['name']} ({status['fingerprint']}), {state}",
        f"  parts   {status['parts_done']}{total}" + (f" ({status['done']})" if status["done"] else "")
        + (f", {status['damaged_parts']} damaged (redone on resume)" if status["damaged_parts"] else ""),
        f"  rows    {status['rows_done']:,}{rows_total}, {status['failed_rows']:,} failed",
    ]
    if status["rows_per_second"] is not None:
        eta = status["eta_seconds"]
        lines.append(f"  speed   {status['rows_per_second']:,.1f} rows/s" + (f", ETA {eta:,.0f}s" if eta else ""))
    if status.get("evaluation"):
        lines.append(f"  scores  {score_line(status['evaluation'])}")
    for process in status["processes"]:
        heartbeat = process["heartbeat"]
        lines.append(f"  process {_who(process)}: pid {process['pid']} on {process['host']}, "
                     f"{process['rows_per_second'] or 0:,.1f} rows/s, {process['parts_done'] or 0} parts done, "
                     f"heartbeat {f'{time.time() - heartbeat:.0f}s ago' if heartbeat is not None else 'unknown'}, "
                     f"claims {_claims(process['claims'])}")
    for shard in status["shards"] or []:
        state = "finished" if shard["finished"] else "not finished"
        lines.append(f"  shard   {shard['shard']}: {shard['parts_done']}/{shard['parts']} parts, {state}")
    return "\n".join(lines)


def _who(process: dict) -> str:
    words = []
    if (process.get("world_size") or 1) > 1:
        words.append(f"rank {process['rank']}/{process['world_size']}")
    if (process.get("num_shards") or 1) > 1:
        words.append(f"shard {process['shard_index']}/{process['num_shards']}")
    return " ".join(words) or "single"


def _claims(claims: list) -> str:
    parts = [str(claim) for claim in claims]
    return ", ".join(parts[:8]) + (", ..." if len(parts) > 8 else "") if parts else "none"
