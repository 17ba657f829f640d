"""Several processes, one OUTPUT: worker records (heartbeat, states, when a process counts as live), claims (new,
own, held, stale and taken over by the next generation, races, release), and `batchrun status` telling live
processes, stopped runs, shards and complete runs apart through them.

Records and claims of other processes are files written here, as their processes would write them; "a live
process of this host" is a child process each test starts itself, and "a dead one" a child that has exited.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from output_files import write_claim, write_record

from jobs import rows, run, write_job
from pipeline_core import status as status_module
from pipeline_core.cli import run_cli
from pipeline_core.errors import OutputBusy
from pipeline_core.output import claims as claims_module
from pipeline_core.output import run_dir as run_dir_module
from pipeline_core.output.claims import FINISH, Claims, Worker, held_claims
from pipeline_core.output.run_dir import (
    CLAIM_PATTERN,
    WORKER_PATTERN,
    claim_name,
    commit_part,
    is_live,
    part_name,
    read_json,
    worker_name,
    worker_records,
)
from pipeline_core.output.store import LocalStore
from pipeline_core.status import render_status, run_status

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
ME, OTHER, THIRD = "node-1-111111", "node-2-222222", "node-3-333333"


def claims_on_disk(directory: Path) -> dict[str, str | None]:
    """{claim file: the worker it names ("released" for a release, None when torn)}."""
    claims = {}
    for path in sorted(directory.glob(".claim-*")):
        claim = read_json(LocalStore(directory), path.name) or {}
        claims[path.name] = "released" if claim.get("released") else claim.get("worker")
    return claims


def read_record(directory: Path, worker: str) -> dict:
    return json.loads((directory / worker_name(worker)).read_text())


@pytest.fixture
def live_process():
    """A process of this host that is alive for the whole test. It takes every signal's default action, even when
    started under nohup, so a probe that sent it a real signal would end it."""
    owner = ("import signal, time\nfor number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):\n"
             "    signal.signal(number, signal.SIG_DFL)\nprint('ready', flush=True)\ntime.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"  # its signal handlers are set
    yield process
    process.kill()
    process.wait()
    process.stdout.close()


class Clock:
    """A stand-in for claims.py's `time`: wall clock and monotonic clock both under the test's control."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now
        self.ticks = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.ticks


# --- the heartbeat ---------------------------------------------------------------------------------------------


def test_heartbeat_period_and_staleness_threshold_are_what_the_docs_say():
    page = " ".join((ROOT / "docs" / "output.md").read_text().split())
    assert "heartbeat every 15 s" in page and "over 2 minutes old" in page
    assert (claims_module.HEARTBEAT_EVERY, run_dir_module.STALE_AFTER) == (15.0, 120.0)
    assert claims_module.LIVENESS_CACHE_SECONDS == 5.0


def test_the_record_names_this_process_and_its_heartbeat_is_rewritten_by_the_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(claims_module, "HEARTBEAT_EVERY", 0.02)
    beats = iter(range(1, 10_000))
    labels = {"rank": 1, "world_size": 2, "local_rank": 1, "shard_index": 0, "num_shards": 1, "device": "cpu"}
    with Worker(LocalStore(tmp_path), labels, figures=lambda: {"parts_done": next(beats)}) as worker:
        first = read_record(tmp_path, worker.id)
        assert re.fullmatch(rf"{re.escape(HOST)}-{os.getpid()}-[0-9a-f]{{6}}", worker.id)
        assert WORKER_PATTERN.fullmatch(worker_name(worker.id))
        assert {key: first[key] for key in ("worker", "host", "pid", "state", *labels)} == {
            "worker": worker.id, "host": HOST, "pid": os.getpid(), "state": "running", **labels}
        assert first["parts_done"] == 1 and first["started"] <= first["heartbeat"] < first["started"] + 5
        assert sorted(first) == sorted(["worker", "host", "pid", *labels, "state", "started", "heartbeat",
                                        "parts_done"])  # nothing else
        seen = {first["heartbeat"]}
        deadline = time.monotonic() + 3
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
            seen.add(read_record(tmp_path, worker.id)["heartbeat"])
        latest = read_record(tmp_path, worker.id)
        assert len(seen) >= 4  # rewritten again and again, not once
        assert latest["heartbeat"] > first["heartbeat"] and latest["parts_done"] > 1  # the figures of each beat
        assert {key: latest[key] for key in ("worker", "host", "pid", "started", "state")} == \
               {key: first[key] for key in ("worker", "host", "pid", "started", "state")}
    assert sorted(os.listdir(tmp_path)) == [worker_name(worker.id)]  # no temporary of a heartbeat's write left
    assert read_record(tmp_path, worker.id)["state"] == "finished"


def test_the_heartbeat_waits_its_period_between_beats(tmp_path, monkeypatch):
    monkeypatch.setattr(claims_module, "HEARTBEAT_EVERY", 0.5)
    writes = []
    with Worker(LocalStore(tmp_path), {}, figures=lambda: writes.append(time.monotonic()) or {}):
        time.sleep(0.2)
        assert len(writes) == 1  # only the record written on entering: the first beat is a period later
    assert len(writes) == 2  # and the final state, written on leaving


def test_heartbeat_runs_in_a_named_daemon_thread_that_stops_with_the_worker(tmp_path):
    with Worker(LocalStore(tmp_path), {}) as worker:
        beating = [thread for thread in threading.enumerate() if thread.name == "batchrun-heartbeat"]
        assert beating == [worker._thread] and worker._thread.daemon is True  # never keeps a dying process alive
    assert not worker._thread.is_alive()


