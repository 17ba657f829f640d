"""The runner around the parts: what `_batchrun.json` and `_progress.json` record, the log lines the docs promise
(a Parquet source's total and progress without a terminal too), the exit code from the share of failed rows and
`errors.on_error: fail`, the automatic token budget, what a rerun finds in OUTPUT (another job's run, parts without a
run, a finished run, another identity), `--fresh`, leftover temporaries, verified parts, stopping on a signal,
`--no-progress`, a source failing mid-run, a part damaged before the finish, and parts computed slice by slice.

What the output holds is in test_run.py; job options and run flags are in test_run_options.py.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import socket
import time
from pathlib import Path

import datasets
import pandas as pd
import pyarrow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from output_files import exited_pid

import jobs
from pipeline_core import __version__, execute
from pipeline_core import runner as runner_module
from pipeline_core import work as work_module
from pipeline_core.cli import run_cli
from pipeline_core.data.loader import PreparedPart, SourceFailure
from pipeline_core.engines import in_process
from pipeline_core.errors import OutputBusy, UsageError
from pipeline_core.execute import StopFlag, token_budget
from pipeline_core.identity.job import job_identity
from pipeline_core.identity.keys import fingerprint, identity
from pipeline_core.layout import Layout
from pipeline_core.manifest import load_job
from pipeline_core.output.claims import held_claims
from pipeline_core.output.progress import Progress
from pipeline_core.output.run_dir import PartFacts, RunDir, commit_part, part_name
from pipeline_core.output.store import LocalStore
from pipeline_core.tasks import build_task
from pipeline_core.work import exit_for_errors

TEXTS = ["the quick brown fox", "jumps over", "the lazy dog while people", "walk", "through london", "today"]
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
FINGERPRINT = "0123456789abcdef"


def write_job(directory: Path, model: Path, texts: list[str | None], parquet: bool = False,
              max_tokens: int | str = 256, **changes) -> Path:
    """The job tiny-sentiment: text-classification over `texts` in parts of 4, with no errors section unless
    `changes` give one; a Parquet source knows its length, a JSON one not."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{index}", "text": text} for index, text in enumerate(texts)]
    if parquet:
        data = directory / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        data = jobs.write_rows(directory / "rows.jsonl", rows)
    job = jobs.job_manifest(directory, model, name="tiny-sentiment",
                            dataset={"path": "parquet" if parquet else "json", "data_files": data},
                            batching={"max_tokens": max_tokens}, errors=None)
    return jobs.write_manifest(directory / "job.yaml", jobs.merged(job, changes))


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def run(job: Path, *args: str) -> tuple[int, list[str]]:
    """Exit code and the batchrun log lines (level and message) of `batchrun run JOB`."""
    handler, logger = Lines(), logging.getLogger("batchrun")
    logger.addHandler(handler)
    try:
        code = run_cli(["run", str(job), "--no-progress", *args])
    finally:
        logger.removeHandler(handler)
    return code, handler.lines


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models):
    """A run of 6 rows in parts of 4, finished: the job, its output directory, its exit code and log lines."""
    job = write_job(tmp_path_factory.mktemp("finished"), tiny_models.text_classifier, TEXTS)
    code, lines = run(job)
    return job, job.parent / "out", code, lines


# --- _batchrun.json, _progress.json, _SUCCESS and the log of a finished run --------------------------------------


def test_finished_run_exits_0_and_writes_exactly_the_documented_files(finished):
    _, out, code, _ = finished
    assert code == 0
    assert sorted(os.listdir(out)) == ["_SUCCESS", "_batchrun.json", "_metrics-000000.json", "_metrics-000001.json",
                                       "_progress.json", "part-000000.parquet", "part-000001.parquet"]
    assert (out / "_SUCCESS").read_bytes() == b""
    for index in (0, 1):
        footer = pq.read_metadata(out / part_name(index))
        assert footer.row_group(0).column(0).compression == "ZSTD"  # output.compression's default


