"""Files of a run directory as other processes leave them, written by hand: worker records, claims, dead pids."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline_core.output.run_dir import claim_name, worker_name


def write_record(directory: Path, worker: str, pid: int | None = 4242, host: str = "another-node",
                 heartbeat_age: float = 3.0, state: str = "running", **labels) -> dict:
    """A worker record as claims.Worker writes it; `pid` None leaves the pid out."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"worker": worker, "host": host, "pid": pid, "rank": 0, "world_size": 1, "local_rank": None,
              "shard_index": 0, "num_shards": 1, "device": "cpu", "state": state, "started": now - 600,
              "heartbeat": now - heartbeat_age, "rows_per_second": 12.5, "parts_done": 3, "rows_done": 12,
              **labels}
    if pid is None:
        del record["pid"]
    (directory / worker_name(worker)).write_text(json.dumps(record))
    return record


def write_claim(directory: Path, key: int | str, generation: int, worker: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / claim_name(key, generation)).write_text(json.dumps({"worker": worker, "claimed": time.time()}))


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped): nobody's, until the system reuses it."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
