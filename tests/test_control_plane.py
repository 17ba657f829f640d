"""The run's control plane under faults: claims raced by processes started at the same instant, a heartbeat that
rides out failed writes, a finished run's exit code on a rerun, --fresh killed at each of its steps, a restarted
container meeting its own pid, `_progress.json` after a stop, and odd records, claims and run info.

Each test here failed before its fix (issue 17); the comment at each says what it caught.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from output_files import write_claim, write_record

from jobs import edit_job, output, rows, run, write_job
from pipeline_core import runner as runner_module
from pipeline_core.cli import run_cli
from pipeline_core.engines import in_process
from pipeline_core.output import claims as claims_module
from pipeline_core.output import run_dir as run_dir_module
from pipeline_core.output.claims import Claims, Worker, held_claims
from pipeline_core.output.run_dir import claim_name, is_live, worker_name
from pipeline_core.output.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
TRIALS = 200  # races per scenario; the single lock these claims replaced let two runs in 7 times in 100


# --- two processes at the same instant ----------------------------------------------------------------------------


def _contend(directories: list[Path], worker: str, barrier, results, release: bool = False) -> None:
    """One contender: in each trial directory, wait for the other at the barrier, then claim part 7 (or, as its
    earlier holder, give it back)."""
    outcomes = []
    for directory in directories:
        claims = Claims(LocalStore(directory), worker)
        barrier.wait(timeout=60)  # a contender that crashed must not leave the other waiting for ever
        if release:
            claims.release(7, done=False)
            outcomes.append(False)
        else:
            outcomes.append(claims.claim(7))
    results.put((worker, outcomes))


def race(directories: list[Path], release_by: str | None = None) -> dict[str, list[bool]]:
    """{contender: whether it got the claim, per trial}: A and B, forked, meet at a barrier before every trial."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    contenders = [context.Process(target=_contend, args=(directories, worker, barrier, results, worker == release_by),
                                  daemon=True) for worker in ("A", "B")]
    for contender in contenders:
        contender.start()
    try:
        outcomes = dict(results.get(timeout=120) for _ in contenders)
    finally:
        for contender in contenders:
            contender.join(timeout=30)
            contender.kill()  # a no-op when it has ended; else the test fails without waiting for it
    assert [contender.exitcode for contender in contenders] == [0, 0]
    return outcomes


def trial_directories(tmp_path: Path, setup) -> list[Path]:
    directories = []
    for trial in range(TRIALS):
        directory = tmp_path / f"trial-{trial:03d}"
        directory.mkdir()
        write_record(directory, "A")  # both contenders alive (on another host: their heartbeat says so)
        write_record(directory, "B")
        setup(directory)
        directories.append(directory)
    return directories


@pytest.mark.parametrize("left_by", ["nobody", "a dead pid", "a stale heartbeat", "a torn write", "a release"])
def test_two_processes_claiming_at_the_same_instant_never_both_hold_the_part(tmp_path, left_by, dead_pid):
    def setup(directory: Path) -> None:
        if left_by == "a dead pid":
            write_record(directory, "gone", host=HOST, pid=dead_pid)
            write_claim(directory, 7, 0, "gone")
        elif left_by == "a stale heartbeat":
            write_record(directory, "gone", heartbeat_age=3600)
            write_claim(directory, 7, 0, "gone")
        elif left_by == "a torn write":
            (directory / claim_name(7, 0)).write_text('{"work')
            os.utime(directory / claim_name(7, 0), (time.time() - 60, time.time() - 60))
        elif left_by == "a release":
            write_claim(directory, 7, 0, "gone")
            (directory / claim_name(7, 1)).write_text(json.dumps({"worker": None, "released": time.time()}))

    directories = trial_directories(tmp_path, setup)
    outcomes = race(directories)
    assert [a + b for a, b in zip(outcomes["A"], outcomes["B"], strict=True)] == [1] * TRIALS  # one winner, every time
    for directory, a_won in zip(directories, outcomes["A"], strict=True):
        assert held_claims(LocalStore(directory)) == {"A" if a_won else "B": [7]}


def test_a_holder_giving_a_part_back_while_it_is_taken_over_never_removes_the_takers_claim(tmp_path):
    """A's heartbeat was late, so B takes part 7 over just as A gives it back. Caught before: A removed its own
    generation after B had created the next, and a third process, finding generation 0 gone, claimed the part
    again beside B."""
    def setup(directory: Path) -> None:
        write_record(directory, "A", heartbeat_age=3600)
        write_claim(directory, 7, 0, "A")
        write_record(directory, "C")

    directories = trial_directories(tmp_path, setup)
    for directory in directories:
        write_record(directory, "A", heartbeat_age=3600)  # late, whatever trial_directories wrote
    outcomes = race(directories, release_by="A")
    assert outcomes["B"] == [True] * TRIALS  # A's claim was stale, or given back: B gets it either way
    for directory in directories:
        assert Claims(LocalStore(directory), "C").claim(7) is False, sorted(os.listdir(directory))
        assert held_claims(LocalStore(directory)) == {"B": [7]}