def test_run_info_records_the_job_its_identity_versions_and_the_resolved_model(finished):
    job, out, _, _ = finished
    raw = (out / "_batchrun.json").read_text()
    info = json.loads(raw)
    assert raw == json.dumps(info, indent=2)
    assert list(info) == ["name", "fingerprint", "identity", "manifest", "versions", "device", "dtype",
                          "generation_config", "stages", "label_names", "host", "started", "finished", "rows",
                          "failed_rows", "part_bytes", "processes"]
    loaded = load_job(job, [])
    run_identity = job_identity(loaded, None)[0]
    expected_identity = json.loads(json.dumps(run_identity))
    assert info["name"] == "tiny-sentiment"
    assert info["identity"] == expected_identity and info["identity"]["limit"] is None
    assert set(info["identity"]) == set(identity(loaded, None)) | {"model.resolved", "input.resolved"}
    assert info["fingerprint"] == fingerprint(run_identity)
    assert info["manifest"] == json.loads(json.dumps(loaded.config, default=str))
    assert info["manifest"]["output"]["rows_per_part"] == 4
    assert info["versions"] == {"batchrun": __version__, "python": platform.python_version(),
                                "torch": torch.__version__, "transformers": transformers.__version__,
                                "datasets": datasets.__version__, "pyarrow": pyarrow.__version__}
    assert (info["device"], info["dtype"], info["host"]) == ("cpu", "float32", platform.node())
    assert info["generation_config"] is None  # a classifier does not generate
    names = [stage["name"] for stage in info["stages"]]
    assert names and len(set(names)) == len(names)
    assert all(isinstance(stage["seconds"], float) for stage in info["stages"])
    assert re.fullmatch(TIMESTAMP, info["started"]) and re.fullmatch(TIMESTAMP, info["finished"])
    assert info["started"] <= info["finished"]
    # who computed the job: this one process (the test's), every part and row of it
    [process] = info["processes"]
    assert list(process) == ["host", "pid", "rank", "world_size", "shard_index", "num_shards", "device", "parts_done",
                             "rows_done", "rows_per_second", "input_read"]
    assert {key: value for key, value in process.items() if key != "rows_per_second"} == {
        "host": socket.gethostname(), "pid": os.getpid(), "rank": 0, "world_size": 1, "shard_index": 0,
        "num_shards": 1, "device": "cpu", "parts_done": 2, "rows_done": 6, "input_read": None}
    assert isinstance(process["rows_per_second"], float) and process["rows_per_second"] > 0


def test_progress_json_of_a_finished_run(finished):
    _, out, _, _ = finished
    raw = (out / "_progress.json").read_text()
    snapshot = json.loads(raw)
    assert raw == json.dumps(snapshot, indent=2)
    assert {key: snapshot[key] for key in ("parts_done", "parts_total", "rows_done", "rows_total", "failed_rows",
                                           "eta_seconds", "complete")} == \
        {"parts_done": 2, "parts_total": 2, "rows_done": 6, "rows_total": 6, "failed_rows": 0, "eta_seconds": None,
         "complete": True}


def test_log_of_a_run_names_the_run_its_rows_device_first_part_and_result(finished):
    _, out, _, lines = finished
    run_fingerprint = json.loads((out / "_batchrun.json").read_text())["fingerprint"]
    # a JSON source does not know its length before it is read
    assert f"INFO run {run_fingerprint} as one process: unknown rows, 0 parts already committed, device cpu" in lines
    assert [line for line in lines if "first part to compute" in line] == [
        line for line in lines if re.fullmatch(r"INFO first part to compute \(part 0\) ready \d+\.\ds after the run "
                                               r"started, \d+\.\d\ds after the model was loaded", line)]
    ready = [(float(found[1]), float(found[2])) for line in lines
             if (found := re.search(r"ready (\d+\.\d)s after the run started, (\d+\.\d\d)s", line))]
    # seconds since this run started and since its model was loaded, not clock readings
    assert len(ready) == 1 and 0 <= ready[0][1] <= ready[0][0] + 0.05 < 120  # (the first rounded to 0.1 s)
    done = [line for line in lines if line.startswith("INFO done: ")]
    assert len(done) == 1
    assert re.fullmatch(r"INFO done: 6/6 rows, [\d,]+\.\d rows/s, [\d,]+ tokens/s, ETA 0s; wrote _SUCCESS", done[0])
    assert not [line for line in lines if line.startswith("WARNING")]



def test_parquet_source_knows_its_total_and_logs_progress_without_a_terminal(tmp_path, tiny_models, monkeypatch,
                                                                             caplog):
    from pipeline_core.output import progress

    rows = jobs.sample_rows(9)
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    job = jobs.write_sample_job(tmp_path, tiny_models.text_classifier, rows)
    jobs.edit_job(job, dataset={"path": "parquet", "data_files": tmp_path / "rows.parquet"})
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="batchrun"):
        assert jobs.run(job) == 0
    assert "run " in caplog.text and ": 9 rows, 0 parts already committed" in caplog.text
    assert "/9 rows" in caplog.text and "rows/s" in caplog.text and "ETA" in caplog.text
    snapshot = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert (snapshot["rows_total"], snapshot["parts_total"], snapshot["rows_done"]) == (9, 2, 9)


