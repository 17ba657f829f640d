"""The schedulers' examples in the default suite: the Airflow DAG's exit-code policy and command line (the DAG
file imported over a stand-in of Airflow's API, which this environment does not install; tests/test_airflow_dag.py
runs it in a real Airflow 3), and examples/cron/batchrun-cron.sh for real: two overlapping starts, the second
refused by batchrun's own lock (exit 75, said in its log), a later start after the job finished exiting 0 at once.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import jobs
from jobs import output, rows

ROOT = Path(__file__).resolve().parent.parent
DAG_FILE = ROOT / "examples" / "airflow" / "batchrun_dag.py"
CRON = ROOT / "examples" / "cron" / "batchrun-cron.sh"


class AirflowException(Exception):
    pass


class AirflowFailException(AirflowException):
    pass


@pytest.fixture
def dag_module(monkeypatch):
    """batchrun_dag.py imported with stand-ins for the parts of airflow.sdk it uses: the decorators leave the DAG
    unbuilt, so only the module's own functions run."""
    sdk = types.ModuleType("airflow.sdk")
    sdk.dag = lambda **kwargs: (lambda function: (lambda *args, **kw: None))
    sdk.task = lambda function=None, **kwargs: function if function is not None else (lambda f: f)
    sdk.Param = lambda default, **kwargs: default
    sdk.get_current_context = dict
    exceptions = types.ModuleType("airflow.sdk.exceptions")
    exceptions.AirflowException, exceptions.AirflowFailException = AirflowException, AirflowFailException
    for name, module in {"airflow": types.ModuleType("airflow"), "airflow.sdk": sdk,
                         "airflow.sdk.exceptions": exceptions}.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("batchrun_dag", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exit_0_succeeds_2_and_3_fail_without_retry_and_the_rest_are_retried(dag_module):
    assert dag_module.raise_for_exit_code(0, "shard 0 of 2") is None
    for code, message in [(2, "shard 0 of 2 exited 2: a manifest or usage error"),
                          (3, "shard 0 of 2 exited 3: rows failed above errors.max_error_rate; inspect the error "
                              "column")]:
        with pytest.raises(AirflowFailException, match=message):
            dag_module.raise_for_exit_code(code, "shard 0 of 2")
    for code, reason in [(1, "a run-time failure"), (75, "interrupted, or OUTPUT locked by a live run"),
                         (-9, "killed by a signal"), (137, "killed by a signal"), (4, "an unexpected exit code")]:
        with pytest.raises(AirflowException) as raised:
            dag_module.raise_for_exit_code(code, "shard 1 of 2")
        assert not isinstance(raised.value, AirflowFailException)  # AirflowException alone: retried
        assert str(raised.value).startswith(f"shard 1 of 2 exited {code}: {reason}")


def test_the_task_runs_its_shard_with_each_override_and_the_runs_date(dag_module):
    params = {"batchrun": "/opt/venv/bin/batchrun", "job": "/jobs/embed.yaml", "num_shards": 4,
              "overrides": ["batching.max_tokens=8192", "errors.max_error_rate=0.01"]}
    assert dag_module.batchrun_command(params, 3) == [
        "/opt/venv/bin/batchrun", "run", "/jobs/embed.yaml", "--no-progress", "--num-shards", "4", "--shard-index",
        "3", "--set", "batching.max_tokens=8192", "--set", "errors.max_error_rate=0.01"]
    scheduled = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)
    manual = types.SimpleNamespace(run_after=datetime.datetime(2026, 3, 4, 5, 6, tzinfo=datetime.timezone.utc))
    assert dag_module.partition_date({"logical_date": scheduled, "dag_run": manual}) == "2026-01-02"
    assert dag_module.partition_date({"logical_date": None, "dag_run": manual}) == "2026-03-04"


def test_the_dag_keeps_no_secret_and_no_machine_path():
    text = DAG_FILE.read_text()
    for word in ("password", "secret_key", "token=", "aws_access", "/work/", "/tmp/"):
        assert word not in text.lower()


# --- cron -----------------------------------------------------------------------------------------------------


def cron_start(job: Path, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "BATCHRUN": str(Path(sys.executable).parent / "batchrun"), "LOG_DIR": str(log_dir),
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["bash", str(CRON), str(job)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def new_log(log_dir: Path, seen: set[Path]) -> Path:
    logs = set(log_dir.glob("*.log")) - seen
    assert len(logs) == 1, logs
    seen |= logs
    return logs.pop()


def test_cron_overlapping_starts_the_second_exits_75_saying_so_and_a_later_start_exits_0_at_once(tmp_path,
                                                                                               tiny_models):
    data = rows(48)
    job = jobs.write_job(tmp_path, tiny_models.causal_lm, data, task="text-generation", workers=1,
                         model={"generation": {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}})
    out, log_dir, seen = tmp_path / "out", tmp_path / "logs", set()
    first = cron_start(job, log_dir)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("part-*.parquet")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        # frozen, the first run is alive (its pid exists, its heartbeat is seconds old) however long the second takes
        os.killpg(first.pid, signal.SIGSTOP)
        assert not (out / "_SUCCESS").exists()
        first_log = new_log(log_dir, seen)
        second = cron_start(job, log_dir)
        assert second.wait(timeout=120) == 75
        assert second.communicate() == ("", "")  # nothing for cron to mail
        second_log = new_log(log_dir, seen).read_text()
        assert f"start: {Path(sys.executable).parent / 'batchrun'} run {job}" in second_log
        assert "is locked by a live run: pid " in second_log and "(one process), heartbeat" in second_log
        assert second_log.rstrip().endswith("exit 75: interrupted, or OUTPUT locked by a run still at work (see "
                                            "above); the next start resumes")
        os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first_log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first_log.read_text().rstrip().endswith("exit 0: done")
    assert "wrote _SUCCESS" in first_log.read_text()
    assert list(output(job)["row_id"]) == list(range(len(data)))
    later = cron_start(job, log_dir)
    started = time.monotonic()
    assert later.wait(timeout=120) == 0
    seconds = time.monotonic() - started
    later_log = new_log(log_dir, seen).read_text()
    assert "already holds this finished run; nothing to do" in later_log and "stage components" not in later_log
    assert seconds < 60, later_log
    assert later_log.rstrip().endswith("exit 0: done")