# --- the heartbeat ------------------------------------------------------------------------------------------------


class FlakyStore(LocalStore):
    """A LocalStore whose writes of worker records fail with EIO at the given attempts (1-based)."""

    def __init__(self, root, failing: set[int]):
        super().__init__(root)
        self.failing, self.attempts = failing, []  # the moment of each attempt

    def put(self, name: str, data: bytes) -> None:
        if name.startswith(".worker-"):
            self.attempts.append(time.monotonic())
            if len(self.attempts) in self.failing:
                raise OSError(errno.EIO, "Input/output error")
        super().put(name, data)


def test_a_failed_heartbeat_write_does_not_end_the_heartbeat_and_is_retried_soon(tmp_path, monkeypatch, caplog):
    """Caught before: one EIO killed the heartbeat thread (a traceback on stderr), and two minutes later others
    took this live process's parts over."""
    monkeypatch.setattr(claims_module, "HEARTBEAT_EVERY", 2.0)
    monkeypatch.setattr(claims_module, "RETRY_EVERY", 0.01)
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    store = FlakyStore(tmp_path, failing={2, 3, 4})  # the first write (entering) succeeds, then three fail
    caplog.set_level(logging.INFO, logger="batchrun")
    with Worker(store, {}) as worker:
        deadline = time.monotonic() + 60
        while len(store.attempts) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(store.attempts) >= 6 and worker._thread.is_alive()
        record = json.loads((tmp_path / worker_name(worker.id)).read_text())
        assert time.time() - record["heartbeat"] < 5 and is_live(record)
    assert crashes == []
    # after a failure the next try comes after RETRY_EVERY, not a whole HEARTBEAT_EVERY: the three retries (attempts
    # 3 to 5) took well under the 6 s of three heartbeats
    assert store.attempts[4] - store.attempts[1] < 1.5
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if "this process's record" in m] == [
        f"could not rewrite this process's record in {tmp_path} ([Errno 5] Input/output error); retrying every 0s",
        f"this process's record in {tmp_path} is written again"]


# --- a finished run's exit code -------------------------------------------------------------------------------------


def test_a_rerun_of_a_finished_run_exits_with_the_code_it_earned(tmp_path, tiny_models, caplog, monkeypatch):
    """Caught before: the rerun of a run that exited 3 said "nothing to do" and exited 0, so a scheduler's retry
    turned a failed task green."""
    data = rows(8)
    data[1]["text"] = data[5]["text"] = None
    job = write_job(tmp_path, tiny_models.text_classifier, data)
    strict = ("--set", "errors.max_error_rate=0.1")
    assert run(job, *strict) == 3
    info = json.loads((tmp_path / "out" / "_batchrun.json").read_text())
    assert (info["rows"], info["failed_rows"]) == (8, 2)
    footers_read = []
    read_part_facts = run_dir_module.read_part_facts
    monkeypatch.setattr(run_dir_module, "read_part_facts", lambda *args: footers_read.append(args) or
                        read_part_facts(*args))
    caplog.set_level(logging.INFO, logger="batchrun")
    assert run(job, *strict) == 3
    assert "2 of 8 rows failed (25.00%), above errors.max_error_rate=0.1" in caplog.text
    assert run(job) == 0  # the job's own max_error_rate (1.0) accepts the same rows
    assert footers_read == []  # judged by the recorded totals: no part footer read, however many parts
    for missing in ("failed_rows", "rows"):  # finished by a version that did not record them: counted from the parts
        del info[missing]
        (tmp_path / "out" / "_batchrun.json").write_text(json.dumps(info))
        assert run(job, *strict) == 3
        assert run(job) == 0
        assert len(footers_read) == 2 * 2 * (2 if missing == "rows" else 1)  # two parts, read by each rerun


# --- --fresh, killed at each step -----------------------------------------------------------------------------------


def finished_and_reference(tmp_path: Path, tiny_models) -> tuple[Path, Path]:
    """Two finished runs of one job in two directories: the reference, and the one a test discards."""
    jobs = []
    for name in ("reference", "run"):
        jobs.append(write_job(tmp_path / name, tiny_models.text_classifier, rows(10)))
        assert run(jobs[-1]) == 0
    return jobs[0], jobs[1]