def test_rerun_of_a_finished_run_does_nothing_and_says_so(finished):
    job, out, _, _ = finished
    before = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.iterdir()}
    code, lines = run(job)
    assert (code, lines[0]) == (0, f"INFO {out} already holds this finished run; nothing to do")
    summary = (r"INFO summary: 0 rows, 0 failed, wall [\d.]+s \(load 0\.0s\), 0\.0 rows/s, 0 tokens/s, padding "
               r"efficiency -, device cpu, dtype float32; the output holds 6 rows, 0 failed")
    assert len(lines) == 2 and re.fullmatch(summary, lines[1])
    assert {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.iterdir()} == before


def test_resume_logs_the_committed_parts_and_computes_only_the_missing_one(tmp_path, finished):
    job, out, _, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "_SUCCESS").unlink()
    (copy / part_name(1)).unlink()
    kept = (copy / part_name(0)).stat().st_ino
    code, lines = run(job, "--output", str(copy))  # output.path is not part of the identity
    assert code == 0
    run_fingerprint = json.loads((out / "_batchrun.json").read_text())["fingerprint"]
    assert f"INFO run {run_fingerprint} as one process: unknown rows, 1 parts already committed, device cpu" in lines
    assert [line.split(" ready ")[0] for line in lines if "first part to compute" in line] == [
        "INFO first part to compute (part 1)"]
    assert (copy / part_name(0)).stat().st_ino == kept
    assert (copy / "_SUCCESS").exists()
    snapshot = json.loads((copy / "_progress.json").read_text())
    assert (snapshot["parts_done"], snapshot["rows_done"], snapshot["complete"]) == (2, 6, True)


# --- exit codes from failed rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failed, rows, rate, code", [
    (1, 4, 0.25, 0),  # exactly at the threshold
    (2, 4, 0.25, 3),
    (1, 4, 0.0, 3),
    (0, 4, 0.0, 0),
    (0, 0, 0.0, 0),  # no rows at all: nothing failed
    (4, 4, 1.0, 0),
])
def test_exit_code_from_the_share_of_failed_rows(failed, rows, rate, code):
    assert exit_for_errors(failed, rows, rate) == code


def test_too_many_failed_rows_are_logged_as_a_warning_with_the_share(caplog):
    caplog.set_level(logging.INFO, logger="batchrun")
    assert exit_for_errors(2, 3, 0.25) == 3
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "2 of 3 rows failed (66.67%), above errors.max_error_rate=0.25")]


def test_failed_rows_within_the_threshold_are_logged_as_info(caplog):
    caplog.set_level(logging.INFO, logger="batchrun")
    assert exit_for_errors(1, 3, 0.5) == 0
    assert exit_for_errors(0, 3, 0.5) == 0
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "1 of 3 rows failed; see the error column")]


def test_run_with_a_failed_row_over_the_threshold_exits_3_after_finishing(tmp_path, tiny_models):
    job = write_job(tmp_path, tiny_models.text_classifier, ["good", None, "also good", "fine", "ok"],
                    errors={"max_error_rate": 0.1})
    code, lines = run(job)
    assert code == 3
    assert "WARNING 1 of 5 rows failed (20.00%), above errors.max_error_rate=0.1" in lines
    assert (tmp_path / "out" / "_SUCCESS").exists()
    snapshot = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert (snapshot["failed_rows"], snapshot["rows_done"], snapshot["complete"]) == (1, 5, True)


def test_on_error_fail_names_the_first_failed_row_of_a_later_part(tmp_path, tiny_models, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, ["a", "b", "c", "d", "e", None, 7, "h"],
                    errors={"on_error": "fail"})
    code, _ = run(job)
    assert code == 1
    assert "row 5 failed: input column 'text' is null (errors.on_error: fail)" in capsys.readouterr().err
    assert sorted(name for name in os.listdir(tmp_path / "out") if name.startswith("part-")) == [part_name(0)]



def test_error_rate_over_the_threshold_exits_3(tmp_path, tiny_models):
    rows = jobs.sample_rows(6)
    rows[0]["text"] = None
    assert jobs.run(jobs.write_sample_job(tmp_path, tiny_models.text_classifier, rows)) == 3
    assert (tmp_path / "out" / "_SUCCESS").exists()


