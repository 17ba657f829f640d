"""batchrun's own lock: a start is refused (exit 75) while a live process of another start works on its share.

Cron and Airflow start a job on a schedule; a start that overlaps a run still at work must not join it (the
scheduler would count two runs, and two attempts' logs would tell one story) but exit 75 at once, before any model
loads, so that a later start resumes. The lock is the worker records (output/run_dir.py) read at the start: no lock
file a killed run could leave behind, since a record of a dead process (its pid gone on this host, or its heartbeat
over 2 minutes old) is not live. It is advice, not exclusion: two starts at the same instant may both pass, and
claims keep their output correct.
"""

from __future__ import annotations

import time

from pipeline_core.errors import OutputBusy


def _count(record: dict, key: str, default: int) -> int:
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def shares_overlap(mine: dict, other: dict) -> bool:
    """Whether two processes may compute the same parts, from their records' labels. One unsharded process covers
    every part; shards of one count overlap only when they are the same shard (a scheduler's duplicate attempt).
    Shards of different counts are taken to overlap: their blocks depend on the number of parts, unknown here."""
    mine_shards, other_shards = _count(mine, "num_shards", 1), _count(other, "num_shards", 1)
    if mine_shards == 1 or other_shards == 1 or mine_shards != other_shards:
        return True
    return _count(mine, "shard_index", 0) == _count(other, "shard_index", 0)


def same_launch(mine: dict, other: dict) -> bool:
    """Processes of one launcher's group (any restart of it): their ranks share the share, they do not lock it."""
    return mine.get("launch") is not None and other.get("launch") == mine.get("launch")


def locking_records(records: list[dict], labels: dict) -> list[dict]:
    """The live records of other starts whose share overlaps the one `labels` describe, longest running first."""
    found = [record for record in records
             if record["live"] and not same_launch(labels, record) and shares_overlap(labels, record)]
    return sorted(found, key=lambda record: _number(record.get("started")))


def refuse_if_locked(store, labels: dict, records: list[dict]) -> None:
    """Exit 75 naming the live process when another start is at work on this start's share. `records`: OUTPUT's
    worker records (run_dir.worker_records), read just before."""
    found = locking_records(records, labels)
    if not found:
        return
    record = found[0]
    age = max(0.0, time.time() - _number(record.get("heartbeat")))
    more = f" (and {len(found) - 1} more live process(es))" if len(found) > 1 else ""
    raise OutputBusy(f"{store} is locked by a live run: pid {record.get('pid')} on {record.get('host')} "
                     f"({describe(record)}), heartbeat {age:.0f}s ago{more}; not started: retry once it has "
                     "finished, and the rerun resumes (or exits at once if the job is done)")


def describe(record: dict) -> str:
    """"shard 1/4, rank 0/2", "rank 1/2", or "one process"."""
    words = []
    if _count(record, "num_shards", 1) > 1:
        words.append(f"shard {record.get('shard_index')}/{record.get('num_shards')}")
    if _count(record, "world_size", 1) > 1:
        words.append(f"rank {record.get('rank')}/{record.get('world_size')}")
    return ", ".join(words) or "one process"


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