class Killed(BaseException):
    """kill -9 at this point: nothing after it runs (no handler catches a BaseException that is not ours)."""


def test_fresh_killed_at_each_step_leaves_a_run_that_a_plain_rerun_completes(tmp_path, tiny_models, monkeypatch):
    """Caught before: --fresh removed _batchrun.json first and the parts after it; killed between the two, it left
    parts without _batchrun.json, which every plain rerun refused with exit 2."""
    reference, job = finished_and_reference(tmp_path, tiny_models)
    remove = LocalStore.remove
    removed: list[str] = []

    def counting(store, name):
        removed.append(name)
        remove(store, name)

    monkeypatch.setattr(LocalStore, "remove", counting)
    assert run(job, "--fresh") == 0
    steps = removed.index("_batchrun.json") + 1  # the discard's removals, up to _batchrun.json, last of them
    assert steps >= 6  # _SUCCESS, _progress.json, three parts, _batchrun.json
    for step in range(steps):
        calls = []

        def killed_at_this_step(store, name, step=step, calls=calls):
            if len(calls) == step:
                raise Killed(f"killed before removing {name}")
            calls.append(name)
            remove(store, name)

        monkeypatch.setattr(LocalStore, "remove", killed_at_this_step)
        with pytest.raises(Killed):
            run(job, "--fresh")
        monkeypatch.setattr(LocalStore, "remove", remove)
        assert run(job) == 0, f"killed before removal {step} ({calls})"
        pd.testing.assert_frame_equal(output(job), output(reference))


def test_a_signal_during_the_discard_of_fresh_ends_in_75_and_a_plain_rerun_completes(tmp_path, tiny_models,
                                                                                      monkeypatch, caplog,
                                                                                      own_handlers):
    """Caught before: a SIGTERM during --fresh's discard was noted, and the run went on to load the model."""
    reference, job = finished_and_reference(tmp_path, tiny_models)
    remove = LocalStore.remove
    loaded = []
    initialize = in_process.initialize

    def signalled(store, name):
        if not loaded and name == "part-000001.parquet":
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before os.kill returns
        remove(store, name)

    monkeypatch.setattr(LocalStore, "remove", signalled)
    monkeypatch.setattr(in_process, "initialize", lambda job, *more: loaded.append(job) or initialize(job, *more))
    caplog.set_level(logging.INFO, logger="batchrun")
    assert run(job, "--fresh") == 75
    assert loaded == [] and "stopped by SIGTERM before starting" in caplog.text
    assert not (tmp_path / "run" / "out" / "part-000000.parquet").exists()  # the discard itself completed
    monkeypatch.setattr(LocalStore, "remove", remove)
    assert run(job) == 0
    pd.testing.assert_frame_equal(output(job), output(reference))
    assert own_handlers == {signal.SIGTERM: [], signal.SIGINT: []}


# --- a restarted container's own pid --------------------------------------------------------------------------------


def test_a_record_with_this_processs_pid_but_not_its_own_is_of_a_process_before_a_restart(tmp_path):
    """Caught before: batchrun as a container's PID 1, killed and restarted as PID 1 on the same host name, took
    the dead run's record for its own live process and waited two minutes for its parts."""
    directory = tmp_path / "out"
    directory.mkdir()
    write_record(directory, "before-restart", host=HOST, pid=os.getpid())
    write_claim(directory, 3, 0, "before-restart")
    store = LocalStore(directory)
    assert not is_live(json.loads((directory / worker_name("before-restart")).read_text()))
    with Worker(store, {}) as worker:
        assert is_live(json.loads((directory / worker_name(worker.id)).read_text()))  # its own record is live
        assert worker.claims.claim(3)
    assert held_claims(store) == {worker.id: [3]}


def in_a_fresh_pid_namespace(command: list[str]) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--kill-child", *command]