# --- token budget --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, device, budget", [
    ("auto", torch.device("cpu"), 4096),
    ("auto", torch.device("cuda", 0), 16384),
    ("auto", torch.device("mps"), 16384),
    (512, torch.device("cpu"), 512),
    (512, torch.device("cuda", 0), 512),
])
def test_token_budget(setting, device, budget):
    assert token_budget(setting, device) == budget



def test_auto_token_budget_depends_on_the_device():
    assert token_budget("auto", torch.device("cpu")) == 4096
    assert token_budget("auto", torch.device("cuda", 0)) == 16384
    assert token_budget(999, torch.device("cpu")) == 999


# --- what OUTPUT already holds -------------------------------------------------------------------------------------


def run_identity(**changes) -> dict:
    return {"task": "text-classification", "model.name": "tiny", "limit": None, **changes}


def write_run_info(store: LocalStore, values: dict | None, fingerprint_value: str = "feedfacefeedface") -> None:
    info = {"name": None, "fingerprint": fingerprint_value}
    if values is not None:
        info["identity"] = values
    store.put("_batchrun.json", json.dumps(info).encode())


def test_empty_output_is_not_finished(tmp_path):
    assert RunDir(LocalStore(tmp_path / "out")).run_in_output(run_identity()) == (False, None)


def test_output_with_other_files_but_no_parts_and_no_run_info_is_not_finished(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "part-1.parquet").write_text("not a batchrun part name")
    assert RunDir(LocalStore(tmp_path)).run_in_output(run_identity()) == (False, None)


def test_output_with_parts_but_no_run_info_is_refused(tmp_path):
    store = LocalStore(tmp_path)
    commit_part(store, 0, pa.table({"row_id": pa.array([0], pa.int64()), "error": pa.array([None], pa.string())}),
                "none", FINGERPRINT)
    with pytest.raises(UsageError) as raised:
        RunDir(store).run_in_output(run_identity())
    assert str(raised.value) == (f"{tmp_path} holds parts but no _batchrun.json; it is not a batchrun run of this job "
                                 "(use --fresh to discard it, or another output.path)")
    assert raised.value.exit_code == 2


def test_run_of_this_job_is_finished_only_with_success(tmp_path):
    store = LocalStore(tmp_path)
    write_run_info(store, run_identity())
    assert RunDir(store).run_in_output(run_identity()) == (False, run_identity())
    store.put("_SUCCESS", b"")
    assert RunDir(store).run_in_output(run_identity()) == (True, run_identity())


def test_run_of_another_job_is_refused_naming_each_difference(tmp_path):
    store = LocalStore(tmp_path)
    write_run_info(store, run_identity(task="summarization", limit=3))
    store.put("_SUCCESS", b"")
    with pytest.raises(UsageError) as raised:
        RunDir(store).run_in_output(run_identity())
    assert str(raised.value) == (
        f"{tmp_path} holds a run of a different job (fingerprint feedfacefeedface); what differs:\n"
        '  - limit: 3 -> null\n'
        '  - task: "summarization" -> "text-classification"\n'
        "use --fresh to discard it, or another output.path")
    assert raised.value.exit_code == 2


def test_run_info_without_an_identity_is_not_a_runs_record(tmp_path):
    store = LocalStore(tmp_path)
    write_run_info(store, None)
    with pytest.raises(UsageError, match=r"_batchrun.json has no \"identity\" object: it is not a batchrun run "
                                         r"directory, or it was edited; check the path \(rerun the job with --fresh"):
        RunDir(store).run_in_output(run_identity(limit=5))


def worker_record(directory: Path, worker: str, state: str = "running", host: str = "another-node",
                  heartbeat_age: float = 1.0) -> None:
    """A worker record as claims.Worker writes it (another host's: no pid of this machine is probed)."""
    now = time.time()
    record = {"worker": worker, "host": host, "pid": 4242, "rank": 0, "world_size": 1, "shard_index": 0,
              "num_shards": 1, "state": state, "started": now - 600, "heartbeat": now - heartbeat_age}
    (directory / f".worker-{worker}.json").write_text(json.dumps(record))


def test_fresh_discards_exactly_the_runs_files(tmp_path):
    names = ["part-000000.parquet", "part-000007.parquet", "_batchrun.json", "_progress.json", "_SUCCESS",
             ".claim-000000.0", ".claim-000000.1", ".claim-finish.0", ".batchrun.lock", "notes.txt",
             "part-1.parquet", "_eval.json", ".claim-x", ".worker-.json"]
    for name in names:
        (tmp_path / name).write_text(name)
    worker_record(tmp_path, "node-1-abc123", state="stopped")
    worker_record(tmp_path, "node-2-def456", state="running", heartbeat_age=3600)
    RunDir(LocalStore(tmp_path)).discard()
    assert sorted(os.listdir(tmp_path)) == [".batchrun.lock", ".claim-x", ".worker-.json", "notes.txt",
                                            "part-1.parquet"]


