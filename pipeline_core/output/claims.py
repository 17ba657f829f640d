"""Several processes, one output directory: who is working on it, and which part each one computes.

Each process announces itself in a hidden worker record (`.worker-ID.json`: host, pid, rank or shard, rows/s),
rewritten every HEARTBEAT_EVERY seconds. Before computing part i a process claims it by creating
`.claim-00000i.G` exclusively (G, the generation, starts at 0). A claim is stale when its holder's record is gone,
was last rewritten over STALE_AFTER seconds ago (any host: a preempted node), or names a process that no longer
exists (same host: kill -9, a torchrun restart). A stale claim is taken over by creating generation G+1, which
exactly one process can do. No claim is ever overwritten, and none is deleted before its part is committed: a
holder gives an uncommitted part back by creating the next generation as a release (again exclusively), so a
holder that was judged dead and taken over can never remove the claim of the process that took it over.

Claims only keep healthy processes from computing a part twice; they are not what makes output correct. Parts are
committed by an atomic rename, so even two processes that both believe they hold a part (a holder wrongly judged
dead) each write a complete file with the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from pipeline_core.output.run_dir import (
    CLAIM_PATTERN,
    OWN_WORKERS,
    claim_name,
    create_claim,
    is_live,
    read_json,
    remove_claim,
    remove_worker_record,
    worker_name,
    write_worker_record,
)

log = logging.getLogger("batchrun")
HEARTBEAT_EVERY = 15.0
RETRY_EVERY = 2.0  # after a failed heartbeat write: well within STALE_AFTER, so others never see this one as gone
LIVENESS_CACHE_SECONDS = 5.0  # a pass over thousands of claims held by one peer reads its record once
FINISH = "finish"  # the claim that lets exactly one process write _SUCCESS
VANISHED = "\0vanished"  # a claim that disappeared between two looks at it
UNREADABLE = "\0unreadable"  # a claim that cannot be read yet: left alone until TORN_CLAIM_GRACE has passed
RELEASED = "\0released"  # a generation that gives the part back: the next claim takes it without a takeover
TORN_CLAIM_GRACE = 10.0  # claims are created whole (store.create); an unreadable one older than this is a leftover


def held_claims(store) -> dict[str, list]:
    """{worker id: [claim keys]}: who holds the top generation of each claim in OUTPUT."""
    top: dict[str, int] = {}
    for name in store.names():
        if match := CLAIM_PATTERN.fullmatch(name):
            top[match["key"]] = max(top.get(match["key"], -1), int(match["generation"]))
    held: dict = {}
    for key, generation in sorted(top.items()):
        holder = read_json(store, claim_name(key, generation))
        if holder is not None and isinstance(holder.get("worker"), str):  # a release, or an odd file: nobody's
            held.setdefault(holder["worker"], []).append(int(key) if key.isdigit() else key)
    return held


class Worker:
    """This process in OUTPUT: its record, kept fresh by a heartbeat thread, and its claims."""

    def __init__(self, store, labels: dict, figures: Callable[[], dict] | None = None):
        self.store = store
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        now = time.time()
        self.record = {"worker": self.id, "host": socket.gethostname(), "pid": os.getpid(), **labels,
                       "state": "running", "started": now, "heartbeat": now}
        self.figures = figures or dict  # the process's current figures (rows/s, parts done), merged into the record
        self.claims = Claims(store, self.id)
        OWN_WORKERS.add(self.id)
        self._failing = False  # the last write of the record failed (logged once, not at every heartbeat)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="batchrun-heartbeat", daemon=True)

    def __enter__(self) -> Worker:
        self.write()  # the first write must succeed: a process others cannot see must not claim parts
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.record["state"] == "running":
            self.beat(state="stopped" if exc_info[0] is not None else "finished")
        # no longer at work, even where that last write failed (a store gone away): a later run in this same
        # process (a caller that runs jobs in process) takes its claims over instead of waiting for them to go stale
        OWN_WORKERS.discard(self.id)
        return False

    def retire(self) -> None:
        """Remove the record: the job is complete, nobody needs to know this process was here."""
        remove_worker_record(self.store, self.id)

    def write(self, state: str | None = None) -> None:
        """Rewrite the record (the heartbeat); `state` running, finished or stopped."""
        if state is not None:
            self.record["state"] = state
        self.record.update(self.figures())
        self.record["heartbeat"] = time.time()
        write_worker_record(self.store, self.id, self.record)

    def beat(self, state: str | None = None) -> None:
        """Rewrite the record, riding out a failed write (a transient EIO, a full disk for a moment): the record
        only tells others this process is alive, and the next beat may succeed."""
        try:
            self.write(state)
        except Exception as error:  # noqa: BLE001 - whatever the store raised, the heartbeat must go on
            if not self._failing:
                log.warning("could not rewrite this process's record in %s (%s); retrying every %.0fs",
                            self.store, error, RETRY_EVERY)
            self._failing = True
            return
        if self._failing:
            log.info("this process's record in %s is written again", self.store)
        self._failing = False

    def _beat(self) -> None:
        while not self._stop.wait(RETRY_EVERY if self._failing else HEARTBEAT_EVERY):
            self.beat()


class Claims:
    """Claims taken as one worker. Small and picklable: DataLoader workers claim the parts they will read."""

    def __init__(self, store, worker_id: str):
        self.store = store
        self.worker_id = worker_id
        self._liveness: dict = {}

    def claim(self, key: int | str) -> bool:
        """True when this process now holds `key`'s claim (a new one, a stale one taken over, or its own)."""
        for _ in range(100):  # each round loses a race to another process; a handful is already unusual
            generation = self._top_generation(key)
            holder = self._holder(key, generation)
            if holder == VANISHED:
                continue  # released, or removed after a commit, since we looked
            if holder == self.worker_id:
                return True
            if holder == UNREADABLE or (holder not in (None, RELEASED) and self.holder_is_live(holder)):
                return False
            if create_claim(self.store, key, generation + 1, self._claim_record()):
                if generation >= 0 and holder != RELEASED:
                    log.info("took over %s from %s, which is gone", _label(key), holder or "a claim naming no process")
                return True
        return False

    def available(self, key: int | str) -> bool:
        """True when `key` is unclaimed, claimed by this process, or its holder is gone: a claim would succeed."""
        holder = self._holder(key, self._top_generation(key))
        if holder == UNREADABLE:
            return False
        return holder in (None, VANISHED, RELEASED, self.worker_id) or not self.holder_is_live(holder)

    def release(self, key: int | str, done: bool) -> None:
        """A committed part's claims all go (every generation: nobody needs them once the part exists). An
        uncommitted part is given back only if this process still holds it: by creating the next generation as a
        release, which fails if another process has taken the claim over meanwhile. Removing our own generation
        instead could, in that race, remove it from under the taker's and open a gap that hides the taker's claim."""
        generation = self._top_generation(key)
        if done:
            for current in range(generation, -1, -1):
                remove_claim(self.store, key, current)
        elif generation >= 0 and self._holder(key, generation) == self.worker_id:
            create_claim(self.store, key, generation + 1, self._release_record())

    def release_all(self) -> None:
        """Give back every claim this worker holds at the top generation (parts claimed ahead by the loader, when
        the run stops); a claim someone took over is theirs and stays."""
        for name in self.store.names():
            match = CLAIM_PATTERN.fullmatch(name)
            if match and (read_json(self.store, name) or {}).get("worker") == self.worker_id:
                self.release(_key(match["key"]), done=False)

    def _holder(self, key: int | str, generation: int) -> str | None:
        """The worker id holding the top generation; None when unclaimed, or unreadable for long (a writer killed
        mid-write: nobody holds it); VANISHED when it went while we looked; UNREADABLE when unreadable but young;
        RELEASED when its holder gave it back."""
        if generation < 0:
            return None
        name = claim_name(key, generation)
        raw = self.store.get(name)
        if raw is None:
            return VANISHED
        try:
            holder = json.loads(raw)
        except ValueError:  # torn by a writer killed mid-write (only where claims cannot be created whole)
            return None if self.store.age(name) > TORN_CLAIM_GRACE else UNREADABLE
        if not isinstance(holder, dict):
            return None  # complete, but no claim of ours (`null`, edited by hand): nobody holds it
        if holder.get("released") is not None:
            return RELEASED
        return holder.get("worker") if isinstance(holder.get("worker"), str) else None

    def holder_is_live(self, worker_id: str | None) -> bool:
        if worker_id == self.worker_id:
            return True
        cached = self._liveness.get(worker_id)
        if cached is not None and time.monotonic() - cached[0] < LIVENESS_CACHE_SECONDS:
            return cached[1]
        live = worker_id is not None and is_live(read_json(self.store, worker_name(worker_id)))
        self._liveness[worker_id] = (time.monotonic(), live)
        return live

    def _top_generation(self, key: int | str) -> int:
        generation = -1
        while self.store.exists(claim_name(key, generation + 1)):
            generation += 1
        return generation

    def _claim_record(self) -> dict:
        return {"worker": self.worker_id, "claimed": time.time()}

    def _release_record(self) -> dict:
        return {"worker": None, "released": time.time(), "by": self.worker_id}


def _key(label: str) -> int | str:
    return int(label) if label.isdigit() else label


def _label(key: int | str) -> str:
    return f"part {key}" if isinstance(key, int) else f"the {key} claim"
