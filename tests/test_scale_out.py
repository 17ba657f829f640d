"""Scale-out: two CPU processes under torchrun and accelerate's launcher, shards one after the other and at once,
runs finished in another layout, a rank killed under `torchrun --max-restarts 1`, SIGTERM to the launcher; each
against one uninterrupted single-process run, with a count showing no part was computed twice and _SUCCESS
written once, at the end.

Every process logs "... computed N parts (M rows) here" and the one that finishes the job "wrote _SUCCESS".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs
from jobs import output, rows
from pipeline_core.cli import run_cli
from pipeline_core.output.claims import held_claims
from pipeline_core.output.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PARTS = 12
COMPUTED = re.compile(r"computed (\d+) parts \(\d+ rows\) here")


def write_job(directory: Path, model: Path) -> Path:
    """48 rows of 24 generated tokens, 12 parts of 4: long enough for two processes to share."""
    return jobs.write_job(directory, model, rows(48), task="text-generation", workers=1,
                          model={"generation": {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}})


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:  # a file: nobody reads a pipe while the test watches the output directory
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                start_new_session=True)


def batchrun(job: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline_core", "run", str(job), "--no-progress", *args]


def torchrun(job: Path, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", *args, "-m", "pipeline_core", "run", str(job),
            "--no-progress"]


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    process.wait(timeout=timeout)
    return log.read_text()


def computed(*logs: str) -> int:
    """Parts computed, summed over every process of every log."""
    return sum(int(count) for log in logs for count in COMPUTED.findall(log))


def committed(job: Path) -> set[str]:
    return {path.name for path in (job.parent / "out").glob("part-*.parquet")}


def wait_for_parts(job: Path, parts: int, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(committed(job)) < parts:
        assert process.poll() is None, f"ended before {parts} parts were committed:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{parts} parts were not committed within {timeout} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """An uninterrupted single-process run of the job every test below runs otherwise."""
    directory = tmp_path_factory.mktemp("reference")
    job = write_job(directory, tiny_models.causal_lm)
    process = start(batchrun(job), directory / "log")
    log = finish(process, directory / "log")
    assert process.returncode == 0, log
    assert computed(log) == PARTS and log.count("wrote _SUCCESS") == 1
    return output(job)


@pytest.fixture
def job(tmp_path, tiny_models) -> Path:
    return write_job(tmp_path, tiny_models.causal_lm)


def assert_complete(job: Path, reference, *logs: str, computed_here: int = PARTS) -> None:
    """The output equals the single-process run, each part was computed once, _SUCCESS was written once."""
    pd.testing.assert_frame_equal(output(job), reference)
    assert computed(*logs) == computed_here, "\n".join(logs)
    assert sum(log.count("wrote _SUCCESS") for log in logs) == 1
    out = job.parent / "out"
    assert (out / "_SUCCESS").exists()
    assert not list(out.glob(".claim-*")) and not list(out.glob(".*.tmp-*"))


def test_torchrun_two_processes_equal_one_process_and_compute_each_part_once(job, reference, tmp_path):
    process = start(torchrun(job), tmp_path / "log")
    log = finish(process, tmp_path / "log")
    assert process.returncode == 0, log
    assert_complete(job, reference, log)
    assert "as rank 0 of 2 (local rank 0)" in log and "batchrun[rank 1/2]" in log
    # on a loaded 2-core machine rank 1 may start only after rank 0 has done everything: then it says so
    assert ("as rank 1 of 2 (local rank 1)" in log) != ("already holds this finished run" in log)
    info = json.loads((job.parent / "out" / "_batchrun.json").read_text())
    # who took part (their figures as of their last record: a peer may commit once more after the finisher read it)
    assert {process["rank"] for process in info["processes"]} <= {0, 1} and 0 in [p["rank"] for p in info["processes"]]
    assert not list((job.parent / "out").glob(".worker-*"))  # every process retired its record


def test_a_finished_run_that_lost_a_part_is_made_whole_by_torchrun(job, reference, tmp_path):
    """The rerun is in another layout: each rank checks the finished run's parts by one listing, the missing part is
    computed once, by one of them, and _SUCCESS is written again (issue 28)."""
    first = start(batchrun(job), tmp_path / "first")
    assert finish(first, tmp_path / "first") and first.returncode == 0
    (job.parent / "out" / "part-000005.parquet").unlink()
    process = start(torchrun(job), tmp_path / "log")
    log = finish(process, tmp_path / "log")
    assert process.returncode == 0, log
    assert "was finished, but parts are missing or changed since (parts 5): removing _SUCCESS" in log
    assert computed(log) == 1 and log.count("wrote _SUCCESS") == 1
    pd.testing.assert_frame_equal(output(job), reference)


def test_a_job_that_cannot_work_exits_2_on_every_rank_before_output(job, tmp_path):
    jobs.edit_job(job, model={"device": "cuda:7"})
    process = start(torchrun(job), tmp_path / "log")
    log = finish(process, tmp_path / "log")
    assert process.returncode != 0, log
    assert log.count("error: model.device='cuda:7', but CUDA is not available on this machine") == 2, log
    assert not (job.parent / "out").exists()


def test_accelerate_launch_two_processes_equal_one_process(job, reference, tmp_path):
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline_core", "run", str(job),
               "--no-progress"]
    process = start(command, tmp_path / "log")
    log = finish(process, tmp_path / "log")
    assert process.returncode == 0, log
    assert_complete(job, reference, log)
    # on a loaded 2-core machine rank 1 may start only after rank 0 has done everything: then it says so
    assert ("as rank 1 of 2 (local rank 1)" in log) != ("already holds this finished run" in log)


def test_two_shards_one_after_the_other(job, reference, tmp_path):
    first = start(batchrun(job, "--num-shards", "2", "--shard-index", "0"), tmp_path / "shard0")
    log0 = finish(first, tmp_path / "shard0")
    assert first.returncode == 0, log0
    assert not (job.parent / "out" / "_SUCCESS").exists()  # the job is not complete until shard 1 is
    # a stream of unknown length is dealt round-robin: shard 0 of 2 takes the even parts
    assert committed(job) == {f"part-{index:06d}.parquet" for index in range(0, PARTS, 2)}
    assert "the job completes when every shard has finished" in log0
    second = start(batchrun(job, "--num-shards", "2", "--shard-index", "1"), tmp_path / "shard1")
    log1 = finish(second, tmp_path / "shard1")
    assert second.returncode == 0, log1
    assert_complete(job, reference, log0, log1)
    assert "batchrun[shard 1/2]" in log1


def test_two_shards_at_once(job, reference, tmp_path):
    processes = [start(batchrun(job, "--num-shards", "2", "--shard-index", str(index)), tmp_path / f"shard{index}")
                 for index in range(2)]
    logs = [finish(process, tmp_path / f"shard{index}") for index, process in enumerate(processes)]
    assert [process.returncode for process in processes] == [0, 0], logs
    assert_complete(job, reference, *logs)


def test_the_shard_index_comes_from_a_kubernetes_indexed_job_or_a_slurm_array(job, reference, tmp_path):
    environment = {**os.environ, "JOB_COMPLETION_INDEX": "0"}
    with open(tmp_path / "k8s", "w") as stderr:
        subprocess.run(batchrun(job, "--num-shards", "2", "--shard-index", "auto"), cwd=ROOT, env=environment,
                       stderr=stderr, check=True)
    environment = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1",
                   "SLURM_ARRAY_TASK_COUNT": "2"}
    with open(tmp_path / "slurm", "w") as stderr:
        subprocess.run(batchrun(job, "--num-shards", "auto", "--shard-index", "auto"), cwd=ROOT, env=environment,
                       stderr=stderr, check=True)
    logs = [(tmp_path / name).read_text() for name in ("k8s", "slurm")]
    assert "batchrun[shard 0/2]" in logs[0] and "batchrun[shard 1/2]" in logs[1]
    assert_complete(job, reference, *logs)


def test_three_shards_are_finished_by_one_process(job, reference, tmp_path):
    logs = []
    for index in (0, 2):  # shard 1 of 3 never ran
        process = start(batchrun(job, "--num-shards", "3", "--shard-index", str(index)), tmp_path / f"shard{index}")
        logs.append(finish(process, tmp_path / f"shard{index}"))
        assert process.returncode == 0, logs[-1]
    assert len(committed(job)) == 8
    process = start(batchrun(job), tmp_path / "single")
    logs.append(finish(process, tmp_path / "single"))
    assert process.returncode == 0, logs[-1]
    assert computed(logs[-1]) == 4  # only shard 1's parts
    assert_complete(job, reference, *logs)


def test_an_interrupted_process_is_finished_by_two_shards_at_once(job, reference, tmp_path):
    process = start(batchrun(job), tmp_path / "killed")
    wait_for_parts(job, 3, process, tmp_path / "killed")
    os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader worker, with no chance to clean up
    process.wait()
    done = len(committed(job))
    shards = [start(batchrun(job, "--num-shards", "2", "--shard-index", str(index)), tmp_path / f"shard{index}")
              for index in range(2)]
    logs = [finish(shard, tmp_path / f"shard{index}") for index, shard in enumerate(shards)]
    assert [shard.returncode for shard in shards] == [0, 0], logs
    assert_complete(job, reference, *logs, computed_here=PARTS - done)


def test_a_rank_killed_under_torchrun_max_restarts_is_restarted_and_the_job_completes(job, reference, tmp_path):
    out = job.parent / "out"
    process = start(torchrun(job, "--max-restarts", "1"), tmp_path / "log")
    wait_for_parts(job, 2, process, tmp_path / "log")
    victim = rank_pid(out, 1)
    os.kill(victim, signal.SIGKILL)  # one rank, mid-part: its claim stays behind, its pid is gone
    log = finish(process, tmp_path / "log")
    assert process.returncode == 0, log
    pd.testing.assert_frame_equal(output(job), reference)
    assert log.count("wrote _SUCCESS") == 1 and (out / "_SUCCESS").exists()
    assert not list(out.glob(".claim-*"))


def rank_pid(out: Path, rank: int, timeout: float = 60) -> int:
    """The pid of the live process of `rank`, from its worker record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in out.glob(".worker-*.json"):
            try:
                record = json.loads(path.read_text())
            except (ValueError, FileNotFoundError):
                continue
            if record.get("rank") == rank and record.get("state") == "running":
                return record["pid"]
        time.sleep(0.05)
    raise AssertionError(f"no running record of rank {rank} in {out}")