def test_a_worker_that_ends_normally_is_finished_and_one_that_raises_is_stopped(tmp_path):
    with Worker(LocalStore(tmp_path), {}) as finished:
        assert read_record(tmp_path, finished.id)["state"] == "running"
    with pytest.raises(RuntimeError, match="boom"), Worker(LocalStore(tmp_path), {}) as failed:
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), Worker(LocalStore(tmp_path), {}) as interrupted:
        raise KeyboardInterrupt
    assert [read_record(tmp_path, worker.id)["state"] for worker in (finished, failed, interrupted)] == [
        "finished", "stopped", "stopped"]
    assert not any(record["live"] for record in worker_records(LocalStore(tmp_path)))


def test_a_state_written_before_the_end_is_kept(tmp_path):
    """The runner writes "stopped" (a stop request) or "finished" itself; leaving the block must not overwrite it."""
    with Worker(LocalStore(tmp_path), {}) as stopped:
        stopped.write(state="stopped")
    with pytest.raises(ValueError), Worker(LocalStore(tmp_path), {}) as finished:
        finished.write(state="finished")
        raise ValueError
    assert read_record(tmp_path, stopped.id)["state"] == "stopped"
    assert read_record(tmp_path, finished.id)["state"] == "finished"


def test_retire_removes_the_record(tmp_path):
    with Worker(LocalStore(tmp_path), {}) as worker:
        pass
    worker.retire()
    assert os.listdir(tmp_path) == []


# --- is_live ---------------------------------------------------------------------------------------------------


def record(**fields) -> dict:
    return {"state": "running", "host": "another-node", "pid": 4242, "heartbeat": time.time() - 3, **fields}


def test_no_record_and_records_not_running_are_not_live():
    assert is_live(None) is False and is_live({}) is False
    for state in ("finished", "stopped", None, "RUNNING"):
        assert is_live(record(state=state)) is False, state
    assert is_live(record()) is True


def test_a_dead_process_of_this_host_is_not_live_even_with_a_fresh_heartbeat(dead_pid):
    assert is_live(record(host=HOST, pid=dead_pid, heartbeat=time.time())) is False


def test_a_live_process_of_this_host_with_a_fresh_heartbeat_is_live_and_gets_no_signal(live_process):
    assert is_live(record(host=HOST, pid=live_process.pid)) is True
    with pytest.raises(subprocess.TimeoutExpired):
        live_process.wait(timeout=0.3)  # still running: probed with signal 0, not killed


def test_a_live_process_with_a_heartbeat_over_2_minutes_old_is_not_live(live_process):
    assert is_live(record(host=HOST, pid=live_process.pid, heartbeat=time.time() - 130)) is False  # hung


@pytest.mark.parametrize("age, live", [(1.0, True), (100.0, True), (115.0, True), (130.0, False), (3600.0, False)])
def test_a_process_of_another_host_is_judged_by_its_heartbeat_alone(dead_pid, age, live):
    # its pid means nothing here: even the pid of a process of this host that has exited does not make it dead
    assert is_live(record(pid=dead_pid, heartbeat=time.time() - age)) is live


def test_a_heartbeat_exactly_2_minutes_old_is_still_live():
    now = 1_700_000_000.0
    assert is_live(record(heartbeat=now - 120.0), now) is True
    assert is_live(record(heartbeat=now - 120.5), now) is False


def test_a_record_without_a_heartbeat_is_not_live(live_process):
    assert is_live({"state": "running", "host": HOST, "pid": live_process.pid}) is False


def test_this_hosts_record_without_a_pid_is_judged_by_its_heartbeat_and_nothing_is_signalled(monkeypatch):
    """Without a pid (or with a pid of 0 or below) nothing proves the process gone, and no process is signalled at
    all (os.kill(-1, ...) would reach every process of the machine). Checked against a stand-in for os.kill, so
    no mutant can send a real signal."""
    probes = []
    monkeypatch.setattr(claims_module.os, "kill", lambda pid, signal: probes.append((pid, signal)))
    for fields in ({}, {"pid": None}, {"pid": -1}, {"pid": 0}, {"pid": "12"}, {"pid": 1.5}):
        fresh = {"state": "running", "host": HOST, "heartbeat": time.time(), **fields}
        assert is_live(fresh) is True, fields
        assert is_live({**fresh, "heartbeat": time.time() - 121}) is False, fields
    assert probes == []


def test_a_process_this_user_may_not_signal_is_live(monkeypatch):
    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(claims_module.os, "kill", kill)
    assert is_live(record(host=HOST, pid=4242)) is True


def test_a_torn_or_foreign_record_is_no_record(tmp_path):
    store = LocalStore(tmp_path)
    (tmp_path / worker_name("torn")).write_text('{"worker": "torn", "state": "runn')
    (tmp_path / worker_name("empty")).write_text("")
    (tmp_path / worker_name("list")).write_text("[1, 2]")
    for name in ("torn", "empty", "list"):
        assert read_json(store, worker_name(name)) is None
    assert read_json(store, worker_name("missing")) is None
    assert worker_records(store) == []
    assert Claims(store, ME).holder_is_live("torn") is False


# --- worker_records --------------------------------------------------------------------------------------------


