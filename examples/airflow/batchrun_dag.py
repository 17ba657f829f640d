"""batchrun on Airflow 3: one job, run as N shards, one mapped task per shard.

    # in the scheduler's and workers' environment (or as the DAG's params when triggering):
    export BATCHRUN_JOB=/jobs/embed.yaml BATCHRUN_BIN=/opt/batchrun/.venv/bin/batchrun BATCHRUN_NUM_SHARDS=4
    airflow dags test batchrun 2026-01-02                                 # one run, locally, no scheduler
    airflow dags trigger batchrun --conf '{"overrides": ["batching.max_tokens=8192"]}'

`shard_indexes` lists 0..N-1 from the run's params and `run_shard.expand(shard_index=...)` maps one task per
shard (dynamic task mapping). Each runs `batchrun run JOB --num-shards N --shard-index I --set KEY=VALUE...` in a
subprocess and streams its log into the task's log. A shard is a fixed block of the input's parts, so each task
can be retried alone, and whichever shard finishes last writes OUTPUT/_SUCCESS. The subprocess gets the worker's
environment plus BATCHRUN_DATE, the run's logical date as YYYY-MM-DD (its run_after date for a manual run without
one), so the manifest picks the day's partition and output with `${BATCHRUN_DATE}`:

    dataset: {path: parquet, data_files: "/data/events/day=${BATCHRUN_DATE}/*.parquet"}
    output: {path: "/data/embeddings/day=${BATCHRUN_DATE}"}

The executable, the job and the shard count come from params (defaults from BATCHRUN_BIN, BATCHRUN_JOB,
BATCHRUN_NUM_SHARDS), the retries from BATCHRUN_RETRIES (3) and BATCHRUN_RETRY_DELAY_SECONDS (300): nothing here
is tied to one machine.

batchrun's exit codes, as Airflow sees them:
- 0: success.
- 1 (a run-time failure: the model, the data source, I/O) and 75 (interrupted by a signal, or OUTPUT locked by a
  live run of the same shard, e.g. an earlier attempt still at work): the task fails and is retried after the
  retry delay. A retry resumes: committed parts are kept and never recomputed.
- 2 (the manifest, the command line, or OUTPUT holding another job's run): AirflowFailException, failed at once
  without retry: the same command would fail the same way. Fix the job, then clear the task.
- 3 (every row processed, but failed rows above errors.max_error_rate): also AirflowFailException, with its own
  message ("rows failed above errors.max_error_rate; inspect the error column"). Not retried, because a rerun of
  the finished shard exits 3 again without computing anything: retries would only burn attempts. Not a green
  task with a downstream check either: the output is complete but suspect, and a green shard lets the DAG's
  consumers read it before anyone looks. After inspecting, fix the input, or accept the rows: trigger a run for
  the same logical date with a higher rate (`"overrides": ["errors.max_error_rate=0.01"]`, not part of the run's
  identity): each shard exits 0 at once, judged with the new rate, recomputing nothing.
- anything else (the process killed by a signal: a negative code, or 137): retried like 1.

Secrets stay out of this file and out of params (params are stored in the metadata database and shown in the UI):
credentials for a remote dataset or output reach batchrun through the worker's environment (your deployment's
secrets, or an Airflow connection exported as environment variables), which the subprocess inherits.
"""

from __future__ import annotations

import logging
import os
import subprocess
from datetime import datetime, timedelta, timezone

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

log = logging.getLogger(__name__)

RETRY = {1: "a run-time failure", 75: "interrupted, or OUTPUT locked by a live run of this shard"}
STOP_GRACE_SECONDS = 120  # batchrun commits its part in progress on SIGTERM; then it is killed


def raise_for_exit_code(code: int, what: str) -> None:
    """batchrun's exit code as Airflow's verdict: return on 0, AirflowFailException (no retry) on 2 and 3,
    AirflowException (retried) otherwise."""
    if code == 0:
        return
    if code == 2:
        raise AirflowFailException(f"{what} exited 2: a manifest or usage error (see the log above); fix the job, "
                                   "then clear the task: not retried")
    if code == 3:
        raise AirflowFailException(f"{what} exited 3: rows failed above errors.max_error_rate; inspect the error "
                                   "column of OUTPUT, then fix the input or clear the task with a higher rate: "
                                   "not retried")
    reason = RETRY.get(code, "killed by a signal" if code < 0 or code > 128 else "an unexpected exit code")
    raise AirflowException(f"{what} exited {code}: {reason}; retried, and the retry resumes")


def partition_date(context) -> str:
    """The run's logical date (a scheduled run), else the date it was triggered to run after (a manual run)."""
    date = context.get("logical_date") or context["dag_run"].run_after
    return date.strftime("%Y-%m-%d")


def batchrun_command(params: dict, shard_index: int) -> list[str]:
    command = [params["batchrun"], "run", params["job"], "--no-progress",
               "--num-shards", str(params["num_shards"]), "--shard-index", str(shard_index)]
    for override in params["overrides"]:
        command += ["--set", override]
    return command


@dag(
    dag_id=os.environ.get("BATCHRUN_DAG_ID", "batchrun"),
    schedule=os.environ.get("BATCHRUN_SCHEDULE", "@daily"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": int(os.environ.get("BATCHRUN_RETRIES", "3")),
        "retry_delay": timedelta(seconds=float(os.environ.get("BATCHRUN_RETRY_DELAY_SECONDS", "300"))),
    },
    params={
        "batchrun": Param(os.environ.get("BATCHRUN_BIN", "batchrun"), type="string",
                          description="the batchrun executable on the workers"),
        "job": Param(os.environ.get("BATCHRUN_JOB", "job.yaml"), type="string",
                     description="the job manifest, a path on the workers"),
        "num_shards": Param(int(os.environ.get("BATCHRUN_NUM_SHARDS", "2")), type="integer", minimum=1,
                            description="one mapped task per shard"),
        "overrides": Param([], type="array", items={"type": "string"},
                           description="KEY=VALUE manifest overrides, each passed as --set KEY=VALUE"),
    },
    tags=["batchrun"],
)
def batchrun_dag():
    @task
    def shard_indexes(params=None) -> list[int]:
        return list(range(params["num_shards"]))

    @task(map_index_template="{{ shard }}")  # the mapped tasks are listed as "shard 0 of 4", ...
    def run_shard(shard_index: int) -> None:
        context = get_current_context()
        params = context["params"]
        context["shard"] = f"shard {shard_index} of {params['num_shards']}"
        command = batchrun_command(params, shard_index)
        env = {**os.environ, "BATCHRUN_DATE": partition_date(context)}
        log.info("BATCHRUN_DATE=%s %s", env["BATCHRUN_DATE"], subprocess.list2cmdline(command))
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in process.stdout:
                log.info("%s", line.rstrip("\n"))
            code = process.wait()
        finally:
            # the task stopped by Airflow (a timeout, marked failed): batchrun commits what it can, then exits 75
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
        raise_for_exit_code(code, f"shard {shard_index} of {params['num_shards']}")

    run_shard.expand(shard_index=shard_indexes())


batchrun_dag()