def test_sigterm_to_torchrun_stops_every_rank_after_committing_then_a_rerun_completes(job, reference, tmp_path):
    # one row per batch: rank 0 alone would otherwise finish the tiny job (in 1 s) before rank 1 has imported torch,
    # and there would be no second rank to stop (batch sizes do not change values)
    process = start(torchrun(job) + ["--set", "batching.max_batch_size=1"], tmp_path / "log")
    wait_for_parts(job, 2, process, tmp_path / "log")
    rank_pid(job.parent / "out", 1)  # both ranks are at work
    os.kill(process.pid, signal.SIGTERM)  # the launcher, as a scheduler stops a job
    log = finish(process, tmp_path / "log", timeout=120)
    assert "rank 0/2] WARNING SIGTERM received" in log and "rank 1/2] WARNING SIGTERM received" in log, log
    # both ranks stop in order (torchrun signals their whole process groups, DataLoader workers included)
    assert log.count("rerun the same command to resume") == 2, log
    assert "internal error" not in log and "DataLoader worker" not in log, log
    assert process.returncode != 0  # torchrun's own verdict on a group it was told to stop
    assert not (job.parent / "out" / "_SUCCESS").exists()
    assert not held_claims(LocalStore(job.parent / "out"))  # the stopped ranks gave their claims back
    rerun = start(batchrun(job), tmp_path / "rerun")
    assert finish(rerun, tmp_path / "rerun") and rerun.returncode == 0
    pd.testing.assert_frame_equal(output(job), reference)