def test_fresh_while_a_live_process_writes_is_refused_with_exit_75_and_discards_nothing(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".claim-000003.0").write_text(json.dumps({"worker": "node-2-def456", "claimed": 0}))
    worker_record(tmp_path, "node-1-abc123", state="finished")
    worker_record(tmp_path, "node-2-def456", state="running", heartbeat_age=100)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputBusy) as raised:
        RunDir(LocalStore(tmp_path)).discard()
    assert str(raised.value) == (f"--fresh would discard {tmp_path} while 1 live process(es) write it, e.g. pid 4242 "
                                 "on another-node; retry when they have finished")
    assert raised.value.exit_code == 75
    assert sorted(os.listdir(tmp_path)) == before


def test_fresh_with_shards_is_refused_before_anything_is_discarded(tmp_path):
    (tmp_path / "part-000000.parquet").write_text("a part of another shard")
    with pytest.raises(UsageError) as raised:
        RunDir(LocalStore(tmp_path)).prepare(run_identity(), True, Layout(shard_index=1, num_shards=2))
    assert str(raised.value) == ("--fresh with --num-shards would discard the other shards' parts; discard OUTPUT "
                                 "once before starting the shards (or use a new output.path)")
    assert sorted(os.listdir(tmp_path)) == ["part-000000.parquet"]


def test_prepare_output_creates_the_run_info_once_and_a_second_process_joins_it(tmp_path):
    store = LocalStore(tmp_path)
    assert RunDir(store).prepare(run_identity(), False, Layout()) == (False, run_identity())
    first = (tmp_path / "_batchrun.json").read_text()
    info = json.loads(first)
    assert list(info) == ["fingerprint", "identity", "started"]
    assert (info["fingerprint"], info["identity"]) == (fingerprint(run_identity()), run_identity())
    assert RunDir(store).prepare(run_identity(), False, Layout(shard_index=1, num_shards=2)) == (False, run_identity())
    assert (tmp_path / "_batchrun.json").read_text() == first  # not rewritten: created exclusively
    store.put("part-000000.parquet", b"a committed part: a run to protect")
    with pytest.raises(UsageError, match="holds a run of a different job"):
        RunDir(store).prepare(run_identity(limit=3), False, Layout(shard_index=1, num_shards=2))
    store.put("_SUCCESS", b"")
    assert RunDir(store).prepare(run_identity(), False, Layout()) == (True, run_identity())


def test_prepare_output_replaces_another_jobs_start_that_committed_no_part(tmp_path):
    store = LocalStore(tmp_path)
    RunDir(store).prepare(run_identity(), False, Layout())
    store.put(".claim-000000.0", b'{"worker": "gone"}')
    assert RunDir(store).prepare(run_identity(limit=3), False, Layout()) == (False, run_identity(limit=3))
    assert json.loads((tmp_path / "_batchrun.json").read_text())["identity"] == run_identity(limit=3)
    assert store.names() == ["_batchrun.json"]  # the abandoned start's claim went with it


def test_fresh_run_over_another_jobs_output_starts_over_and_keeps_other_files(tmp_path, finished):
    job, out, _, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("kept")
    assert run(job, "--output", str(copy), "--limit", "2")[0] == 2
    code, _ = run(job, "--output", str(copy), "--limit", "2", "--fresh")
    assert code == 0
    assert sorted(os.listdir(copy)) == ["_SUCCESS", "_batchrun.json", "_metrics-000000.json", "_progress.json",
                                        "notes.txt", "part-000000.parquet"]
    assert (copy / "notes.txt").read_text() == "kept"
    assert json.loads((copy / "_batchrun.json").read_text())["identity"]["limit"] == 2



def test_rerun_of_a_finished_job_recomputes_nothing(tmp_path, tiny_models):
    job = jobs.write_sample_job(tmp_path, tiny_models.text_classifier, jobs.sample_rows())
    assert jobs.run(job) == 0
    part = tmp_path / "out" / "part-000000.parquet"
    stamp = part.stat().st_mtime_ns
    assert jobs.run(job) == 0
    assert part.stat().st_mtime_ns == stamp


