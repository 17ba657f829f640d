"""examples/airflow/batchrun_dag.py in a real Airflow 3: `airflow db migrate` on SQLite in a temporary AIRFLOW_HOME,
then `airflow dags test` runs of the DAG over tiny jobs, offline, each task calling this checkout's `batchrun`.

- two shards, each failing once first (exit 75 for shard 0, exit 1 for shard 1: a wrapper in front of batchrun
  plays a preempted node), both retried, and the day's output complete: every part, _SUCCESS, the rows;
- a manifest error: exit 2, the task failed after one try although it had retries left;
- failed rows above errors.max_error_rate: exit 3, failed after one try with its own message.

Not in the default suite (`-m airflow`: `tox -e airflow` or `examples/airflow/check.sh`): Airflow lives in its own
virtualenv (AIRFLOW_VENV, default .airflow-venv), which this builds with pip when it is missing (about 2 minutes),
and each `dags test` takes a minute or so on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import jobs
from jobs import rows

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "examples" / "airflow"
BATCHRUN = Path(sys.executable).parent / "batchrun"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory) -> Path:
    """The `airflow` executable of AIRFLOW_VENV, installed there first when missing."""
    venv = Path(os.environ.get("AIRFLOW_VENV", ROOT / ".airflow-venv"))
    if not (venv / "bin" / "airflow").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "apache-airflow>=3,<4"],
                       check=True)
    return venv / "bin" / "airflow"


@pytest.fixture(scope="module")
def airflow_env(airflow, tmp_path_factory) -> dict:
    """A fresh AIRFLOW_HOME with a migrated SQLite database, the DAG folder, and short retry delays."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.pop("PYTHONPATH", None)  # Airflow's own interpreter; batchrun gets this checkout through its wrapper
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               BATCHRUN_RETRY_DELAY_SECONDS="1", BATCHRUN_RETRIES="2")
    subprocess.run([str(airflow), "db", "migrate"], env=env, check=True, capture_output=True, text=True)
    return env


def wrapper(directory: Path, fail_first: bool = False) -> Path:
    """An executable in front of this checkout's batchrun; with `fail_first`, each shard's first attempt exits
    75 (shard 0) or 1 (others) without running it, as a preempted or busy node would."""
    script = directory / "batchrun"
    failing = ('shard=""; previous=""\n'
               'for arg in "$@"; do [ "$previous" = --shard-index ] && shard=$arg; previous=$arg; done\n'
               f'if [ ! -e "{directory}/tried-$shard" ]; then\n'
               f'    touch "{directory}/tried-$shard"; echo "simulated failure of shard $shard"\n'
               '    [ "$shard" = 0 ] && exit 75 || exit 1\n'
               'fi\n') if fail_first else ""
    script.write_text(f"#!/usr/bin/env bash\nexport PYTHONPATH={ROOT}\n{failing}exec {BATCHRUN} \"$@\"\n")
    script.chmod(0o755)
    return script


def dags_test(airflow: Path, env: dict, date: str, conf: dict, log: Path) -> str:
    with open(log, "w") as out:
        subprocess.run([str(airflow), "dags", "test", "batchrun", date, "--conf", json.dumps(conf)], env=env,
                       stdout=out, stderr=subprocess.STDOUT, timeout=600)
    return log.read_text()


def task_instances(env: dict, date: str) -> dict[str, tuple[str, int]]:
    """{"run_shard 0": (state, try number), ...} of the DAG run of `date`, from the metadata database."""
    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as db:
        found = db.execute("SELECT ti.task_id, ti.map_index, ti.state, ti.try_number FROM task_instance ti "
                           "JOIN dag_run dr ON ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id "
                           "WHERE dr.logical_date LIKE ?", (f"{date}%",)).fetchall()
    return {task if index < 0 else f"{task} {index}": (state, tries) for task, index, state, tries in found}


def dated_job(directory: Path, model: Path, data: list[dict], /, **settings) -> Path:
    """A test job whose output is OUTPUT/day=${BATCHRUN_DATE}: the DAG's partition date reaches the manifest."""
    job = jobs.write_job(directory, model, data, **settings)
    return jobs.edit_job(job, output={"path": f"{directory}/out/day=${{BATCHRUN_DATE}}"})


def test_two_shards_each_failing_once_are_retried_and_the_days_output_is_complete(airflow, airflow_env, tmp_path,
                                                                                   tiny_models):
    data = rows(20)
    job = dated_job(tmp_path, tiny_models.text_classifier, data)
    started = time.monotonic()
    log = dags_test(airflow, airflow_env, "2026-01-02", {"batchrun": str(wrapper(tmp_path, fail_first=True)),
                                                         "job": str(job), "num_shards": 2}, tmp_path / "log")
    seconds = time.monotonic() - started
    assert task_instances(airflow_env, "2026-01-02") == {
        "shard_indexes": ("success", 1), "run_shard 0": ("success", 2), "run_shard 1": ("success", 2)}, log
    assert "shard 0 of 2 exited 75: interrupted, or OUTPUT locked by a live run of this shard; retried" in log
    assert "shard 1 of 2 exited 1: a run-time failure; retried" in log
    out = tmp_path / "out" / "day=2026-01-02"
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == [
        "_SUCCESS", "_batchrun.json", *(f"_metrics-{index:06d}.json" for index in range(5)), "_progress.json",
        *(f"part-{index:06d}.parquet" for index in range(5))]
    result = pd.read_parquet(out)
    assert list(result["row_id"]) == list(range(20)) and list(result["id"]) == [row["id"] for row in data]
    print(f"dags test of two shards, each retried once: {seconds:.0f}s")


def test_a_manifest_error_fails_the_task_once_without_retry(airflow, airflow_env, tmp_path, tiny_models):
    job = dated_job(tmp_path, tiny_models.text_classifier, rows(4))
    jobs.edit_job(job, batching={"max_tokens": -5})
    log = dags_test(airflow, airflow_env, "2026-01-03", {"batchrun": str(wrapper(tmp_path)), "job": str(job),
                                                         "num_shards": 1}, tmp_path / "log")
    assert task_instances(airflow_env, "2026-01-03")["run_shard 0"] == ("failed", 1), log  # retries: 2, unused
    assert "batching.max_tokens must be" in log
    assert "shard 0 of 1 exited 2: a manifest or usage error" in log
    assert not (tmp_path / "out").exists()


def test_rows_failed_above_the_rate_fail_the_task_once_with_their_own_message(airflow, airflow_env, tmp_path,
                                                                             tiny_models):
    data = [*rows(6), {"id": "bad", "text": None}]
    job = dated_job(tmp_path, tiny_models.text_classifier, data)
    jobs.edit_job(job, errors={"max_error_rate": 0.0})
    log = dags_test(airflow, airflow_env, "2026-01-04", {"batchrun": str(wrapper(tmp_path)), "job": str(job),
                                                         "num_shards": 1}, tmp_path / "log")
    assert task_instances(airflow_env, "2026-01-04")["run_shard 0"] == ("failed", 1), log
    assert "shard 0 of 1 exited 3: rows failed above errors.max_error_rate; inspect the error column" in log
    out = tmp_path / "out" / "day=2026-01-04"
    assert (out / "_SUCCESS").exists() and len(pd.read_parquet(out)) == 7  # complete, but suspect
