"""One live run per output directory: a lock file naming its owner, kept fresh by a heartbeat.

A second run on a locked directory exits 75 at once, saying who holds it. A lock whose owner process is gone
(same host) or whose heartbeat is older than STALE_AFTER seconds (any host, e.g. a preempted node) is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from pipeline_core.errors import EXIT_INTERRUPTED, BatchrunError

log = logging.getLogger("batchrun")
LOCK = ".batchrun.lock"  # hidden: Parquet readers never see it
HEARTBEAT_EVERY = 15.0
STALE_AFTER = 120.0


class OutputLocked(BatchrunError):
    exit_code = EXIT_INTERRUPTED  # a scheduler retries later; the live run may finish the job meanwhile


def owner_record() -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "heartbeat": now}


def lock_state(store) -> dict | None:
    """The lock's record, with "stale": True when its owner is gone; None when unlocked."""
    raw = store.get(LOCK)
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {"stale": True}  # a lock torn by a crash mid-write
    record["stale"] = _is_stale(record)
    return record


def _is_stale(record: dict) -> bool:
    if time.time() - record.get("heartbeat", 0) > STALE_AFTER:
        return True
    if record.get("host") == socket.gethostname():
        return not _alive(record.get("pid"))
    return False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # no process to ask about (and os.kill(-1, ...) would reach every process): the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class RunLock:
    """`with RunLock(store):` holds the output directory for this process, heartbeat included."""

    def __init__(self, store):
        self.store = store
        self.record = owner_record()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="batchrun-heartbeat", daemon=True)

    def __enter__(self):
        data = json.dumps(self.record).encode()
        if not self.store.create(LOCK, data):
            state = lock_state(self.store)
            if state is not None and not state["stale"]:
                age = time.time() - state.get("heartbeat", time.time())
                raise OutputLocked(
                    f"{self.store} is locked by a live run: pid {state.get('pid')} on {state.get('host')}, "
                    f"heartbeat {age:.0f}s ago; retry when it has finished"
                )
            log.warning("taking over the stale lock of pid %s on %s", state and state.get("pid"),
                        state and state.get("host"))
            self.store.remove(LOCK)
            if not self.store.create(LOCK, data):
                raise OutputLocked(f"{self.store} was locked by another run at the same moment; retry later")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            self.record["heartbeat"] = time.time()
            self.store.put(LOCK, json.dumps(self.record).encode())

    def __exit__(self, *exc_info):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.store.remove(LOCK)
        return False