def test_worker_records_are_every_record_live_or_not_and_nothing_else(tmp_path, dead_pid):
    live = write_record(tmp_path, OTHER)
    stale = write_record(tmp_path, THIRD, heartbeat_age=3600)
    dead = write_record(tmp_path, "here-1-aaaaaa", host=HOST, pid=dead_pid)
    finished = write_record(tmp_path, "here-2-bbbbbb", state="finished")
    for name in (".worker-.json", "worker-x.json", ".worker-x.json.tmp-4242-0a1b2c3d", ".worker-x.txt",
                 ".claim-000000.0", "_batchrun.json"):
        (tmp_path / name).write_text(json.dumps(record(worker="x")))
    found = worker_records(LocalStore(tmp_path))
    assert found == sorted([{**live, "live": True}, {**stale, "live": False}, {**dead, "live": False},
                            {**finished, "live": False}], key=lambda found: worker_name(found["worker"]))


# --- claims ----------------------------------------------------------------------------------------------------


def test_claim_names_are_padded_part_indices_or_words_with_a_generation():
    assert (claim_name(123, 0), claim_name(0, 12), claim_name(FINISH, 1)) == (
        ".claim-000123.0", ".claim-000000.12", ".claim-finish.1")
    assert CLAIM_PATTERN.fullmatch(".claim-000123.12").groupdict() == {"key": "000123", "generation": "12"}
    assert not CLAIM_PATTERN.fullmatch(".claim-000123") and not CLAIM_PATTERN.fullmatch(".claim-000123.1.tmp-7")


def test_a_new_claim_is_created_at_generation_0_naming_the_worker(tmp_path):
    claims = Claims(LocalStore(tmp_path), ME)
    before = time.time()
    assert claims.claim(7) is True
    assert os.listdir(tmp_path) == [".claim-000007.0"]
    made = json.loads((tmp_path / ".claim-000007.0").read_text())
    assert made["worker"] == ME and before <= made["claimed"] <= time.time()


def test_claiming_again_what_this_worker_holds_succeeds_without_a_new_generation(tmp_path):
    claims = Claims(LocalStore(tmp_path), ME)
    assert claims.claim(7) is True and claims.claim(7) is True
    write_record(tmp_path, OTHER, heartbeat_age=3600)
    write_claim(tmp_path, 8, 0, OTHER)
    assert claims.claim(8) is True and claims.claim(8) is True
    assert claims_on_disk(tmp_path) == {".claim-000007.0": ME, ".claim-000008.0": OTHER, ".claim-000008.1": ME}


def test_a_claim_held_by_a_live_worker_is_refused_and_left_alone(tmp_path, live_process):
    write_record(tmp_path, OTHER)  # another host's, heartbeat 3 s old
    write_record(tmp_path, THIRD, host=HOST, pid=live_process.pid)
    write_claim(tmp_path, 7, 0, OTHER)
    write_claim(tmp_path, 8, 0, ME)
    write_claim(tmp_path, 8, 1, THIRD)  # took part 8 over from this worker, judged gone meanwhile
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    claims = Claims(LocalStore(tmp_path), ME)
    assert claims.claim(7) is False and claims.claim(8) is False
    assert claims.available(7) is False and claims.available(8) is False
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize("holder", ["stale heartbeat", "dead pid", "stopped", "finished", "no record", "torn record",
                                    "no worker named"])
def test_a_claim_whose_holder_is_gone_is_taken_over_by_the_next_generation_and_logged(tmp_path, dead_pid, caplog,
                                                                                         holder):
    caplog.set_level(logging.INFO, logger="batchrun")
    if holder == "stale heartbeat":
        write_record(tmp_path, OTHER, heartbeat_age=130)
    elif holder == "dead pid":
        write_record(tmp_path, OTHER, host=HOST, pid=dead_pid, heartbeat_age=0)
    elif holder in ("stopped", "finished"):
        write_record(tmp_path, OTHER, state=holder)
    elif holder == "torn record":
        (tmp_path / worker_name(OTHER)).write_text('{"worker": "node-2')
    write_claim(tmp_path, 7, 0, THIRD)  # an older holder, long gone
    if holder == "no worker named":
        (tmp_path / claim_name(7, 1)).write_text(json.dumps({"claimed": 0}))
    else:
        write_claim(tmp_path, 7, 1, OTHER)
    claims = Claims(LocalStore(tmp_path), ME)
    assert claims.available(7) is True
    assert claims.claim(7) is True
    gone = None if holder == "no worker named" else OTHER
    assert claims_on_disk(tmp_path) == {".claim-000007.0": THIRD, ".claim-000007.1": gone, ".claim-000007.2": ME}
    named = gone or "a claim naming no process"
    assert [record.getMessage() for record in caplog.records] == [f"took over part 7 from {named}, which is gone"]
    assert claims.claim(7) is True and len(caplog.records) == 1  # held now: nothing more to take over