def test_rerun_with_another_identity_exits_2_naming_the_key(tmp_path, tiny_models, capsys):
    job = jobs.write_sample_job(tmp_path, tiny_models.text_classifier, jobs.sample_rows())
    assert jobs.run(job) == 0
    assert jobs.run(job, "--set", "output.rows_per_part=3") == 2
    assert "output.rows_per_part: 5 -> 3" in capsys.readouterr().err
    assert jobs.run(job, "--set", "batching.max_tokens=999") == 0  # batching is not identity


def test_leftover_temporaries_are_removed_and_nothing_else(tmp_path):
    dead, host = exited_pid(), socket.gethostname()
    names = [f".part-000001.parquet.tmp-{dead}", f"._batchrun.json.tmp-{dead}-0a1b2c3d",
             f".worker-x.json.tmp-{host}-{dead}-4e5f6a7b", ".batchrun.lock", ".hidden", f"notes.tmp-{dead}",
             "part-000000.parquet", "_SUCCESS"]
    for name in names:
        (tmp_path / name).write_text(name)
    RunDir(LocalStore(tmp_path)).remove_leftovers()
    assert sorted(os.listdir(tmp_path)) == [".batchrun.lock", ".hidden", "_SUCCESS", f"notes.tmp-{dead}",
                                            "part-000000.parquet"]


def test_a_temporary_of_a_live_writer_stays_until_it_is_over_2_minutes_old(tmp_path):
    """A live process renames its temporaries within seconds: a fresh one may be mid-write (another shard starting
    at the same moment must not remove it), one over STALE_AFTER old is a leftover. On another host the pid cannot
    be asked: the age decides."""
    host = socket.gethostname()
    live = f".worker-x.json.tmp-{host}-{os.getpid()}-0a1b2c3d"
    remote_fresh, remote_old = ".part-000001.parquet.tmp-node-9-4242-0a1b2c3d", ".x.tmp-node-9-4242-4e5f6a7b"
    for name, age in ((live, 5), (remote_fresh, 5), (remote_old, 130)):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))
    RunDir(LocalStore(tmp_path)).remove_leftovers()
    assert sorted(os.listdir(tmp_path)) == sorted([live, remote_fresh])
    os.utime(tmp_path / live, (time.time() - 130, time.time() - 130))
    RunDir(LocalStore(tmp_path)).remove_leftovers()
    assert os.listdir(tmp_path) == [remote_fresh]


def test_verified_parts_keeps_this_runs_parts_and_removes_the_others(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchrun")
    store = LocalStore(tmp_path)

    def table(first_row: int, errors: list[str | None]) -> pa.Table:
        return pa.table({"row_id": pa.array(range(first_row, first_row + len(errors)), pa.int64()),
                         "error": pa.array(errors, pa.string())})

    commit_part(store, 0, table(0, [None, "bad", None, None]), "none", FINGERPRINT)
    commit_part(store, 1, table(4, [None] * 4), "none", "another-run-0000")
    commit_part(store, 2, table(8, ["bad", "bad"]), "none", FINGERPRINT)
    commit_part(store, 3, table(12, [None]), "none", FINGERPRINT)
    (tmp_path / part_name(3)).write_bytes((tmp_path / part_name(3)).read_bytes()[:-20])  # truncated
    (tmp_path / "notes.txt").write_text("kept")

    assert RunDir(store).verified_parts(FINGERPRINT, 4) == {0: PartFacts(0, 4, 1), 2: PartFacts(2, 2, 2)}
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", part_name(0), part_name(2)]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"{part_name(1)} is damaged or not from this run: it will be computed again"),
        ("WARNING", f"{part_name(3)} is damaged or not from this run: it will be computed again")]


# --- stopping ------------------------------------------------------------------------------------------------------


def visible(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if not name.startswith("."))


def assert_stopped_and_claiming_nothing(out: Path) -> None:
    """A run that stopped before the end leaves its worker record, saying so, for `status`; its claims it gives
    back, so a rerun (or another process) takes the parts at once instead of waiting for them to go stale."""
    hidden = sorted(name for name in os.listdir(out) if name.startswith("."))
    assert len(hidden) == 1 and re.fullmatch(r"\.worker-[\w.-]+\.json", hidden[0]), hidden
    record = json.loads((out / hidden[0]).read_text())
    assert hidden[0] == f".worker-{record['worker']}.json"
    assert (record["state"], record["pid"], record["host"]) == ("stopped", os.getpid(), socket.gethostname())
    assert (record["rank"], record["world_size"], record["shard_index"], record["num_shards"]) == (0, 1, 0, 1)
    assert record["parts_done"] == 1 and record["heartbeat"] >= record["started"]