# --- reading only your share ---------------------------------------------------------------------------------

READ = re.compile(r"read (\d+) input rows in (\d+) row groups")


@pytest.fixture
def parquet_job(tmp_path, tiny_models) -> Path:
    """48 rows in 6 Parquet files of 8 rows, row groups of 4 rows: 12 parts of 4, each exactly one row group."""
    data = pd.DataFrame(rows(48))
    for index in range(6):
        table = pa.Table.from_pandas(data.iloc[index * 8:(index + 1) * 8], preserve_index=False)
        pq.write_table(table, tmp_path / f"rows-{index}.parquet", row_group_size=4)
    dataset = {"path": "parquet", "data_files": f"{tmp_path}/rows-*.parquet", "keep_columns": ["id"]}
    job = {**jobs.job_manifest(tmp_path, tiny_models.text_classifier, errors=None), "dataset": dataset}
    return jobs.write_manifest(tmp_path / "job.yaml", job)


def in_process(job: Path, capsys, *args: str) -> tuple[int, str]:
    code = run_cli(["run", str(job), "--no-progress", *args])
    return code, capsys.readouterr().err


def test_a_shard_of_6_reads_only_the_row_groups_of_its_parts(parquet_job, capsys):
    code, log = in_process(parquet_job, capsys, "--num-shards", "6", "--shard-index", "2")
    assert code == 0, log
    assert READ.findall(log) == [("8", "2")]  # parts 4 and 5: rows 16-23, two row groups of the 12
    assert committed(parquet_job) == {"part-000004.parquet", "part-000005.parquet"}


def test_a_rerun_reads_nothing_of_the_committed_parts(parquet_job, capsys):
    code, log = in_process(parquet_job, capsys)
    assert code == 0 and READ.findall(log) == [("48", "12")]
    expected = output(parquet_job)
    (parquet_job.parent / "out" / "part-000007.parquet").unlink()
    (parquet_job.parent / "out" / "_SUCCESS").unlink()
    code, log = in_process(parquet_job, capsys)
    assert code == 0, log
    assert READ.findall(log) == [("4", "1")]  # part 7's row group, nothing else
    assert "first part to compute (part 7) ready" in log
    pd.testing.assert_frame_equal(output(parquet_job), expected)


def test_parquet_shards_at_once_equal_one_process(parquet_job, capsys, tmp_path):
    code, log = in_process(parquet_job, capsys)
    assert code == 0
    expected = output(parquet_job)
    shutil.rmtree(parquet_job.parent / "out")
    shards = [start(batchrun(parquet_job, "--num-shards", "3", "--shard-index", str(index)), tmp_path / f"s{index}")
              for index in range(3)]
    logs = [finish(shard, tmp_path / f"s{index}") for index, shard in enumerate(shards)]
    assert [shard.returncode for shard in shards] == [0, 0, 0], logs
    assert [READ.findall(log) for log in logs] == [[("16", "4")]] * 3  # a third of the row groups each
    pd.testing.assert_frame_equal(output(parquet_job), expected)
    assert sum(log.count("wrote _SUCCESS") for log in logs) == 1
