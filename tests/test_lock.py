"""batchrun's own lock: a start that overlaps a live run of the same share exits 75 at once, before any model loads,
naming the live process; shards of one count with different indexes still run at once; a dead run never locks.

The end-to-end tests freeze the first run with SIGSTOP once it has committed a part: a frozen process is alive (its
pid exists, its heartbeat is seconds old), so the second start meets a live run whatever the machine's load, and the
first run, continued with SIGCONT, must still finish the job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from output_files import write_record

import jobs
from jobs import output, rows, run
from pipeline_core.errors import OutputBusy, UsageError
from pipeline_core.execute import StopFlag
from pipeline_core.layout import Layout
from pipeline_core.output.claims import held_claims
from pipeline_core.output.lock import shares_overlap
from pipeline_core.output.run_dir import RunDir
from pipeline_core.output.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
IDENTITY = {"task": "text-classification", "model.name": "tiny", "limit": None}


# --- which shares overlap ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mine, other, overlap", [
    ((1, 0), (1, 0), True),  # two plain runs
    ((1, 0), (4, 2), True),  # a plain run covers every shard's parts
    ((4, 2), (1, 0), True),
    ((4, 2), (4, 2), True),  # the same shard twice: a scheduler's duplicate attempt
    ((4, 2), (4, 3), False),  # two shards of one job
    ((4, 2), (3, 2), True),  # shards of different counts may share parts
    ((4, 2), ("4", 3), True),  # an odd record is taken as a plain run's
])
def test_shares_overlap_unless_they_are_different_shards_of_one_count(mine, other, overlap):
    def labels(shards):
        return {"num_shards": shards[0], "shard_index": shards[1]}

    assert shares_overlap(labels(mine), labels(other)) is overlap


# --- RunDir.prepare: the check before any model loads ------------------------------------------------------------


def prepared(out: Path) -> LocalStore:
    """OUTPUT holding this job's run, as RunDir.prepare leaves it for the first process."""
    store = LocalStore(out)
    assert RunDir(store).prepare(IDENTITY, False, Layout()) == (False, IDENTITY)
    return store


def test_a_live_run_of_another_process_refuses_a_plain_start_with_exit_75_naming_it(tmp_path):
    store = prepared(tmp_path)
    write_record(tmp_path, "node-1-abc123", heartbeat_age=4.2)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(OutputBusy) as raised:
        RunDir(store).prepare(IDENTITY, False, Layout())
    assert raised.value.exit_code == 75
    assert str(raised.value) == (f"{tmp_path} is locked by a live run: pid 4242 on another-node (one process), "
                                 "heartbeat 4s ago; not started: retry once it has finished, and the rerun resumes "
                                 "(or exits at once if the job is done)")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_the_message_names_the_longest_running_process_its_shard_and_rank_and_counts_the_others(tmp_path):
    store = prepared(tmp_path)
    write_record(tmp_path, "late", pid=1111, shard_index=1, num_shards=2)
    write_record(tmp_path, "early", pid=2222, shard_index=1, num_shards=2, rank=1, world_size=2, launch="a:1/x",
                 started=time.time() - 7200)
    with pytest.raises(OutputBusy, match=r"locked by a live run: pid 2222 on another-node \(shard 1/2, rank 1/2\), "
                                         r"heartbeat 3s ago \(and 1 more live process\(es\)\); not started"):
        RunDir(store).prepare(IDENTITY, False, Layout(shard_index=1, num_shards=2))


@pytest.mark.parametrize("record", [
    {"state": "stopped"},
    {"state": "finished"},
    {"heartbeat_age": 121},  # over 2 minutes: a preempted node's process
    {"host": HOST, "pid": "dead"},  # this host's pid that no longer exists (kill -9)
    {"shard_index": 1, "num_shards": 2},  # another shard of the same count
    {"launch": "node-0:29500/job", "attempt": 0, "rank": 1, "world_size": 2},  # this launch's earlier attempt
], ids=["stopped", "finished", "stale", "dead-pid", "other-shard", "own-launch"])
def test_records_that_do_not_lock(tmp_path, dead_pid, record):
    store = prepared(tmp_path)
    if record.get("pid") == "dead":
        record = {**record, "pid": dead_pid}
    write_record(tmp_path, "other", **record)
    layout = Layout(shard_index=0, num_shards=2) if "num_shards" in record else Layout()
    if "launch" in record:
        layout = Layout(world_size=2, launch="node-0:29500/job", attempt=1)
    assert RunDir(store).prepare(IDENTITY, False, layout) == (False, IDENTITY)


def test_the_same_shard_twice_and_a_shard_beside_a_plain_run_are_locked(tmp_path):
    store = prepared(tmp_path)
    write_record(tmp_path, "shard-0", shard_index=0, num_shards=2)
    with pytest.raises(OutputBusy, match=r"\(shard 0/2\)"):
        RunDir(store).prepare(IDENTITY, False, Layout(shard_index=0, num_shards=2))
    with pytest.raises(OutputBusy):
        RunDir(store).prepare(IDENTITY, False, Layout())
    (tmp_path / ".worker-shard-0.json").unlink()
    write_record(tmp_path, "plain")
    with pytest.raises(OutputBusy, match=r"\(one process\)"):
        RunDir(store).prepare(IDENTITY, False, Layout(shard_index=1, num_shards=2))


def test_a_finished_job_is_reported_finished_and_another_jobs_run_is_exit_2_even_while_a_process_lives(tmp_path):
    store = prepared(tmp_path)
    write_record(tmp_path, "other")
    with pytest.raises(UsageError, match="holds a run of a different job"):
        RunDir(store).prepare({**IDENTITY, "limit": 3}, False, Layout())
    (tmp_path / "_SUCCESS").touch()
    assert RunDir(store).prepare(IDENTITY, False, Layout()) == (True, IDENTITY)