def test_batchrun_restarted_as_pid_1_takes_its_earlier_claims_over_at_once(tmp_path, tiny_models):
    """The real thing: `batchrun` as PID 1 of a PID namespace, killed with -9 mid-run, then started again as PID 1
    on the same host. It must take the dead run's claims over at once, not wait for its heartbeat to go stale."""
    probe = subprocess.run(in_a_fresh_pid_namespace([sys.executable, "-c", "import os; print(os.getpid())"]),
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        pytest.skip(f"cannot start a process as PID 1 of a new PID namespace here: {probe.stderr.strip()[:200]}")
    data = rows(6000)
    reference = write_job(tmp_path / "reference", tiny_models.text_classifier, data, rows_per_part=100)
    assert run(reference) == 0
    # two workers claim parts ahead of the one computed, so the kill always leaves claims of the dead run
    job = write_job(tmp_path / "run", tiny_models.text_classifier, data, rows_per_part=100, workers=2)
    out = tmp_path / "run" / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = in_a_fresh_pid_namespace([sys.executable, "-m", "pipeline_core", "run", str(job), "--no-progress"])
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "part-000002.parquet").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()  # unshare dies; --kill-child sends the same SIGKILL to its child, batchrun as PID 1
    first.wait()
    first.stderr.close()
    records = [json.loads(path.read_text()) for path in out.glob(".worker-*.json")]
    assert [(record["pid"], record["state"]) for record in records] == [(1, "running")]
    assert held_claims(LocalStore(out)), "the run ended before it was killed: give it more rows"
    started, took_over = time.monotonic(), None
    second = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in second.stderr:  # when the takeover happens, not when the rest of the run ends (a loaded machine)
        lines.append(line)
        if took_over is None and "took over part" in line:
            took_over = time.monotonic() - started
    assert second.wait(timeout=100) == 0, "".join(lines)[-3000:]
    assert "waiting for" not in "".join(lines) and took_over is not None
    assert took_over < 60  # at start-up, not after the two minutes a heartbeat takes to go stale
    pd.testing.assert_frame_equal(output(job), output(reference))


# --- _progress.json after a stop ----------------------------------------------------------------------------------


def test_progress_after_a_stop_counts_only_the_rows_of_committed_parts(tmp_path, tiny_models, monkeypatch):
    """Caught before: stopped in the middle of a part, `_progress.json` counted its computed rows as done
    (166 rows done, parts holding 150)."""
    job = write_job(tmp_path, tiny_models.text_classifier, rows(24), rows_per_part=8)
    edit_job(job, batching={"max_batch_size": 2})
    stop = runner_module.StopFlag()

    class Signals:
        def __enter__(self):
            return stop

        def __exit__(self, *exc_info):
            return False

    advance = runner_module.Progress.advance

    def advance_then_stop(progress, rows_done, tokens):
        advance(progress, rows_done, tokens)
        if progress.rows_done >= 12:  # part 0 (8 rows) committed, 4 rows of part 1 computed
            stop.signal_name = "SIGTERM"

    monkeypatch.setattr(runner_module, "StopOnSignals", Signals)
    monkeypatch.setattr(runner_module.Progress, "advance", advance_then_stop)
    assert run(job) == 75
    snapshot = json.loads((tmp_path / "out" / "_progress.json").read_text())
    committed = pd.read_parquet(tmp_path / "out")
    assert (snapshot["parts_done"], snapshot["rows_done"], len(committed)) == (1, 8, 8)


# --- odd records, claims and run info -------------------------------------------------------------------------------


def test_odd_records_and_claims_neither_block_nor_break_a_run_or_status(tmp_path, tiny_models, capsys):
    """Caught before: a record holding `null` or a heartbeat that is not a number, or a claim naming a list, ended
    every run and `status` in "internal error" until someone deleted the file."""
    job = write_job(tmp_path, tiny_models.text_classifier, rows(12))
    out = tmp_path / "out"
    out.mkdir()
    odd = {
        ".worker-null.json": "null",
        ".worker-odd.json": json.dumps({"worker": "odd", "host": HOST, "pid": "1", "state": "running",
                                        "heartbeat": "a minute ago"}),
        claim_name(0, 0): "null",
        claim_name(1, 0): json.dumps({"worker": ["odd"]}),
        claim_name(2, 0): json.dumps({"worker": "odd"}),
    }
    for name, text in odd.items():
        (out / name).write_text(text)
    started = time.monotonic()
    assert run(job) == 0
    assert time.monotonic() - started < 60  # nothing waited for an odd claim to age
    assert len(output(job)) == 12
    for name, text in odd.items():  # the same files beside a finished run
        (out / name).write_text(text)
    capsys.readouterr()
    assert run_cli(["status", str(out)]) == 0
    assert run_cli(["status", str(out), "--json"]) == 0
    assert run(job) == 0
    assert "internal error" not in capsys.readouterr().err


@pytest.mark.parametrize("text, says", [
    ("{not json", "is not valid JSON (line 1 column 2)"),
    ("null", "holds null, not a JSON object"),
    (json.dumps({"fingerprint": "abc"}), 'has no "identity" object'),
])
def test_a_run_info_that_is_not_a_runs_record_is_a_usage_error_naming_the_file(tmp_path, tiny_models, capsys, text,
                                                                                says):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(4))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_batchrun.json").write_text(text)
    assert run(job) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out'}/_batchrun.json {says}" in err and "--fresh" in err
    assert "internal error" not in err
    assert run(job, "--fresh") == 0  # what the message advises works