@pytest.fixture
def controlled_stop(monkeypatch):
    """The run's stop flag, as a signal handler would set it, and the `should_stop` the task was built with."""
    flag, seen = StopFlag(), []

    class Signals:
        def __enter__(self):
            return flag

        def __exit__(self, *exc_info):
            return False

    def build(job, pipeline, should_stop=lambda: False):
        seen.append(should_stop)
        return build_task(job, pipeline, should_stop=should_stop)

    monkeypatch.setattr(runner_module, "StopOnSignals", Signals)
    monkeypatch.setattr(in_process, "build_task", build)
    return flag, seen


def test_task_is_told_to_stop_when_a_stop_is_requested(tmp_path, tiny_models, controlled_stop):
    flag, seen = controlled_stop
    assert run(write_job(tmp_path, tiny_models.text_classifier, TEXTS[:2], max_tokens="auto"))[0] == 0
    assert len(seen) == 1 and seen[0]() is False  # generation is cut short through this
    flag.signal_name = "SIGTERM"
    assert seen[0]() is True


def test_stop_after_a_part_keeps_it_updates_progress_and_exits_75(tmp_path, tiny_models, controlled_stop,
                                                                   monkeypatch):
    flag, _ = controlled_stop
    commit_whole_part = work_module._commit_whole_part

    def then_stop(*args, **kwargs):
        facts = commit_whole_part(*args, **kwargs)
        flag.signal_name = "SIGTERM"
        return facts

    monkeypatch.setattr(work_module, "_commit_whole_part", then_stop)
    code, lines = run(write_job(tmp_path, tiny_models.text_classifier, TEXTS, parquet=True))
    out = tmp_path / "out"
    assert code == 75
    run_fingerprint = json.loads((out / "_batchrun.json").read_text())["fingerprint"]
    assert f"INFO run {run_fingerprint} as one process: 6 rows, 0 parts already committed, device cpu" in lines
    assert "WARNING stopped by SIGTERM after committing 1 parts; rerun the same command to resume" in lines
    assert not [line for line in lines if line.startswith("INFO done: ")]
    assert visible(out) == ["_batchrun.json", "_metrics-000000.json", "_progress.json", part_name(0)]
    assert_stopped_and_claiming_nothing(out)
    raw = (out / "_progress.json").read_text()
    snapshot = json.loads(raw)
    assert raw == json.dumps(snapshot, indent=2)
    assert {key: snapshot[key] for key in ("parts_done", "parts_total", "rows_done", "rows_total", "complete")} == \
        {"parts_done": 1, "parts_total": 2, "rows_done": 4, "rows_total": 6, "complete": False}
    raw = (out / "_batchrun.json").read_text()
    info = json.loads(raw)
    assert raw == json.dumps(info, indent=2)  # written before the first part, with the run still unfinished
    assert info["finished"] is None and info["fingerprint"] == run_fingerprint


@pytest.mark.parametrize("args, bar", [(["--no-progress"], False), ([], None)])
def test_no_progress_turns_the_bar_off_even_on_a_terminal(tmp_path, tiny_models, monkeypatch, args, bar):
    made = []

    def progress(*args, **kwargs):
        made.append(args[5])  # bar: None lets Progress ask whether stderr is a terminal
        return Progress(*args[:5], False)

    monkeypatch.setattr(runner_module, "Progress", progress)
    job = write_job(tmp_path, tiny_models.text_classifier, TEXTS[:2])
    assert run_cli(["run", str(job), *args]) == 0
    assert made == [bar]


# --- the loader's items --------------------------------------------------------------------------------------------


def test_source_failure_after_a_part_exits_1_naming_the_dataset_and_keeps_the_part(tmp_path, tiny_models, monkeypatch,
                                                                                   capsys):
    part_loader = work_module.part_loader

    def failing_after_the_first_part(*args, **kwargs):
        for item in part_loader(*args, **kwargs):
            yield item
            if isinstance(item, PreparedPart):
                yield SourceFailure("reading part 1 failed: OSError: the disk went away")
                return

    monkeypatch.setattr(work_module, "part_loader", failing_after_the_first_part)
    code, _ = run(write_job(tmp_path, tiny_models.text_classifier, TEXTS))
    assert code == 1
    assert ("error: dataset 'json': reading part 1 failed: OSError: the disk went away; committed parts are kept"
            in capsys.readouterr().err)
    assert visible(tmp_path / "out") == ["_batchrun.json", "_metrics-000000.json", "_progress.json", part_name(0)]
    assert_stopped_and_claiming_nothing(tmp_path / "out")