def test_the_finish_claim_is_taken_over_like_a_parts(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchrun")
    write_record(tmp_path, OTHER, state="stopped")
    write_claim(tmp_path, FINISH, 0, OTHER)
    assert Claims(LocalStore(tmp_path), ME).claim(FINISH) is True
    assert claims_on_disk(tmp_path) == {".claim-finish.0": OTHER, ".claim-finish.1": ME}
    assert [record.getMessage() for record in caplog.records] == [f"took over the finish claim from {OTHER}, "
                                                                  "which is gone"]


def test_of_two_claimers_racing_for_a_stale_claim_exactly_one_wins(tmp_path):
    """Both see generation 0's holder gone and create generation 1; the store lets one create it. The loser looks
    again, finds the winner live at generation 1, and gives up: no generation 2."""

    class Racing(LocalStore):
        def create(self, name, data):
            if name == claim_name(7, 1) and not self.exists(name):
                write_claim(tmp_path, 7, 1, THIRD)  # the other claimer, a moment earlier
            return super().create(name, data)

    write_record(tmp_path, OTHER, heartbeat_age=3600)
    write_record(tmp_path, THIRD)
    write_claim(tmp_path, 7, 0, OTHER)
    assert Claims(Racing(tmp_path), ME).claim(7) is False
    assert claims_on_disk(tmp_path) == {".claim-000007.0": OTHER, ".claim-000007.1": THIRD}


def test_of_two_claimers_racing_for_a_new_claim_exactly_one_wins(tmp_path):
    class Racing(LocalStore):
        def create(self, name, data):
            if name == claim_name(7, 0) and not self.exists(name):
                write_claim(tmp_path, 7, 0, THIRD)
            return super().create(name, data)

    write_record(tmp_path, THIRD)
    assert Claims(Racing(tmp_path), ME).claim(7) is False
    assert claims_on_disk(tmp_path) == {".claim-000007.0": THIRD}


def test_of_many_claimers_in_threads_exactly_one_holds_each_part(tmp_path):
    workers = [f"node-{index}-{index:06d}" for index in range(6)]
    for worker in workers:
        write_record(tmp_path, worker)
    write_record(tmp_path, OTHER, heartbeat_age=3600)
    write_claim(tmp_path, 1, 0, OTHER)  # part 0 unclaimed, part 1 held by a gone worker
    start, won = threading.Barrier(len(workers)), {}

    def claim(worker):
        claims = Claims(LocalStore(tmp_path), worker)
        start.wait()
        won[worker] = [key for key in (0, 1) if claims.claim(key)]

    threads = [threading.Thread(target=claim, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = {key: [worker for worker, keys in won.items() if key in keys] for key in (0, 1)}
    assert [len(found) for found in winners.values()] == [1, 1], winners
    expected = {}
    for key, [winner] in winners.items():
        expected.setdefault(winner, []).append(key)
    assert held_claims(LocalStore(tmp_path)) == expected


def test_a_claim_released_between_looking_and_reading_is_claimed_afresh(tmp_path):
    """The holder committed the part and removed its claims right after this worker saw generation 0."""

    class Committing(LocalStore):
        def get(self, name):
            if name == claim_name(7, 0) and not hasattr(self, "committed"):
                self.committed = True
                self.remove(name)
            return super().get(name)

    write_record(tmp_path, OTHER)
    write_claim(tmp_path, 7, 0, OTHER)
    assert Claims(Committing(tmp_path), ME).claim(7) is True
    assert claims_on_disk(tmp_path) == {".claim-000007.0": ME}


def test_a_holders_liveness_is_read_once_per_5_seconds(tmp_path, monkeypatch):
    clock = Clock(time.time())
    monkeypatch.setattr(claims_module, "time", clock)
    write_record(tmp_path, OTHER)
    write_claim(tmp_path, 7, 0, OTHER)
    claims = Claims(LocalStore(tmp_path), ME)
    read_at = clock.ticks
    assert claims.claim(7) is False
    write_record(tmp_path, OTHER, state="stopped")  # it stops now
    clock.ticks = read_at + 4.9
    assert claims.claim(7) is False  # a pass over many parts held by one peer reads its record once
    clock.ticks = read_at + 5.0
    assert claims.claim(7) is True  # 5 s after the read: read again


@pytest.mark.parametrize("worker", [42, ["node-2-222222"], {"id": "node-2-222222"}])
def test_a_claim_naming_a_worker_that_is_no_worker_id_names_no_process_and_is_taken_over(tmp_path, caplog, worker):
    caplog.set_level(logging.INFO, logger="batchrun")
    (tmp_path / claim_name(7, 0)).write_text(json.dumps({"worker": worker, "claimed": 0}))
    (tmp_path / worker_name("42")).write_text(json.dumps(record(worker="42")))  # not what a claim of 42 names
    claims = Claims(LocalStore(tmp_path), ME)
    assert claims.available(7) is True
    assert claims.claim(7) is True
    assert claims_on_disk(tmp_path)[claim_name(7, 1)] == ME
    assert [record.getMessage() for record in caplog.records] == [
        "took over part 7 from a claim naming no process, which is gone"]


def test_a_claim_that_vanishes_at_every_look_is_given_up_on(tmp_path):
    """Each round sees generation 0, and each read finds it gone (released or committed meanwhile): after a bounded
    number of rounds the claim fails rather than loop for ever or report a part held that is not."""

    class Churning(LocalStore):
        reads = 0

        def get(self, name):
            if name == claim_name(7, 0):
                self.reads += 1
                return None
            return super().get(name)

    write_claim(tmp_path, 7, 0, OTHER)
    store = Churning(tmp_path)
    assert Claims(store, ME).claim(7) is False
    assert 1 < store.reads <= 1000
    assert claims_on_disk(tmp_path) == {".claim-000007.0": OTHER}


@pytest.mark.parametrize("age, available", [(claims_module.TORN_CLAIM_GRACE - 0.5, False),
                                            (claims_module.TORN_CLAIM_GRACE, False),
                                            (claims_module.TORN_CLAIM_GRACE + 0.5, True)])
def test_an_unreadable_claim_is_taken_over_only_once_older_than_the_grace(tmp_path, age, available):
    class Aged(LocalStore):
        def age(self, name):
            return age if name == claim_name(7, 0) else super().age(name)

    assert claims_module.TORN_CLAIM_GRACE == 10.0
    (tmp_path / claim_name(7, 0)).write_text('{"worker": "node-2')
    claims = Claims(Aged(tmp_path), ME)
    assert claims.available(7) is available and claims.claim(7) is available
    assert sorted(claims_on_disk(tmp_path)) == [claim_name(7, 0)] + ([claim_name(7, 1)] if available else [])


def test_a_torn_claim_long_left_by_a_dead_writer_is_taken_over(tmp_path):
    (tmp_path / claim_name(7, 0)).write_text("")
    an_hour_ago = time.time() - 3600
    os.utime(tmp_path / claim_name(7, 0), (an_hour_ago, an_hour_ago))
    claims = Claims(LocalStore(tmp_path), ME)
    assert claims.available(7) is True
    assert claims.claim(7) is True
    assert claims_on_disk(tmp_path)[".claim-000007.1"] == ME


def test_an_unreadable_claim_is_left_alone_while_young(tmp_path):
    (tmp_path / claim_name(7, 0)).write_text('{"worker": "node-2')  # torn, but written a moment ago
    claims = Claims(LocalStore(tmp_path), ME)
    assert claims.available(7) is False and claims.claim(7) is False
    assert sorted(path.name for path in tmp_path.iterdir()) == [claim_name(7, 0)]
    ten_seconds_ago = time.time() - claims_module.TORN_CLAIM_GRACE - 1
    os.utime(tmp_path / claim_name(7, 0), (ten_seconds_ago, ten_seconds_ago))
    assert claims.available(7) is True and claims.claim(7) is True
    assert claims_on_disk(tmp_path)[claim_name(7, 1)] == ME


def test_a_worker_judged_gone_that_gives_back_its_claims_leaves_the_taker_holding_them(tmp_path):
    write_record(tmp_path, ME)
    write_record(tmp_path, OTHER)
    write_claim(tmp_path, 7, 0, ME)
    write_claim(tmp_path, 7, 1, OTHER)  # took part 7 over while this worker's heartbeat was late
    Claims(LocalStore(tmp_path), ME).release_all()  # this worker stops
    assert Claims(LocalStore(tmp_path), THIRD).claim(7) is False
    assert held_claims(LocalStore(tmp_path)) == {OTHER: [7]}


# --- available, release, release_all, held_claims ----------------------------------------------------------------


def test_available_says_whether_a_claim_would_succeed_and_claims_nothing(tmp_path):
    write_record(tmp_path, OTHER)
    write_record(tmp_path, THIRD, heartbeat_age=3600)
    write_claim(tmp_path, 1, 0, ME)
    write_claim(tmp_path, 2, 0, OTHER)
    write_claim(tmp_path, 3, 0, THIRD)
    before = sorted(os.listdir(tmp_path))
    claims = Claims(LocalStore(tmp_path), ME)
    assert [claims.available(key) for key in (0, 1, 2, 3, FINISH)] == [True, True, False, True, True]
    assert sorted(os.listdir(tmp_path)) == before


def test_release_of_a_committed_part_removes_every_generation_whoever_holds_it(tmp_path):
    write_claim(tmp_path, 7, 0, OTHER)
    write_claim(tmp_path, 7, 1, THIRD)
    write_claim(tmp_path, 7, 2, ME)
    write_claim(tmp_path, 8, 0, OTHER)
    Claims(LocalStore(tmp_path), ME).release(7, done=True)
    assert claims_on_disk(tmp_path) == {".claim-000008.0": OTHER}


def test_release_of_an_uncommitted_part_gives_back_only_this_workers_top_generation(tmp_path):
    write_claim(tmp_path, 7, 0, OTHER)
    write_claim(tmp_path, 7, 1, ME)
    write_claim(tmp_path, 8, 0, ME)
    write_claim(tmp_path, 8, 1, OTHER)  # taken over from this worker: not this worker's to give back
    claims = Claims(LocalStore(tmp_path), ME)
    claims.release(7, done=False)
    claims.release(8, done=False)
    claims.release(9, done=False)  # never claimed: nothing happens
    claims.release(9, done=True)
    # given back by a release generation on top, never by removing a claim (which could be under a taker's)
    assert claims_on_disk(tmp_path) == {".claim-000007.0": OTHER, ".claim-000007.1": ME, ".claim-000007.2": "released",
                                        ".claim-000008.0": ME, ".claim-000008.1": OTHER}
    assert json.loads((tmp_path / claim_name(7, 2)).read_text())["by"] == ME  # who gave it back, for people
    assert Claims(LocalStore(tmp_path), THIRD).available(7) and not held_claims(LocalStore(tmp_path)).get(ME)


def test_a_claim_over_a_release_or_of_a_new_part_is_no_takeover(tmp_path, caplog):
    write_claim(tmp_path, 7, 0, ME)
    claims = Claims(LocalStore(tmp_path), ME)
    caplog.set_level(logging.INFO, logger="batchrun")
    claims.release(7, done=False)
    assert Claims(LocalStore(tmp_path), OTHER).claim(7) and Claims(LocalStore(tmp_path), OTHER).claim(8)
    assert claims_on_disk(tmp_path) == {".claim-000007.0": ME, ".claim-000007.1": "released",
                                        ".claim-000007.2": OTHER, ".claim-000008.0": OTHER}
    assert "took over" not in caplog.text  # only a claim taken from a holder that is gone is logged


def test_release_all_gives_back_every_claim_of_this_worker_and_only_those(tmp_path):
    write_claim(tmp_path, 1, 0, ME)
    write_claim(tmp_path, 2, 0, OTHER)
    write_claim(tmp_path, 3, 0, OTHER)
    write_claim(tmp_path, 3, 1, ME)
    write_claim(tmp_path, FINISH, 0, ME)
    (tmp_path / claim_name(4, 0)).write_text('{"worker": "node-1')  # torn: nobody's to remove
    (tmp_path / worker_name(ME)).write_text(json.dumps({"worker": ME}))
    Claims(LocalStore(tmp_path), ME).release_all()
    assert claims_on_disk(tmp_path) == {
        ".claim-000001.0": ME, ".claim-000001.1": "released", ".claim-000002.0": OTHER, ".claim-000003.0": OTHER,
        ".claim-000003.1": ME, ".claim-000003.2": "released", ".claim-000004.0": None, ".claim-finish.0": ME,
        ".claim-finish.1": "released"}
    assert (tmp_path / worker_name(ME)).exists()


def test_held_claims_are_the_holders_of_each_top_generation(tmp_path):
    write_claim(tmp_path, 1, 0, ME)
    write_claim(tmp_path, 12, 0, OTHER)
    write_claim(tmp_path, 3, 0, OTHER)
    write_claim(tmp_path, 3, 1, ME)  # taken over: ME holds part 3 now
    write_claim(tmp_path, FINISH, 0, OTHER)
    (tmp_path / claim_name(5, 0)).write_text("")  # torn: held by nobody known
    (tmp_path / ".claim-000006").write_text(json.dumps({"worker": OTHER}))  # not a claim
    for generation in range(11):  # part 4 taken over ten times: generation 10, not 9, is the top (not by name order)
        write_claim(tmp_path, 4, generation, ME if generation == 10 else OTHER)
    assert held_claims(LocalStore(tmp_path)) == {ME: [1, 3, 4], OTHER: [12, FINISH]}
    assert held_claims(LocalStore(tmp_path / "missing")) == {}


def test_claims_of_a_worker_that_stopped_are_taken_over_by_the_next(tmp_path):
    """Two real workers in this process: the first stops with an error (its record says so) while holding part 0."""
    store = LocalStore(tmp_path)
    with pytest.raises(RuntimeError), Worker(store, {}) as first:
        assert first.claims.claim(0) is True
        with Worker(store, {}) as second:
            assert second.claims.claim(0) is False  # live: its pid is this process
            assert second.claims.claim(1) is True
        raise RuntimeError("the disk went away")
    third = Claims(store, "node-9-999999")
    assert third.claim(0) is True and third.claim(1) is True  # both holders have stopped
    assert held_claims(store) == {"node-9-999999": [0, 1]}


def test_claims_pickle_for_dataloader_workers_without_their_cache(tmp_path):
    claims = Claims(LocalStore(tmp_path), ME)
    claims.holder_is_live(OTHER)
    copy = pickle.loads(pickle.dumps(claims))
    assert (copy.worker_id, copy.store.root) == (ME, tmp_path) and copy.claim(0) is True
    assert claims.claim(0) is True  # the same worker, whichever process claims


def test_output_busy_is_exit_75():
    assert OutputBusy("x").exit_code == 75


# --- status ----------------------------------------------------------------------------------------------------

FINGERPRINT = "0123456789abcdef"


def make_run(out: Path, parts_total: int | None, committed: list[int], rows_total: int | None = None,
             failed: dict[int, int] | None = None, damaged: tuple[int, ...] = (), complete: bool = False) -> None:
    """A run directory of parts of 4 rows, as the runner leaves it: run info, progress, and committed parts."""
    out.mkdir(parents=True, exist_ok=True)
    store = LocalStore(out)
    info = {"name": "tiny", "fingerprint": FINGERPRINT, "identity": {"output.rows_per_part": 4},
            "started": "2026-11-29T10:00:00+0000", "finished": "2026-11-29T10:05:00+0000" if complete else None}
    store.put("_batchrun.json", json.dumps(info).encode())
    progress = {"parts_total": parts_total, "rows_total": rows_total, "rows_per_second": 25.0,
                "eta_seconds": None if complete else 8.0}
    store.put("_progress.json", json.dumps(progress).encode())
    for index in committed:
        count = 4 if rows_total is None else min(4, rows_total - 4 * index)
        bad = (failed or {}).get(index, 0)
        table = pa.table({"row_id": pa.array(range(4 * index, 4 * index + count), pa.int64()),
                          "error": pa.array(["bad"] * bad + [None] * (count - bad), pa.string())})
        commit_part(store, index, table, "none", "another-run-0000" if index in damaged else FINGERPRINT)
    if complete:
        store.put("_SUCCESS", b"")


def status_of(out: Path, capsys, *args: str) -> str:
    assert run_cli(["status", str(out), *args]) == 0
    return capsys.readouterr().out


@pytest.fixture
def frozen_status_clock(monkeypatch) -> float:
    """status.py's clock, stopped at the moment the test began (the heartbeat ages it prints)."""
    now = time.time()
    monkeypatch.setattr(status_module, "time", Clock(now))
    return now


def test_status_of_a_live_run_of_several_processes_lists_them_with_their_claims(tmp_path, live_process, dead_pid,
                                                                                capsys, frozen_status_clock):
    out = tmp_path / "out"
    make_run(out, parts_total=6, committed=[0, 1], rows_total=22, failed={1: 1})
    rank_0 = write_record(out, "a-rank-0", host=HOST, pid=live_process.pid, heartbeat_age=3, rank=0, world_size=2,
                          local_rank=0, rows_per_second=10.25, parts_done=1)
    rank_1 = write_record(out, "b-rank-1", heartbeat_age=100, rank=1, world_size=2, local_rank=0,
                          rows_per_second=None, parts_done=None, device="cuda:0")
    write_record(out, "c-dead", host=HOST, pid=dead_pid, heartbeat_age=1)  # killed: its claims are not shown
    write_record(out, "d-stopped", state="stopped")
    for key, generation, worker in ((2, 0, "a-rank-0"), (3, 0, "a-rank-0"), (4, 0, "c-dead"), (4, 1, "b-rank-1"),
                                    (5, 0, "c-dead")):
        write_claim(out, key, generation, worker)
    found = json.loads(status_of(out, capsys, "--json"))
    assert found == {
        "output": str(out), "name": "tiny", "fingerprint": FINGERPRINT, "complete": False, "parts_done": 2,
        "done": "0-1",
        "parts_total": 6, "damaged_parts": 0, "changed_since_finished": [], "rows_done": 8, "rows_total": 22,
        "failed_rows": 1,
        "rows_per_second": 25.0, "eta_seconds": 8.0, "running": True,
        "processes": [
            {"host": HOST, "pid": live_process.pid, "rank": 0, "world_size": 2, "shard_index": 0, "num_shards": 1,
             "device": "cpu", "rows_per_second": 10.25, "parts_done": 1, "heartbeat": rank_0["heartbeat"],
             "claims": [2, 3]},
            {"host": "another-node", "pid": 4242, "rank": 1, "world_size": 2, "shard_index": 0, "num_shards": 1,
             "device": "cuda:0", "rows_per_second": None, "parts_done": None, "heartbeat": rank_1["heartbeat"],
             "claims": [4]},
        ],
        "shards": None, "started": "2026-11-29T10:00:00+0000", "finished": None, "evaluation": None,
    }
    assert status_of(out, capsys).splitlines() == [
        f"{out}: tiny ({FINGERPRINT}), running (2 processes)",
        "  parts   2/6 (0-1)",
        "  rows    8/22, 1 failed",
        "  speed   25.0 rows/s, ETA 8s",
        f"  process rank 0/2: pid {live_process.pid} on {HOST}, 10.2 rows/s, 1 parts done, heartbeat 3s ago, "
        "claims 2, 3",
        "  process rank 1/2: pid 4242 on another-node, 0.0 rows/s, 0 parts done, heartbeat 100s ago, claims 4",
    ]


def test_status_of_one_live_process_says_so_and_abbreviates_its_claims(tmp_path, capsys, frozen_status_clock):
    out = tmp_path / "out"
    make_run(out, parts_total=None, committed=[])
    write_record(out, OTHER, heartbeat_age=1)
    for key in range(10):
        write_claim(out, key, 0, OTHER)
    write_claim(out, FINISH, 0, OTHER)
    lines = status_of(out, capsys).splitlines()
    assert lines[0] == f"{out}: tiny ({FINGERPRINT}), running (1 process)"
    assert lines[1:3] == ["  parts   0", "  rows    0, 0 failed"]
    assert lines[4] == ("  process single: pid 4242 on another-node, 12.5 rows/s, 3 parts done, heartbeat 1s ago, "
                        "claims 0, 1, 2, 3, 4, 5, 6, 7, ...")


@pytest.mark.parametrize("leftover", ["stopped", "killed", "stale", "finished shard of one", "torn", "none"])
def test_status_of_a_stopped_run_says_to_rerun(tmp_path, dead_pid, capsys, leftover):
    out = tmp_path / "out"
    make_run(out, parts_total=2, committed=[0], rows_total=6, damaged=())
    if leftover == "stopped":
        write_record(out, OTHER, state="stopped")
    elif leftover == "killed":
        write_record(out, OTHER, host=HOST, pid=dead_pid, heartbeat_age=0)
    elif leftover == "stale":
        write_record(out, OTHER, heartbeat_age=130)
    elif leftover == "finished shard of one":
        write_record(out, OTHER, state="finished")
    elif leftover == "torn":
        (out / worker_name(OTHER)).write_text('{"state": "running", "heart')
    write_claim(out, 1, 0, OTHER)
    found = json.loads(status_of(out, capsys, "--json"))
    assert (found["running"], found["processes"], found["shards"], found["complete"]) == (False, [], None, False)
    assert (found["parts_done"], found["parts_total"], found["rows_done"], found["eta_seconds"]) == (1, 2, 4, 8.0)
    text = status_of(out, capsys)
    assert text.splitlines()[0] == (f"{out}: tiny ({FINGERPRINT}), stopped before the end: rerun the same command "
                                    "to resume")
    assert "process" not in text and "shard" not in text


def test_status_counts_damaged_parts_apart(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out, parts_total=3, committed=[0, 1, 2], rows_total=12, damaged=(1,))
    found = json.loads(status_of(out, capsys, "--json"))
    assert (found["parts_done"], found["damaged_parts"], found["rows_done"]) == (2, 1, 8)
    assert "  parts   2/3 (0, 2), 1 damaged (redone on resume)" in status_of(out, capsys).splitlines()


def test_status_of_shards_says_which_are_finished(tmp_path, capsys, frozen_status_clock):
    """8 parts in 3 shards: blocks [0, 1], [2, 3, 4], [5, 6, 7]; the shard count is the latest attempt's."""
    out = tmp_path / "out"
    make_run(out, parts_total=8, committed=[0, 1, 2, 4, 5], rows_total=30)
    write_record(out, "a-old", state="stopped", shard_index=1, num_shards=2, started=time.time() - 7200)
    write_record(out, "b-shard-0", state="finished", shard_index=0, num_shards=3)
    write_record(out, "c-shard-1", state="stopped", shard_index=1, num_shards=3)
    write_record(out, "d-shard-2", heartbeat_age=5, shard_index=2, num_shards=3, parts_done=1)
    write_claim(out, 6, 0, "d-shard-2")
    found = json.loads(status_of(out, capsys, "--json"))
    assert found["shards"] == [
        {"shard": 0, "parts": 2, "parts_done": 2, "finished": True},
        {"shard": 1, "parts": 3, "parts_done": 2, "finished": False},
        {"shard": 2, "parts": 3, "parts_done": 1, "finished": False},
    ]
    assert [(process["shard_index"], process["claims"]) for process in found["processes"]] == [(2, [6])]
    assert status_of(out, capsys).splitlines()[-4:] == [
        "  process shard 2/3: pid 4242 on another-node, 12.5 rows/s, 1 parts done, heartbeat 5s ago, claims 6",
        "  shard   0: 2/2 parts, finished",
        "  shard   1: 2/3 parts, not finished",
        "  shard   2: 1/3 parts, not finished",
    ]


def test_status_of_shards_all_finished_but_one_empty(tmp_path, capsys):
    """2 parts in 3 shards: shard 0's block is empty, and an empty block is finished."""
    out = tmp_path / "out"
    make_run(out, parts_total=2, committed=[0, 1], rows_total=8)
    for index in range(3):
        write_record(out, f"shard-{index}", state="finished", shard_index=index, num_shards=3)
    found = json.loads(status_of(out, capsys, "--json"))
    assert found["shards"] == [{"shard": 0, "parts": 0, "parts_done": 0, "finished": True},
                               {"shard": 1, "parts": 1, "parts_done": 1, "finished": True},
                               {"shard": 2, "parts": 1, "parts_done": 1, "finished": True}]
    assert (found["running"], found["complete"]) == (False, False)  # _SUCCESS is written by the last to finish


def test_status_of_shards_of_a_stream_of_unknown_length_lists_none(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out, parts_total=None, committed=[0, 1])
    write_record(out, "shard-0", state="finished", shard_index=0, num_shards=2)
    assert json.loads(status_of(out, capsys, "--json"))["shards"] is None


def test_status_of_a_complete_run_still_watched_by_a_live_process_says_complete(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out, parts_total=2, committed=[0, 1], rows_total=6, complete=True)
    write_record(out, OTHER, shard_index=1, num_shards=2)  # a shard that has not noticed yet
    found = json.loads(status_of(out, capsys, "--json"))
    assert (found["complete"], found["running"], found["eta_seconds"]) == (True, True, None)
    assert status_of(out, capsys).splitlines()[0] == f"{out}: tiny ({FINGERPRINT}), complete"


def test_status_of_a_directory_without_a_run_exits_2(tmp_path, capsys):
    write_record(tmp_path, OTHER)
    assert run_cli(["status", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no batchrun run (no _batchrun.json); check the path" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models) -> Path:
    """A real run of 6 rows in parts of 4, finished."""
    job = write_job(tmp_path_factory.mktemp("finished"), tiny_models.text_classifier, rows(6))
    assert run(job) == 0
    return job.parent / "out"


def test_status_of_a_real_complete_run(finished_run, capsys):
    assert not [name for name in os.listdir(finished_run) if name.startswith(".")]  # no record, no claim left
    found = run_status(str(finished_run))
    assert {key: found[key] for key in ("complete", "running", "processes", "shards", "parts_done", "parts_total",
                                        "rows_done", "rows_total", "failed_rows", "eta_seconds")} == {
        "complete": True, "running": False, "processes": [], "shards": None, "parts_done": 2, "parts_total": 2,
        "rows_done": 6, "rows_total": 6, "failed_rows": 0, "eta_seconds": None}
    text = render_status(found)
    assert text.splitlines()[0] == f"{finished_run}: {found['name']} ({found['fingerprint']}), complete"
    assert "process" not in text and "shard" not in text


def test_status_of_a_real_run_stopped_after_its_first_part(finished_run, tmp_path, dead_pid, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (out / "_SUCCESS").unlink()
    (out / part_name(1)).unlink()
    write_record(out, OTHER, host=HOST, pid=dead_pid, heartbeat_age=1)  # its process was killed
    write_claim(out, 1, 0, OTHER)
    found = json.loads(status_of(out, capsys, "--json"))
    assert (found["running"], found["complete"], found["parts_done"], found["rows_done"]) == (False, False, 1, 4)
    assert "stopped before the end: rerun the same command to resume" in status_of(out, capsys)


@pytest.mark.parametrize("indices, text", [([], ""), ([3], "3"), ([0, 1, 2], "0-2"),
                                           ([0, 2, 3, 4, 7, 9, 10], "0, 2-4, 7, 9-10")])
def test_which_parts_are_done_reads_as_ranges(indices, text):
    assert status_module.ranges(indices) == text