def test_other_ranks_wait_for_their_own_rank_0_and_are_refused_by_another_starts_run(tmp_path):
    store = prepared(tmp_path)
    rank_1 = Layout(rank=1, world_size=2, local_rank=1, launch="node-0:29500/job", attempt=0)
    write_record(tmp_path, "own-rank-0", launch="node-0:29500/job", attempt=0, world_size=2)
    assert RunDir(store).join(IDENTITY, StopFlag(), rank_1) == (False, IDENTITY)  # its own: no lock
    (tmp_path / ".worker-own-rank-0.json").unlink()
    write_record(tmp_path, "plain-run")  # a rank 0 too, but of a plain run: not this launch's
    with pytest.raises(OutputBusy, match="locked by a live run: pid 4242 on another-node \\(one process\\)"):
        RunDir(store).join(IDENTITY, StopFlag(), rank_1)


# --- real runs -------------------------------------------------------------------------------------------------------


def write_job(directory: Path, model: Path) -> Path:
    """48 rows of 24 generated tokens, 12 parts of 4, one preprocessing worker (which claims a part ahead)."""
    return jobs.write_job(directory, model, rows(48), task="text-generation", workers=1,
                          model={"generation": {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models) -> pd.DataFrame:
    job = write_job(tmp_path_factory.mktemp("reference"), tiny_models.causal_lm)
    assert run(job) == 0
    return output(job)


@pytest.fixture
def job(tmp_path, tiny_models) -> Path:
    return write_job(tmp_path, tiny_models.causal_lm)


def start(job: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "pipeline_core", "run", str(job), "--no-progress", *args],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def parts(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each committed part: a part written again gets a new inode."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(out.glob("part-*.parquet"))}


def frozen_after_a_part(process: subprocess.Popen, out: Path, log: Path, timeout: float = 180) -> None:
    """Wait for the run's first committed part, then stop its process group (the run and its DataLoader worker)."""
    deadline = time.monotonic() + timeout
    while not parts(out):
        assert process.poll() is None, f"the first run ended before committing a part:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no part was committed in time"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGSTOP)
    assert not (out / "_SUCCESS").exists(), "the first run finished before it could be frozen: give it more rows"


def resumed(process: subprocess.Popen, log: Path) -> str:
    os.killpg(process.pid, signal.SIGCONT)
    process.wait(timeout=300)
    return log.read_text()


@pytest.fixture
def cleanup():
    """Processes a failing test leaves frozen or running are killed."""
    processes = []
    yield processes.append
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_an_overlapping_plain_start_exits_75_at_once_without_a_model_or_touching_the_first_runs_parts(
        job, reference, tmp_path, cleanup, monkeypatch, capsys):
    out = job.parent / "out"
    first = start(job, tmp_path / "first.log")
    cleanup(first)
    frozen_after_a_part(first, out, tmp_path / "first.log")
    before, claims = parts(out), held_claims(LocalStore(out))
    from pipeline_core.engines import in_process

    def no_model(*args, **kwargs):
        raise AssertionError("the refused start loaded a model")

    monkeypatch.setattr(in_process, "initialize", no_model)
    started = time.monotonic()
    assert run(job) == 75
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert f"is locked by a live run: pid {first.pid} on {HOST} (one process), heartbeat " in err, err
    assert "retry once it has finished, and the rerun resumes" in err and len(err.strip().splitlines()) == 1, err
    assert seconds < 10, f"the refused start took {seconds:.1f}s"
    assert parts(out) == before and held_claims(LocalStore(out)) == claims
    assert [json.loads(path.read_text())["pid"] for path in out.glob(".worker-*.json")] == [first.pid]
    monkeypatch.undo()
    log = resumed(first, tmp_path / "first.log")
    assert first.returncode == 0, log
    pd.testing.assert_frame_equal(output(job), reference)


def test_two_shards_run_at_once_and_the_same_shard_twice_exits_75(job, reference, tmp_path, cleanup, capsys):
    out = job.parent / "out"
    shard_0 = start(job, tmp_path / "shard0.log", "--num-shards", "2", "--shard-index", "0")
    cleanup(shard_0)
    frozen_after_a_part(shard_0, out, tmp_path / "shard0.log")
    assert run(job, "--num-shards", "2", "--shard-index", "0") == 75  # a duplicate attempt of shard 0
    assert f"locked by a live run: pid {shard_0.pid} on {HOST} (shard 0/2)" in capsys.readouterr().err
    # shard 1 runs while shard 0 is alive (frozen): its block is all its own, so it finishes without waiting
    assert run(job, "--num-shards", "2", "--shard-index", "1") == 0
    assert "the job completes when every shard has finished" in capsys.readouterr().err
    assert not (out / "_SUCCESS").exists()
    log = resumed(shard_0, tmp_path / "shard0.log")
    assert shard_0.returncode == 0, log
    assert "wrote _SUCCESS" in log
    pd.testing.assert_frame_equal(output(job), reference)


def test_a_start_after_the_first_run_was_killed_9_takes_over_and_completes(job, reference, tmp_path, cleanup, capfd):
    out = job.parent / "out"
    first = start(job, tmp_path / "first.log")
    cleanup(first)
    frozen_after_a_part(first, out, tmp_path / "first.log")
    os.killpg(first.pid, signal.SIGKILL)  # its record still says running, its heartbeat is fresh: its pid is gone
    first.wait()
    assert held_claims(LocalStore(out)), "the killed run left no claim: the worker claims a part ahead"
    assert run(job) == 0
    assert "took over part" in capfd.readouterr().err
    pd.testing.assert_frame_equal(output(job), reference)
    assert not list(out.glob(".claim-*")) and not list(out.glob(".worker-*"))
