"""The runnable examples of examples/, run here as their schedulers would run them: the Slurm array script with
each task's SLURM_ARRAY_* variables, the multi-node torchrun script as two one-process "nodes" on loopback, and
the Kubernetes indexed Job's container command with each JOB_COMPLETION_INDEX. Each over a test job, and each
equal to a single-process run of that job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import jobs
from jobs import output, rows

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def job(tmp_path, tiny_models) -> Path:
    return jobs.write_job(tmp_path, tiny_models.text_classifier, rows(16), rows_per_part=2)


@pytest.fixture
def reference(tmp_path_factory, tiny_models) -> pd.DataFrame:
    job = jobs.write_job(tmp_path_factory.mktemp("reference"), tiny_models.text_classifier, rows(16),
                         rows_per_part=2)
    assert jobs.run(job) == 0
    return output(job)


def environment(**variables: str) -> dict:
    """This environment, with the virtualenv's `batchrun` and `torchrun` first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **variables}


def check_run(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as stderr:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def test_the_slurm_array_script_runs_each_task_as_its_shard(job, reference, tmp_path):
    out = job.parent / "out"
    for task in (1, 2):  # --array=1-2: numbered from 1, as Slurm allows
        env = environment(JOB=str(job), OUTPUT=str(out), SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_MIN="1",
                          SLURM_ARRAY_TASK_COUNT="2")
        process = check_run(["bash", str(EXAMPLES / "slurm_array.sh")], env, tmp_path / f"task{task}")
        assert process.wait(timeout=300) == 0, (tmp_path / f"task{task}").read_text()
        assert f"batchrun[shard {task - 1}/2]" in (tmp_path / f"task{task}").read_text()
    assert (out / "_SUCCESS").exists()
    pd.testing.assert_frame_equal(output(job), reference)


def test_the_multinode_torchrun_script_runs_as_two_nodes_on_loopback(job, reference, tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    nodes = [check_run(["bash", str(EXAMPLES / "torchrun_multinode.sh")],
                       environment(JOB=str(job), OUTPUT=str(job.parent / "out"), NNODES="2", NODE_RANK=str(node),
                                   NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, MAX_RESTARTS="0"),
                       tmp_path / f"node{node}")
             for node in range(2)]
    logs = [(node.wait(timeout=300), (tmp_path / f"node{index}").read_text()) for index, node in enumerate(nodes)]
    assert [code for code, _ in logs] == [0, 0], logs
    text = "".join(log for _, log in logs)
    assert "as rank 0 of 2 (local rank 0)" in text and "batchrun[rank 1/2]" in text
    # rank 1 may start only after rank 0 has done the whole tiny job: then it says so instead
    assert ("as rank 1 of 2 (local rank 0)" in text) != ("already holds this finished run" in text)
    pd.testing.assert_frame_equal(output(job), reference)


def test_the_kubernetes_indexed_job_command_runs_each_index_as_its_shard(job, reference, tmp_path):
    manifest = yaml.safe_load((EXAMPLES / "k8s_indexed_job.yaml").read_text())
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    container = spec["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["batchrun", "run", "jobs/summarize.yaml"] and (ROOT / command[2]).exists()
    # this test's job and output in place of the example's, the rest of the command as written
    command = [str(Path(sys.executable).parent / "batchrun"), "run", str(job),
               *[str(job.parent / "out") if argument == "/results/summarize-articles" else argument
                 for argument in command[3:]]]
    for index in range(spec["completions"]):
        process = check_run(command, environment(JOB_COMPLETION_INDEX=str(index)), tmp_path / f"pod{index}")
        assert process.wait(timeout=300) == 0, (tmp_path / f"pod{index}").read_text()
    pd.testing.assert_frame_equal(output(job), reference)


@pytest.mark.parametrize("example", ["slurm_array.sh", "torchrun_multinode.sh", "k8s_indexed_job.yaml"])
def test_each_example_uses_a_shipped_job_file_that_also_runs_as_one_process(example):
    text = (EXAMPLES / example).read_text()
    assert "jobs/summarize.yaml" in text and (ROOT / "jobs" / "summarize.yaml").exists()
    assert "batchrun jobs/summarize.yaml" in text  # the single-process command, named in the example
