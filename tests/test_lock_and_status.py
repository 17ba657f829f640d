"""The run lock (owner record, heartbeat, when a lock counts as stale and is taken over) and `batchrun status`
telling a live run from a stopped one through that lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import rows, run, write_job
from pipeline_core.cli import run_cli
from pipeline_core.output import lock as lock_module
from pipeline_core.output.lock import LOCK, OutputLocked, RunLock, lock_state
from pipeline_core.output.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


def write_lock(directory: Path, pid: int, host: str, heartbeat_age: float) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"pid": pid, "host": host, "started": now - heartbeat_age - 60, "heartbeat": now - heartbeat_age}
    (directory / LOCK).write_text(json.dumps(record))
    return record


def read_lock(directory: Path) -> dict:
    return json.loads((directory / LOCK).read_text())


@pytest.fixture
def live_process():
    """A process of this host that is alive for the whole test: the owner of a live lock. It takes every signal's
    default action, even when started under nohup, so a probe that sends a real signal ends it."""
    owner = ("import signal, time\nfor number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):\n"
             "    signal.signal(number, signal.SIG_DFL)\nprint('ready', flush=True)\ntime.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"  # its signal handlers are set
    yield process
    process.kill()
    process.wait()
    process.stdout.close()


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_heartbeat_period_and_staleness_threshold_are_what_the_readme_says():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "heartbeat every 15 s" in readme and "heartbeat is over 2 minutes old, is taken over" in readme
    assert (lock_module.HEARTBEAT_EVERY, lock_module.STALE_AFTER) == (15.0, 120.0)


def test_heartbeat_is_rewritten_while_the_lock_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "HEARTBEAT_EVERY", 0.02)
    store = LocalStore(tmp_path)
    with RunLock(store):
        first = read_lock(tmp_path)
        assert (first["pid"], first["host"]) == (os.getpid(), HOST)
        assert first["heartbeat"] == first["started"]
        beats = {first["heartbeat"]}
        deadline = time.monotonic() + 1.5
        while len(beats) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
            beats.add(read_lock(tmp_path)["heartbeat"])
        latest = read_lock(tmp_path)
        assert len(beats) >= 3  # rewritten again and again, not once
        assert latest["heartbeat"] > first["heartbeat"]
        assert {key: latest[key] for key in ("pid", "host", "started")} == \
               {key: first[key] for key in ("pid", "host", "started")}
    assert not (tmp_path / LOCK).exists()
    assert sorted(os.listdir(tmp_path)) == []  # nor any temporary of the heartbeat's writes


def test_lock_is_released_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RunLock(LocalStore(tmp_path)):
        assert (tmp_path / LOCK).exists()
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("age", [5.0, 100.0, 115.0])
def test_fresh_lock_of_another_host_is_not_taken_over(tmp_path, age):
    before = write_lock(tmp_path, 4242, "another-node", heartbeat_age=age)
    with pytest.raises(OutputLocked, match="locked by a live run: pid 4242 on another-node") as raised:
        with RunLock(LocalStore(tmp_path)):
            pytest.fail("a live lock was taken over")
    assert raised.value.exit_code == 75
    assert read_lock(tmp_path) == before


@pytest.mark.parametrize("age", [130.0, 3600.0])
def test_lock_of_another_host_with_a_heartbeat_over_2_minutes_old_is_taken_over(tmp_path, age):
    write_lock(tmp_path, 4242, "another-node", heartbeat_age=age)
    with RunLock(LocalStore(tmp_path)):
        mine = read_lock(tmp_path)
        assert (mine["pid"], mine["host"]) == (os.getpid(), HOST)
        assert time.time() - mine["heartbeat"] < 5
    assert not (tmp_path / LOCK).exists()


def test_second_run_exits_75_naming_the_holder_whose_heartbeat_is_100_s_old(tmp_path, tiny_models, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(3))
    before = write_lock(tmp_path / "out", 4242, "another-node", heartbeat_age=100)
    started = time.monotonic()
    assert run(job) == 75
    elapsed = time.monotonic() - started  # the age grows while the run starts up, slowly on a loaded machine
    err = capsys.readouterr().err
    assert "locked by a live run: pid 4242 on another-node, heartbeat " in err
    assert 100 <= int(re.search(r"heartbeat (\d+)s ago", err)[1]) <= 100 + elapsed + 1
    assert read_lock(tmp_path / "out") == before
    assert not (tmp_path / "out" / "_batchrun.json").exists()


def test_lock_state_without_a_lock_is_none(tmp_path):
    assert lock_state(LocalStore(tmp_path)) is None


def test_lock_torn_by_a_crash_mid_write_is_stale(tmp_path):
    (tmp_path / LOCK).write_text('{"pid": 12')
    assert lock_state(LocalStore(tmp_path)) == {"stale": True}


def test_lock_of_a_dead_process_on_this_host_is_stale_even_with_a_fresh_heartbeat(tmp_path, dead_pid):
    write_lock(tmp_path, dead_pid, HOST, heartbeat_age=0)
    state = lock_state(LocalStore(tmp_path))
    assert (state["pid"], state["host"], state["stale"]) == (dead_pid, HOST, True)


def test_lock_of_a_live_process_on_this_host_with_a_fresh_heartbeat_is_not_stale(tmp_path, live_process):
    write_lock(tmp_path, live_process.pid, HOST, heartbeat_age=1)
    state = lock_state(LocalStore(tmp_path))
    assert (state["pid"], state["host"], state["stale"]) == (live_process.pid, HOST, False)


def test_lock_of_a_live_process_with_a_heartbeat_over_2_minutes_old_is_stale(tmp_path, live_process):
    write_lock(tmp_path, live_process.pid, HOST, heartbeat_age=130)
    assert lock_state(LocalStore(tmp_path))["stale"] is True  # a hung run must not hold the output forever


def test_lock_of_another_host_cannot_be_checked_by_pid_so_a_fresh_one_is_live(tmp_path, dead_pid):
    write_lock(tmp_path, dead_pid, "another-node", heartbeat_age=1)
    assert lock_state(LocalStore(tmp_path))["stale"] is False


@pytest.fixture
def stopped_run(tmp_path, tiny_models, capsys) -> Path:
    """A run of 6 rows in 2 parts stopped after its first part: no _SUCCESS, part 1 missing."""
    job = write_job(tmp_path, tiny_models.text_classifier, rows(6))
    assert run(job) == 0
    out = tmp_path / "out"
    (out / "_SUCCESS").unlink()
    (out / "part-000001.parquet").unlink()
    capsys.readouterr()
    return out


def status(out: Path, capsys, *args: str) -> str:
    assert run_cli(["status", str(out), *args]) == 0
    return capsys.readouterr().out


def test_status_of_a_run_whose_lock_holder_is_alive_says_running(stopped_run, live_process, capsys):
    lock = write_lock(stopped_run, live_process.pid, HOST, heartbeat_age=3)
    found = json.loads(status(stopped_run, capsys, "--json"))
    assert (found["running"], found["complete"], found["parts_done"], found["rows_done"]) == (True, False, 1, 4)
    assert found["lock"] == {"pid": live_process.pid, "host": HOST, "heartbeat": lock["heartbeat"], "stale": False}
    text = status(stopped_run, capsys)
    assert f", running (pid {live_process.pid} on {HOST}, heartbeat " in text
    assert "stopped before the end" not in text


def test_status_of_a_finished_run_still_holding_its_lock_says_running_and_complete(tmp_path, tiny_models,
                                                                                   live_process, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(6))
    assert run(job) == 0
    write_lock(tmp_path / "out", live_process.pid, HOST, heartbeat_age=1)
    capsys.readouterr()
    found = json.loads(status(tmp_path / "out", capsys, "--json"))
    assert (found["running"], found["complete"], found["lock"]["pid"]) == (True, True, live_process.pid)


def test_status_of_a_run_whose_lock_holder_died_says_stopped(stopped_run, dead_pid, capsys):
    write_lock(stopped_run, dead_pid, HOST, heartbeat_age=3)
    found = json.loads(status(stopped_run, capsys, "--json"))
    assert (found["running"], found["lock"]["pid"], found["lock"]["stale"]) == (False, dead_pid, True)
    text = status(stopped_run, capsys)
    assert "stopped before the end: rerun the same command to resume" in text and "running (" not in text


def test_status_of_a_run_whose_remote_holder_stopped_beating_says_stopped(stopped_run, capsys):
    write_lock(stopped_run, 4242, "another-node", heartbeat_age=130)
    found = json.loads(status(stopped_run, capsys, "--json"))
    assert (found["running"], found["lock"]["host"], found["lock"]["stale"]) == (False, "another-node", True)


def test_lock_without_a_heartbeat_is_stale(tmp_path, live_process):
    (tmp_path / LOCK).write_text(json.dumps({"pid": live_process.pid, "host": HOST}))
    assert lock_state(LocalStore(tmp_path))["stale"] is True


def test_heartbeat_exactly_2_minutes_old_is_still_live(tmp_path, monkeypatch):
    now = 1_700_000_000.0
    monkeypatch.setattr(lock_module, "time", type("Clock", (), {"time": staticmethod(lambda: now)}))
    (tmp_path / LOCK).write_text(json.dumps({"pid": 4242, "host": "another-node", "heartbeat": now - 120.0}))
    assert lock_state(LocalStore(tmp_path))["stale"] is False
    (tmp_path / LOCK).write_text(json.dumps({"pid": 4242, "host": "another-node", "heartbeat": now - 120.5}))
    assert lock_state(LocalStore(tmp_path))["stale"] is True


def test_lock_of_this_host_without_a_pid_is_not_taken_for_dead(tmp_path, monkeypatch):
    """Without a pid (or with a pid of 0 or below) nothing proves the owner gone: only its heartbeat's age can make
    such a lock stale, and no process is signalled at all (os.kill(-1, ...) would reach every process of the
    machine). Checked against a stand-in for os.kill, so no mutant can send a real signal."""
    probes = []
    monkeypatch.setattr(lock_module.os, "kill", lambda pid, signal: probes.append((pid, signal)))
    for record in ({}, {"pid": -1}, {"pid": 0}, {"pid": "12"}):
        (tmp_path / LOCK).write_text(json.dumps({**record, "host": HOST, "heartbeat": time.time()}))
        assert lock_state(LocalStore(tmp_path))["stale"] is False, record
        (tmp_path / LOCK).write_text(json.dumps({**record, "host": HOST, "heartbeat": time.time() - 121}))
        assert lock_state(LocalStore(tmp_path))["stale"] is True, record
    assert probes == []


def test_checking_the_owner_sends_it_no_signal(tmp_path, live_process):
    write_lock(tmp_path, live_process.pid, HOST, heartbeat_age=1)
    assert lock_state(LocalStore(tmp_path))["stale"] is False
    with pytest.raises(subprocess.TimeoutExpired):
        live_process.wait(timeout=0.3)  # still running: probed with signal 0, not killed


def test_owner_that_this_user_may_not_signal_is_alive(tmp_path, monkeypatch):
    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lock_module.os, "kill", kill)
    write_lock(tmp_path, 4242, HOST, heartbeat_age=1)
    assert lock_state(LocalStore(tmp_path))["stale"] is False


def test_live_lock_message_names_the_directory_holder_and_heartbeat_age(tmp_path):
    write_lock(tmp_path, 4242, "another-node", heartbeat_age=100)
    with pytest.raises(OutputLocked) as raised, RunLock(LocalStore(tmp_path)):
        pytest.fail("a live lock was taken over")
    assert str(raised.value) == (f"{tmp_path} is locked by a live run: pid 4242 on another-node, heartbeat 100s ago; "
                                 "retry when it has finished")


@pytest.mark.parametrize("lock, holder", [
    ({"pid": 4242, "host": "another-node", "heartbeat": 0.0}, "pid 4242 on another-node"),
    ("torn", "pid None on None"),
])
def test_taking_over_a_stale_lock_is_logged(tmp_path, caplog, lock, holder):
    caplog.set_level(logging.WARNING, logger="batchrun")
    (tmp_path / LOCK).write_text('{"pid": 42' if lock == "torn" else json.dumps(lock))
    with RunLock(LocalStore(tmp_path)):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert [record.getMessage() for record in caplog.records] == [f"taking over the stale lock of {holder}"]


def test_losing_the_race_for_a_stale_lock_exits_75(tmp_path):
    class Racing(LocalStore):
        """Another run creates the lock between our removing the stale one and creating ours."""

        def remove(self, name):
            super().remove(name)
            write_lock(tmp_path, 4243, "another-node", heartbeat_age=0)

    write_lock(tmp_path, 4242, "another-node", heartbeat_age=3600)
    with pytest.raises(OutputLocked) as raised, RunLock(Racing(tmp_path)):
        pytest.fail("took a lock another run holds")
    assert str(raised.value) == f"{tmp_path} was locked by another run at the same moment; retry later"
    assert raised.value.exit_code == 75
    assert read_lock(tmp_path)["pid"] == 4243


def test_heartbeat_runs_in_a_named_daemon_thread_that_stops_with_the_lock(tmp_path):
    with RunLock(LocalStore(tmp_path)) as lock:
        beating = [thread for thread in threading.enumerate() if thread.name == "batchrun-heartbeat"]
        assert beating == [lock._thread] and lock._thread.daemon is True  # never keeps a dying process alive
    assert not lock._thread.is_alive()