def test_resume_with_two_workers_computes_parts_after_one_worker_has_finished(tmp_path, tiny_models):
    """Each worker ends with its own end-of-split item; the other worker's parts may still follow it."""
    job = write_job(tmp_path, tiny_models.text_classifier, [f"row {index}" for index in range(20)])
    assert run(job)[0] == 0
    out = tmp_path / "out"
    expected = pq.read_table(out)
    for name in ("_SUCCESS", part_name(1), part_name(3), part_name(4)):
        (out / name).unlink()
    # worker 0 has only part 4 left to compute, worker 1 parts 1 and 3: worker 0 ends first
    assert run(job, "--set", "batching.num_workers=2")[0] == 0
    assert (out / "_SUCCESS").exists()
    assert pq.read_table(out).equals(expected)


def test_a_part_damaged_between_its_commit_and_the_finish_exits_1_and_a_rerun_redoes_it(tmp_path, tiny_models,
                                                                                         monkeypatch, capsys):
    job = jobs.write_job(tmp_path, tiny_models.text_classifier, jobs.rows(6), rows_per_part=2)
    out = tmp_path / "out"
    verify = RunDir.verified_parts
    calls = []

    def damaging(store, fingerprint, rows_per_part, split_start=None):
        calls.append(1)
        if len(calls) == 2:  # the finish's check, after every part was committed
            (out / part_name(1)).write_bytes(b"not parquet any more")
        return verify(store, fingerprint, rows_per_part, split_start)

    monkeypatch.setattr(RunDir, "verified_parts", damaging)
    assert jobs.run(job) == 1
    err = capsys.readouterr().err
    assert f"parts 1 of {out} were damaged after being committed and have been removed; rerun" in err
    assert not (out / "_SUCCESS").exists() and not (out / part_name(1)).exists()
    monkeypatch.setattr(RunDir, "verified_parts", verify)
    assert jobs.run(job) == 0 and (out / "_SUCCESS").exists()
    assert list(jobs.output(job)["row_id"]) == list(range(6))


def test_a_part_computed_slice_by_slice_equals_the_part_computed_whole(tmp_path, tiny_models, monkeypatch):
    from pipeline_core.data import loader

    whole = jobs.write_job(tmp_path / "whole", tiny_models.text_classifier, jobs.rows(20), rows_per_part=8)
    assert jobs.run(whole) == 0
    sliced = jobs.write_job(tmp_path / "sliced", tiny_models.text_classifier, jobs.rows(20), rows_per_part=8)
    monkeypatch.setattr(loader, "SLICE_ROWS", 3)  # parts of 8 rows in slices of 3, 3 and 2; the last part 3 and 1
    seen = []
    run_slice = execute.PartRunner.run

    def watching(self, part):
        seen.append((part.index, part.offset, part.num_rows, part.part_rows, part.first_row))
        return run_slice(self, part)

    monkeypatch.setattr(execute.PartRunner, "run", watching)
    assert jobs.run(sliced) == 0
    assert seen == [(0, 0, 3, 8, 0), (0, 3, 3, 8, 3), (0, 6, 2, 8, 6), (1, 0, 3, 8, 8), (1, 3, 3, 8, 11),
                    (1, 6, 2, 8, 14), (2, 0, 3, 4, 16), (2, 3, 1, 4, 19)]
    pd.testing.assert_frame_equal(jobs.output(sliced), jobs.output(whole))
    committed = sorted(path.name for path in (tmp_path / "sliced" / "out").glob("part-*"))
    assert committed == [part_name(index) for index in range(3)]


def test_a_stop_between_the_slices_of_a_part_commits_none_of_it(tmp_path, tiny_models, monkeypatch,
                                                                  controlled_stop):
    from pipeline_core.data import loader

    flag, _ = controlled_stop
    job = jobs.write_job(tmp_path, tiny_models.text_classifier, jobs.rows(8), rows_per_part=8)
    monkeypatch.setattr(loader, "SLICE_ROWS", 4)
    compute = work_module._compute_slice

    def then_stop(*args, **kwargs):
        table = compute(*args, **kwargs)
        flag.signal_name = "SIGTERM"  # after the first slice of the only part
        return table

    monkeypatch.setattr(work_module, "_compute_slice", then_stop)
    assert jobs.run(job) == 75
    assert not list((tmp_path / "out").glob("part-*")) and not held_claims(LocalStore(tmp_path / "out"))
