"""Exactly-once resume and failure handling: kill -9 at random points, SIGTERM, claims and worker records, damaged
parts, bad rows in the forward pass, out-of-memory, and broken sources.

The kill tests run `python -m pipeline_core` in its own process group and SIGKILL the whole group, workers
included: the default one as soon as chosen numbers of parts are committed, `-m slow` at dozens of random times.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import jobs
from jobs import WORDS, copy_job, output, rows, run, start
from pipeline_core import work as work_module
from pipeline_core.cli import run_cli
from pipeline_core.output.claims import held_claims
from pipeline_core.output.store import LocalStore
from pipeline_core.tasks.classification import TextClassificationTask


def write_job(directory: Path, model: Path, data: list[dict], /, **settings) -> Path:
    """The shared job with one preprocessing worker: the kill tests kill the workers too."""
    return jobs.write_job(directory, model, data, workers=1, **settings)


def committed(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each committed part. A recomputed part is written to a new temporary file and renamed
    over the old one, so it gets a new inode even where the clock is too coarse to change its mtime."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in sorted(out.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """An uninterrupted run of the generation job that the kill tests interrupt."""
    job = write_job(tmp_path_factory.mktemp("reference"), tiny_models.causal_lm, rows(48), task="text-generation",
                    model={"generation": {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}})
    started = time.monotonic()
    process = start(job)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return job, output(job), time.monotonic() - started


def kill_when_committed(job: Path, parts: int, log: Path) -> subprocess.Popen:
    """Start the run and SIGKILL its process group as soon as `parts` parts are committed."""
    out = job.parent / "out"
    with open(log, "w") as stderr:  # a file, not a pipe nobody reads while we watch
        process = start(job, stderr=stderr)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < parts:
        assert process.poll() is None, f"the run ended before {parts} parts were committed:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{parts} parts were not committed within 120 s"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers, with no chance to clean up
    process.communicate()
    return process


def test_kill_9_after_chosen_parts_then_resume_equals_an_uninterrupted_run_and_recomputes_nothing(tmp_path,
                                                                                                  reference):
    reference_job, expected, _ = reference
    parts = len(list((reference_job.parent / "out").glob("part-*.parquet")))
    assert parts == 12
    job = copy_job(reference_job, tmp_path / "killed")
    out = job.parent / "out"
    stamps: dict[str, tuple[int, int]] = {}
    for attempt, kill_at in enumerate((1, parts // 2, parts - 1)):  # each attempt resumes the one before
        process = kill_when_committed(job, kill_at, tmp_path / f"attempt-{attempt}.log")
        now = committed(out)
        # killed mid-run: by the signal, before the end, with at least the parts it waited for
        assert process.returncode == -signal.SIGKILL, (tmp_path / f"attempt-{attempt}.log").read_text()
        assert kill_at <= len(now) < parts and not (out / "_SUCCESS").exists()
        assert {name: now[name] for name in stamps} == stamps  # no attempt rewrote a part committed before it
        stamps = now
    process = start(job)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    pd.testing.assert_frame_equal(output(job), expected)
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # temporaries, claims and records are gone
    final = committed(out)
    assert len(final) == parts and {name: final[name] for name in stamps} == stamps


def kill_and_resume(tmp_path: Path, reference, kills: int, seed: int) -> None:
    reference_job, expected, duration = reference
    job = copy_job(reference_job, tmp_path / f"killed-{seed}")
    generator = random.Random(seed)
    for _ in range(kills):
        process = start(job)
        time.sleep(generator.uniform(0.2, duration))
        os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers, with no chance to clean up
        process.wait()
        if process.returncode == 0:
            break
    process = start(job)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    pd.testing.assert_frame_equal(output(job), expected)
    assert not [name for name in os.listdir(job.parent / "out") if name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_kill_9_dozens_of_times(tmp_path, reference, seed):
    kill_and_resume(tmp_path, reference, kills=5, seed=100 + seed)


@pytest.mark.parametrize("send", [os.kill, os.killpg], ids=["to the run", "to its process group"])
def test_sigterm_commits_and_exits_75_within_10_seconds_then_resumes(tmp_path, reference, send):
    # Kubernetes signals the container's first process; Slurm, launchers and a terminal's Ctrl-C the whole
    # process group, DataLoader workers included, which must leave stopping to the run
    reference_job, expected, _ = reference
    job = copy_job(reference_job, tmp_path / "term")
    process = start(job)
    deadline = time.monotonic() + 120
    while not list((job.parent / "out").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    send(process.pid, signal.SIGTERM)  # start() made the run the leader of its own process group
    signalled = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 75, err
    assert time.monotonic() - signalled < 10
    assert "SIGTERM received" in err and "Traceback" not in err
    progress = json.loads((job.parent / "out" / "_progress.json").read_text())
    assert progress["complete"] is False and progress["parts_done"] >= 1
    assert not (job.parent / "out" / "_SUCCESS").exists()
    assert not held_claims(LocalStore(job.parent / "out"))  # its claims are given back
    assert [json.loads(path.read_text())["state"] for path in (job.parent / "out").glob(".worker-*")] == ["stopped"]
    process = start(job)
    assert process.wait(timeout=300) == 0
    pd.testing.assert_frame_equal(output(job), expected)


def live_record(out: Path, pid: int, host: str | None = None, heartbeat: float | None = None) -> dict:
    """A worker record of a process writing `out`, as claims.Worker writes it."""
    record = {"worker": f"w{pid}", "host": host or socket.gethostname(), "pid": pid, "state": "running",
              "started": time.time(), "heartbeat": heartbeat or time.time(), "rank": 0, "world_size": 1,
              "shard_index": 0, "num_shards": 1}
    out.mkdir(exist_ok=True)
    (out / f".worker-w{pid}.json").write_text(json.dumps(record))
    return record


def test_fresh_while_a_live_process_writes_exits_75_naming_it(tmp_path, tiny_models, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(5))
    assert run(job) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_record(tmp_path / "out", holder.pid)
        assert run(job, "--fresh") == 75
        assert f"live process(es) write it, e.g. pid {holder.pid} on {socket.gethostname()}" in capsys.readouterr().err
        assert (tmp_path / "out" / "_SUCCESS").exists() and (tmp_path / "out" / f".worker-w{holder.pid}.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run(job, "--fresh") == 0  # the holder is dead: nothing live is discarded
    assert not [name for name in os.listdir(tmp_path / "out") if name.startswith(".")]


def test_a_claim_of_a_process_gone_from_another_host_is_taken_over(tmp_path, tiny_models, capfd):
    """The claim is taken in the preprocessing worker, a forked process: capsys (a stand-in sys.stderr in this
    process) and caplog (a handler in this process) never see its log line; capfd captures file descriptor 2,
    which the worker shares."""
    job = write_job(tmp_path, tiny_models.text_classifier, rows(5))
    out = tmp_path / "out"
    live_record(out, 1, host="another-node", heartbeat=time.time() - 3600)
    (out / ".claim-000000.0").write_text(json.dumps({"worker": "w1", "claimed": 0}))
    assert run(job) == 0
    err = capfd.readouterr().err
    assert err.count("took over part 0 from w1, which is gone") == 1
    assert "took over part 1" not in err
    assert not [name for name in os.listdir(out) if name.startswith(".")]


@pytest.fixture
def computed(monkeypatch) -> dict[str, list[int]]:
    """The indexes of the parts a run computes (PartRunner.run) and commits (commit_part), in order."""
    from pipeline_core import execute

    seen: dict[str, list[int]] = {"run": [], "commit": []}
    part_runner, commit_part = execute.PartRunner.run, work_module.commit_part

    def counting_run(self, part):
        seen["run"].append(part.index)
        return part_runner(self, part)

    def counting_commit(store, index, *args):
        seen["commit"].append(index)
        return commit_part(store, index, *args)

    monkeypatch.setattr(execute.PartRunner, "run", counting_run)
    monkeypatch.setattr(work_module, "commit_part", counting_commit)
    return seen


def forget(computed: dict[str, list[int]]) -> None:
    for indexes in computed.values():
        indexes.clear()


def test_a_resume_computes_exactly_the_missing_parts_and_a_finished_rerun_none(tmp_path, tiny_models, computed):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(20))
    assert run(job) == 0
    assert computed == {"run": [0, 1, 2, 3, 4], "commit": [0, 1, 2, 3, 4]}
    expected = output(job)
    out = tmp_path / "out"
    (out / "_SUCCESS").unlink()
    for index in (1, 3):
        (out / f"part-00000{index}.parquet").unlink()
    kept = committed(out)
    forget(computed)
    assert run(job) == 0
    assert computed == {"run": [1, 3], "commit": [1, 3]}  # the last committed part (4) is not among them
    pd.testing.assert_frame_equal(output(job), expected)
    assert {name: committed(out)[name] for name in kept} == kept
    forget(computed)
    finished = committed(out)
    assert run(job) == 0
    assert computed == {"run": [], "commit": []} and committed(out) == finished


def test_damaged_parts_and_leftover_temporaries_are_redone(tmp_path, tiny_models, computed):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(18))
    assert run(job) == 0
    expected = output(job)
    out = tmp_path / "out"
    assert len(committed(out)) == 5
    (out / "_SUCCESS").unlink()
    part = out / "part-000001.parquet"
    part.write_bytes(part.read_bytes()[:200])  # truncated, as by a full disk
    (out / "part-000002.parquet").unlink()
    (out / ".part-000002.parquet.tmp-99999").write_bytes(b"half a file")
    intact = {name: stamp for name, stamp in committed(out).items() if name != "part-000001.parquet"}
    assert sorted(intact) == ["part-000000.parquet", "part-000003.parquet", "part-000004.parquet"]
    forget(computed)
    assert run(job) == 0
    pd.testing.assert_frame_equal(output(job), expected)
    assert computed == {"run": [1, 2], "commit": [1, 2]}  # exactly the damaged and the missing part
    assert {name: committed(out)[name] for name in intact} == intact  # intact parts are never recomputed
    assert not (out / ".part-000002.parquet.tmp-99999").exists()


def test_status_reports_progress_and_completion(tmp_path, tiny_models, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(10))
    assert run(job, "--limit", "6") == 0
    capsys.readouterr()
    assert run_cli(["status", str(tmp_path / "out"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["complete"], status["parts_done"], status["parts_total"]) == (True, 2, 2)
    assert (status["rows_done"], status["rows_total"], status["failed_rows"], status["running"]) == (6, 6, 0, False)
    assert (status["processes"], status["shards"]) == ([], None)  # one process, retired with the job complete
    (tmp_path / "out" / "_SUCCESS").unlink()
    (tmp_path / "out" / "part-000001.parquet").unlink()
    assert run_cli(["status", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "stopped before the end" in text and "parts   1/2" in text and "rows    4/6, 0 failed" in text


def test_failing_rows_in_the_forward_pass_are_isolated_by_bisection(tmp_path, tiny_models, monkeypatch):
    data = rows(20)
    for index in (3, 11):
        data[index]["text"] = "fox"  # one word: [CLS] fox [SEP], the only 3-token rows
    for row in data:
        assert row["text"] == "fox" or len(row["text"].split()) > 1 or row["text"] in WORDS
    job = write_job(tmp_path, tiny_models.text_classifier, data)
    assert run(job) == 0
    clean = output(job)
    forward = TextClassificationTask.forward

    def poisoned(self, model, inputs):
        if (inputs["attention_mask"].sum(dim=1) == 3).any():
            raise RuntimeError("poisoned row")
        return forward(self, model, inputs)

    monkeypatch.setattr(TextClassificationTask, "forward", poisoned)
    assert run(job, "--fresh") == 0
    got = output(job)
    short = [i for i, row in enumerate(data) if len(row["text"].split()) == 1]
    assert set(short) >= {3, 11}
    assert all(got["error"][i] == "forward pass failed: RuntimeError: poisoned row" for i in short)
    good = [i for i in range(len(data)) if i not in short]
    pd.testing.assert_frame_equal(got.iloc[good].reset_index(drop=True), clean.iloc[good].reset_index(drop=True))


def test_out_of_memory_splits_the_batch_and_lowers_the_budget(tmp_path, tiny_models, monkeypatch, caplog):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(24))
    assert run(job) == 0
    clean = output(job)
    forward = TextClassificationTask.forward
    sizes = []

    def small_device(self, model, inputs):
        sizes.append(inputs["input_ids"].numel())
        if inputs["input_ids"].numel() > 60:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, model, inputs)

    monkeypatch.setattr(TextClassificationTask, "forward", small_device)
    with caplog.at_level("WARNING", logger="batchrun"):
        assert run(job, "--fresh") == 0
    pd.testing.assert_frame_equal(output(job), clean)
    assert "batching.max_tokens is now" in caplog.text
    first_oom = next(i for i, size in enumerate(sizes) if size > 60)
    later = sizes[first_oom + 1:]
    assert later and max(later[-5:]) <= 60  # once lowered, the budget holds for the rest of the run


def test_on_error_fail_stops_at_the_first_bad_row_with_exit_1(tmp_path, tiny_models, capsys):
    data = rows(9)
    data[6]["text"] = None
    job = write_job(tmp_path, tiny_models.text_classifier, data)
    assert run(job, "--set", "errors.on_error=fail") == 1
    err = capsys.readouterr().err
    assert "row 6 failed: input column 'text' is null (errors.on_error: fail)" in err
    assert (tmp_path / "out" / "part-000000.parquet").exists()  # what was committed before stays


def test_error_rate_counts_rows_of_earlier_attempts(tmp_path, tiny_models):
    data = rows(8)
    data[1]["text"] = None
    job = write_job(tmp_path, tiny_models.text_classifier, data)
    assert run(job, "--limit", "8", "--set", "errors.max_error_rate=0.5") == 0
    (tmp_path / "out" / "_SUCCESS").unlink()
    (tmp_path / "out" / "part-000001.parquet").unlink()
    # only part 1 is redone; the failed row of part 0 must still count against the threshold
    assert run(job, "--limit", "8", "--set", "errors.max_error_rate=0.1") == 3


def use_parquet(job: Path) -> Path:
    data = job.parent / "rows.parquet"
    pd.read_json(job.parent / "rows.jsonl", lines=True).to_parquet(data)
    jobs.edit_job(job, dataset={"path": "parquet", "data_files": data})
    return data


@pytest.mark.parametrize("damage, code, message", [
    ("missing-file", 2, "rows.parquet' is not a file"),  # a retry cannot bring it back: fix the job (issue 15)
    # damaged in place with its size and modification time kept, as the input's provenance cannot see (a
    # truncated file is an input changed in place: exit 2, test_provenance.py)
    ("damaged-file", 1, "cannot be read"),
])
def test_broken_source_mid_job_exits_and_keeps_committed_parts(tmp_path, tiny_models, capsys, damage, code,
                                                               message):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(12))
    data = use_parquet(job)
    assert run(job) == 0
    out = tmp_path / "out"
    (out / "_SUCCESS").unlink()
    (out / "part-000002.parquet").unlink()
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")}
    if damage == "missing-file":
        data.unlink()
    else:
        before, raw = data.stat(), data.read_bytes()
        footer = int.from_bytes(raw[-8:-4], "little") + 8  # Parquet's footer, its length and magic stay readable
        data.write_bytes(raw[:4] + bytes(len(raw) - 4 - footer) + raw[-footer:])  # its pages are zeroed
        os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    assert run(job) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")} == kept


@pytest.mark.parametrize("override, code, message", [
    ("dataset.input_column=body", 2, "has no column 'body'; its columns are id, text"),
    ("dataset.keep_columns=[id, author]", 2, "has no column 'author'"),
    ("dataset.path=someone/no-such-dataset", 1, "could not be opened"),
    ("dataset.split=validation", 2, "validation"),
])
def test_bad_sources_exit_with_a_plain_message(tmp_path, tiny_models, capsys, override, code, message):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(4))
    assert run(job, "--set", override) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("task, fixture", [("text-classification", "text_classifier"),
                                           ("feature-extraction", "embedder"),
                                           ("token-classification", "token_classifier")])
def test_odd_rows_beside_good_rows_do_not_change_them(tmp_path, tiny_models, task, fixture):
    good = rows(10)
    odd = [None, "", "   ", "fox " * 75_000, "ctrl\x00\x01\x07\x7f chars", "emoji 😀🚀 fox", "family 👨‍👩‍👧 walks",
           "\u200b\u200d", "tab\tand\nnewlines\r\n"]
    mixed = [dict(row) for row in good]
    for index, text in enumerate(odd):
        mixed.insert(2 * index + 1, {"id": f"odd{index}", "text": text})
    model = getattr(tiny_models, fixture)
    clean_job = write_job(tmp_path / "clean", model, good, task=task)
    mixed_job = write_job(tmp_path / "mixed", model, mixed, task=task)
    assert run(clean_job) == 0 and run(mixed_job) == 0
    clean, got = output(clean_job), output(mixed_job)
    odd_rows = got["id"].str.startswith("odd")
    errors = got["error"][odd_rows]
    assert errors.iloc[0] == "input column 'text' is null" and errors.iloc[1:].isna().all()
    kept = got[~odd_rows].drop(columns="row_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, clean.drop(columns="row_id"))
