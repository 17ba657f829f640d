"""Odd files and broken storage end in one plain message, never "internal error": a full disk, a read-only OUTPUT or
an unreadable file is exit 1 naming the file and the system's reason (a rerun resumes); an output.path that is a
file, or a run directory whose `_batchrun.json` is not a run's, is exit 2 (fix it, do not retry).

The store's failures are injected in process first; then real filesystems (a tmpfs that fills mid-run, a read-only
one) are mounted in a user and mount namespace of their own, where `unshare` is permitted.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs
from jobs import rows, write_job
from pipeline_core.cli import run_cli
from pipeline_core.errors import StorageError, UsageError
from pipeline_core.output import store as store_module
from pipeline_core.output.run_dir import claim_name, commit_part, part_name, worker_name
from pipeline_core.output.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
FINGERPRINT = "0123456789abcdef"
RERUN = "then rerun the same command to resume"


def os_error(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), *([filename] if filename else []))


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def plain(err: str) -> bool:
    return "internal error" not in err and "Traceback" not in err


# --- the store, with failures injected ---------------------------------------------------------------------------


class FillsUp:
    """A file on a disk with `room` bytes left: the write stores what fits, then fails, as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        self.file.write(data[:self.room])
        self.file.flush()  # the partial temporary is really on disk: the store must remove it
        raise os_error(errno.ENOSPC)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


@pytest.fixture
def out(tmp_path) -> Path:
    """OUTPUT holding one committed part, and an old version of the part about to be overwritten."""
    store = LocalStore(tmp_path / "out")
    store.put(part_name(0), b"part 0, complete")
    store.put(part_name(1), b"part 1, the old complete version")
    return tmp_path / "out"


def full_disk_on_write(monkeypatch) -> None:
    monkeypatch.setattr(store_module, "open", lambda path, mode: FillsUp(builtins.open(path, mode), 5),
                        raising=False)


def raising(error: Exception):
    def failing(*args, **kwargs):
        raise error
    return failing


def fails(function_name: str, code: int):
    """An injection: os.`function_name` fails with `code`."""
    return lambda monkeypatch: monkeypatch.setattr(os, function_name, raising(os_error(code)))


@pytest.mark.parametrize("inject, reason, advice", [
    (full_disk_on_write, "No space left on device (errno 28)", "free space"),
    (fails("fsync", errno.ENOSPC), "No space left on device (errno 28)", "free space"),
    (fails("fsync", errno.EIO), "Input/output error (errno 5)", "fix that"),
    (fails("replace", errno.EROFS), "Read-only file system (errno 30)", "make it writable"),
    (fails("replace", errno.EACCES), "Permission denied (errno 13)", "give this user write access"),
], ids=["write-ENOSPC", "fsync-ENOSPC", "fsync-EIO", "rename-EROFS", "rename-EACCES"])
def test_a_failed_put_is_a_plain_storage_error_and_leaves_no_temporary(out, monkeypatch, inject, reason, advice):
    inject(monkeypatch)
    with pytest.raises(StorageError) as failed:
        LocalStore(out).put(part_name(1), b"part 1, the new version, never seen half-written")
    monkeypatch.undo()
    assert str(failed.value) == (f"cannot write {part_name(1)} in {out}: {reason}; committed parts are kept: "
                                 f"{advice}, {RERUN}")
    assert failed.value.exit_code == 1
    assert listing(out) == [part_name(0), part_name(1)]
    assert (out / part_name(1)).read_bytes() == b"part 1, the old complete version"


def test_a_failed_create_leaves_neither_its_temporary_nor_the_name(out, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda descriptor, mode: FillsUp(real_fdopen(descriptor, mode), 3))
    with pytest.raises(StorageError, match=rf"^cannot write \.claim-000002\.0 in {out}: No space left on device "):
        LocalStore(out).create(claim_name(2, 0), b'{"worker": "w"}')
    monkeypatch.undo()
    assert listing(out) == [part_name(0), part_name(1)]


def test_a_create_without_hard_links_on_a_full_disk_leaves_no_partial_file_under_the_name(out, monkeypatch):
    """The in-place fallback writes under the real name: a failed write must take the name away again."""
    real_fdopen = os.fdopen
    opened = []

    def fdopen(descriptor, mode):
        opened.append(descriptor)
        file = real_fdopen(descriptor, mode)
        return file if len(opened) == 1 else FillsUp(file, 3)  # the temporary fits; the in-place write does not

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(os, "link", raising(os_error(errno.EPERM)))
    with pytest.raises(StorageError, match="No space left on device"):
        LocalStore(out).create(claim_name(2, 0), b'{"worker": "w"}')
    monkeypatch.undo()
    assert len(opened) == 2
    assert listing(out) == [part_name(0), part_name(1)]


@pytest.mark.parametrize("method, args, patched, message", [
    ("get", ("_batchrun.json",), "read_bytes", "cannot read _batchrun.json in {out}: Permission denied (errno 13)"),
    ("open", (part_name(0),), None, "cannot read part-000000.parquet in {out}: Permission denied (errno 13)"),
    ("exists", ("_SUCCESS",), "stat", "cannot read _SUCCESS in {out}: Permission denied (errno 13)"),
    ("age", (part_name(0),), "stat", "cannot read part-000000.parquet in {out}: Permission denied (errno 13)"),
    ("names", (), "iterdir", "cannot list {out}: Permission denied (errno 13)"),
    ("remove", (part_name(0),), "unlink",
     f"cannot remove part-000000.parquet from {{out}}: Permission denied (errno 13); committed parts are kept: "
     f"give this user write access, {RERUN}"),
])
def test_reads_listings_and_removals_that_fail_name_the_file_and_the_reason(out, monkeypatch, method, args, patched,
                                                                           message):
    denied = raising(os_error(errno.EACCES))
    if patched is None:
        monkeypatch.setattr(store_module, "open", denied, raising=False)
    else:
        monkeypatch.setattr(Path, patched, denied)
    with pytest.raises(StorageError) as failed:
        getattr(LocalStore(out), method)(*args)
    monkeypatch.undo()
    assert str(failed.value) == message.format(out=out)


def test_not_found_is_still_no_error(tmp_path):
    store = LocalStore(tmp_path / "never-created")
    assert (store.get("x"), store.exists("x"), store.names(), store.age("x")) == (None, False, [], 0.0)
    store.remove("x")
    with pytest.raises(FileNotFoundError):
        store.open("x")  # a part gone since the listing: read_part_facts judges it damaged


def test_a_directory_that_cannot_be_created_is_a_storage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "mkdir", raising(os_error(errno.EROFS)))
    with pytest.raises(StorageError) as failed:
        LocalStore(tmp_path / "out").put("_SUCCESS", b"")
    assert str(failed.value) == (f"cannot create the directory {tmp_path / 'out'}: Read-only file system (errno 30); "
                                 f"committed parts are kept: make it writable, {RERUN}")


@pytest.mark.parametrize("method, args", [("put", ("_SUCCESS", b"")), ("create", (".claim-finish.0", b"{}")),
                                          ("get", ("_batchrun.json",)), ("names", ())])
@pytest.mark.parametrize("where", ["root", "parent"])
def test_an_output_path_that_is_a_file_is_a_usage_error(tmp_path, method, args, where):
    file = tmp_path / "results.parquet"
    file.write_bytes(b"somebody's file")
    root = file if where == "root" else file / "out"
    with pytest.raises(UsageError) as failed:
        getattr(LocalStore(root), method)(*args)
    inside = "" if where == "root" else f" is inside {file}, which"
    assert str(failed.value) == (f"output.path {root}{inside} is a file, not a directory; point output.path at a "
                                 "directory (batchrun creates it)")
    assert failed.value.exit_code == 2
    assert file.read_bytes() == b"somebody's file"


# --- the command line --------------------------------------------------------------------------------------------


def test_an_os_error_no_layer_explained_is_one_plain_line_exit_1(monkeypatch, capsys):
    from pipeline_core import status

    monkeypatch.setattr(status, "run_status", raising(os_error(errno.ENOSPC, "/var/cache/x")))
    assert run_cli(["status", "somewhere"]) == 1
    assert capsys.readouterr().err == "error: cannot use /var/cache/x: No space left on device (errno 28)\n"
    monkeypatch.setenv("BATCHRUN_DEBUG", "1")
    assert run_cli(["status", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: cannot use /var/cache/x: No space left on device (errno 28)\n")


def test_an_os_error_without_a_file_still_says_its_reason(monkeypatch, capsys):
    from pipeline_core import status

    monkeypatch.setattr(status, "run_status", raising(ConnectionResetError(104, "gone")))
    assert run_cli(["status", "somewhere"]) == 1
    assert capsys.readouterr().err == "error: gone (errno 104) (ConnectionResetError)\n"


# --- status, and runs, of odd run directories --------------------------------------------------------------------


def make_run(out: Path, info: dict | None = None) -> None:
    """A stopped run of parts of 4 rows: part 0 committed, 2 parts in all."""
    store = LocalStore(out)
    store.put("_batchrun.json", json.dumps(info or {"name": "tiny", "fingerprint": FINGERPRINT,
                                                    "identity": {"output.rows_per_part": 4}}).encode())
    store.put("_progress.json", json.dumps({"parts_total": 2, "rows_total": 6, "rows_per_second": 2.0}).encode())
    table = pa.table({"row_id": pa.array(range(4), pa.int64()), "error": pa.array([None] * 4, pa.string())})
    commit_part(store, 0, table, "none", FINGERPRINT)


def status_error(path: Path, capsys) -> str:
    assert run_cli(["status", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and plain(captured.err)
    return captured.err


def test_status_of_a_file_exits_2(tmp_path, capsys):
    file = tmp_path / "part-000000.parquet"
    file.write_bytes(b"PAR1")
    assert status_error(file, capsys) == (f"error: {file} is a file, not a run directory; give status a job's "
                                          "output.path\n")


ADVICE = "it is not a batchrun run directory, or it was edited; check the path (rerun the job with --fresh to " \
         "start it over)"


@pytest.mark.parametrize("content, problem", [
    (b"", "is not valid JSON (line 1 column 1)"),
    (b"<html>not a run</html>", "is not valid JSON (line 1 column 1)"),
    (b'{"fingerprint": "0123456789abcdef",\n "identity": {', "is not valid JSON (line 2 column 15)"),
    (b"\x80\x81 binary", "is not UTF-8 text"),
    (b"null", "holds null, not a JSON object"),
    (b"[]", "holds [], not a JSON object"),
    (b'"a run"', 'holds "a run", not a JSON object'),
    (b'{"identity": {"output.rows_per_part": 4}}', 'has no "fingerprint" string'),
    (b'{"fingerprint": 7, "identity": {"output.rows_per_part": 4}}', 'has no "fingerprint" string'),
    (b'{"fingerprint": "0123456789abcdef"}', 'has no "identity" object'),
    (b'{"fingerprint": "0123456789abcdef", "identity": [4]}', 'has an "identity" that is not an object'),
    (b'{"fingerprint": "0123456789abcdef", "identity": {}}',
     'has no positive "output.rows_per_part" in its "identity"'),
    (b'{"fingerprint": "0123456789abcdef", "identity": {"output.rows_per_part": "4"}}',
     'has no positive "output.rows_per_part" in its "identity"'),
    (b'{"fingerprint": "0123456789abcdef", "identity": {"output.rows_per_part": 0}}',
     'has no positive "output.rows_per_part" in its "identity"'),
    (b'{"fingerprint": "0123456789abcdef", "identity": {"output.rows_per_part": true}}',
     'has no positive "output.rows_per_part" in its "identity"'),
], ids=lambda value: value[:24].decode(errors="replace") if isinstance(value, bytes) else None)
def test_status_of_a_run_info_that_is_not_a_runs_exits_2_naming_the_file(tmp_path, capsys, content, problem):
    out = tmp_path / "out"
    make_run(out)
    (out / "_batchrun.json").write_bytes(content)
    assert status_error(out, capsys) == f"error: {out / '_batchrun.json'} {problem}: {ADVICE}\n"


@pytest.mark.parametrize("content", [b"", b'{"parts_total": 2, "rows', b"null", b"[2, 6]", b'"2 parts"',
                                     b'{"parts_total": "two", "rows_total": 6.5, "rows_per_second": "fast", '
                                     b'"eta_seconds": [1]}',
                                     b'{"parts_total": true, "rows_total": null, "rows_per_second": {}}'])
def test_status_with_an_odd_progress_file_falls_back_to_the_part_footers(tmp_path, capsys, content):
    out = tmp_path / "out"
    make_run(out)
    (out / "_progress.json").write_bytes(content)
    assert run_cli(["status", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {key: found[key] for key in ("parts_done", "rows_done", "parts_total", "rows_total", "rows_per_second",
                                        "eta_seconds")} == {
        "parts_done": 1, "rows_done": 4, "parts_total": None, "rows_total": None, "rows_per_second": None,
        "eta_seconds": None}
    assert run_cli(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["  parts   1 (0)", "  rows    4, 0 failed"]


def write_record(out: Path, worker: str, **fields) -> None:
    now = time.time()
    record = {"worker": worker, "host": "another-node", "pid": 4242, "rank": 0, "world_size": 1, "shard_index": 0,
              "num_shards": 1, "device": "cpu", "state": "running", "started": now - 60, "heartbeat": now - 1,
              "rows_per_second": 3.0, "parts_done": 1, **fields}
    (out / worker_name(worker)).write_text(json.dumps(record))


def test_status_shows_odd_fields_of_a_live_record_as_unknown(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out)
    write_record(out, "odd", host=5, pid="4242", rank="0", world_size="2", shard_index=[0], num_shards="3",
                 device=None, rows_per_second="fast", parts_done="many", started="yesterday", round_robin="yes")
    (out / claim_name(1, 0)).write_text(json.dumps({"worker": "odd", "claimed": time.time()}))
    assert run_cli(["status", str(out), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["processes"] == [{"host": None, "pid": None, "rank": None, "world_size": None, "shard_index": None,
                                   "num_shards": None, "device": None, "rows_per_second": None, "parts_done": None,
                                   "heartbeat": pytest.approx(time.time(), abs=60), "claims": [1]}]
    assert found["shards"] is None
    assert run_cli(["status", str(out)]) == 0
    assert "  process single: pid None on None, 0.0 rows/s, 0 parts done, heartbeat " in capsys.readouterr().out


def test_status_of_odd_shard_records_takes_the_latest_well_formed_one(tmp_path, capsys):
    out = tmp_path / "out"
    make_run(out)
    write_record(out, "a", num_shards=2, shard_index=0, started="long ago", state="finished")
    write_record(out, "b", num_shards=2.0, shard_index=1, state="finished")  # 2.0 is no shard count
    assert run_cli(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == [
        {"shard": 0, "parts": 1, "parts_done": 1, "finished": True},
        {"shard": 1, "parts": 1, "parts_done": 0, "finished": False}]


@pytest.mark.parametrize("heartbeat", ["a second ago", None, [1]])
def test_status_with_a_record_whose_heartbeat_is_no_number_exits_0(tmp_path, capsys, heartbeat):
    out = tmp_path / "out"
    make_run(out)
    write_record(out, "odd", heartbeat=heartbeat)
    assert run_cli(["status", str(out)]) == 0
    captured = capsys.readouterr()
    assert plain(captured.err) and "  parts   1/2 (0)" in captured.out


@pytest.mark.parametrize("worker", [["node-2"], {"id": "node-2"}])
def test_status_with_a_claim_naming_no_worker_id_exits_0(tmp_path, capsys, worker):
    out = tmp_path / "out"
    make_run(out)
    write_record(out, "node-2")
    (out / claim_name(1, 0)).write_text(json.dumps({"worker": worker, "claimed": time.time()}))
    assert run_cli(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["processes"][0]["claims"] == []


@pytest.mark.parametrize("content, problem", [(b"{torn", "is not valid JSON (line 1 column 2)"),
                                              (b"null", "holds null, not a JSON object"),
                                              (b'{"identity": [4]}', 'has an "identity" that is not an object')])
def test_a_run_into_an_output_whose_run_info_is_not_a_runs_exits_2(tmp_path, tiny_models, capsys, content, problem):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(4))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_batchrun.json").write_bytes(content)
    assert run_cli(["run", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert plain(err) and f"error: {tmp_path / 'out' / '_batchrun.json'} {problem}: {ADVICE}\n" in err


# --- runs on storage that fails ----------------------------------------------------------------------------------

ROWS_PER_PART = 20
BLOB_CHARACTERS = 20_000  # 20 rows of it: a part of about 400 KB, uncompressed; few rows keep the runs short


def write_big_job(directory: Path, model: Path, output_path: Path, count: int = 3 * ROWS_PER_PART) -> Path:
    """A job whose parts are big: each row keeps a column of random text, and parts are not compressed."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = random.Random(7)
    data = [{**row, "blob": "".join(generator.choices("0123456789abcdef", k=BLOB_CHARACTERS))}
            for row in rows(count)]
    jobs.write_rows(directory / "rows.jsonl", data)
    job = jobs.job_manifest(directory, model, dataset={"keep_columns": ["id", "blob"]},
                            batching={"max_tokens": 4096, "max_batch_size": 64},
                            output={"path": output_path, "rows_per_part": ROWS_PER_PART, "compression": "none"},
                            errors=None)
    return jobs.write_manifest(directory / "job.yaml", job)


def committed(directory: Path) -> dict[str, int]:
    """{part file: rows} of every part in `directory`, each read whole (a partial one would fail here)."""
    return {name: pq.read_table(directory / name).num_rows for name in listing(directory) if name.startswith("part-")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models) -> pd.DataFrame:
    """The rows of an uninterrupted run of the big job."""
    directory = tmp_path_factory.mktemp("reference")
    assert run_cli(["run", str(write_big_job(directory, tiny_models.text_classifier, directory / "out")),
                    "--no-progress"]) == 0
    return pd.read_parquet(directory / "out")


def test_a_run_whose_part_write_fails_exits_1_plainly_and_a_rerun_finishes_it(tmp_path, tiny_models, reference,
                                                                                monkeypatch, capsys):
    """In process, on every machine: the third part's write meets a full disk."""
    job = write_big_job(tmp_path / "job", tiny_models.text_classifier, tmp_path / "out")
    real_open = builtins.open

    def filling(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FillsUp(file, 100_000) if f".{part_name(2)}.tmp-" in str(path) else file

    monkeypatch.setattr(store_module, "open", filling, raising=False)
    assert run_cli(["run", str(job), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert plain(err)
    assert (f"error: cannot write {part_name(2)} in {tmp_path / 'out'}: No space left on device (errno 28); "
            f"committed parts are kept: free space, {RERUN}") in err
    assert committed(tmp_path / "out") == {part_name(0): ROWS_PER_PART, part_name(1): ROWS_PER_PART}
    assert not [name for name in listing(tmp_path / "out") if ".tmp-" in name]
    monkeypatch.undo()
    assert run_cli(["run", str(job), "--no-progress"]) == 0
    assert pd.read_parquet(tmp_path / "out").equals(reference)


def test_a_run_whose_output_path_is_a_file_exits_2(tmp_path, tiny_models, capsys):
    file = tmp_path / "results.parquet"
    file.write_bytes(b"somebody's file")
    job = write_big_job(tmp_path / "job", tiny_models.text_classifier, file, count=4)
    assert run_cli(["run", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert plain(err) and f"error: output.path {file} is a file, not a directory" in err
    assert file.read_bytes() == b"somebody's file"


# --- runs on real filesystems that fail, in a namespace of their own ---------------------------------------------


@pytest.fixture(scope="module")
def own_mounts(tmp_path_factory) -> None:
    """Skips where this user may not mount a tmpfs in a new user and mount namespace (containers often forbid it)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command to mount a tmpfs with")
    point = tmp_path_factory.mktemp("probe")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            'mount -t tmpfs -o size=64k tmpfs "$1" && touch "$1/x"', "sh", str(point)],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare or mount is not permitted here: {probe.stderr.strip()}")


def in_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """`script` run by sh in a user and mount namespace of its own, where it may mount; batchrun as `$BATCHRUN`."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": python_path, "BATCHRUN": f"{sys.executable} -m pipeline_core"}
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, cwd=ROOT, env=environment, timeout=300)


FILLS_UP = """
set -u
mount -t tmpfs -o size=1m tmpfs "$1" || exit 90
$BATCHRUN run "$2" --no-progress 2> "$3/failed.log"; echo $? > "$3/failed.rc"
cp -a "$1/out" "$3/after-failure"
mount -o remount,size=64m "$1"
$BATCHRUN run "$2" --no-progress 2> "$3/rerun.log"; echo $? > "$3/rerun.rc"
cp -a "$1/out" "$3/finished"
"""


def test_a_disk_that_fills_mid_run_exits_1_plainly_and_a_rerun_after_freeing_space_finishes(own_mounts, tmp_path,
                                                                                             tiny_models, reference):
    """A 1 MiB tmpfs holds two parts of about 400 KB; the third does not fit until the tmpfs grows."""
    mount, logs = tmp_path / "mnt", tmp_path / "logs"
    mount.mkdir()
    logs.mkdir()
    job = write_big_job(tmp_path / "job", tiny_models.text_classifier, mount / "out")
    result = in_namespace(FILLS_UP, str(mount), str(job), str(logs))
    assert result.returncode == 0, result.stderr
    failed = (logs / "failed.log").read_text()
    assert (logs / "failed.rc").read_text().strip() == "1", failed
    assert plain(failed) and "No space left on device (errno 28); committed parts are kept: free space" in failed
    assert f"\nerror: cannot write part-000002.parquet in {mount / 'out'}: No space left on device" in failed
    assert committed(logs / "after-failure") == {part_name(0): ROWS_PER_PART, part_name(1): ROWS_PER_PART}
    assert not [name for name in listing(logs / "after-failure") if ".tmp-" in name]
    assert (logs / "rerun.rc").read_text().strip() == "0", (logs / "rerun.log").read_text()
    assert "2 parts already committed" in (logs / "rerun.log").read_text()
    assert pd.read_parquet(logs / "finished").equals(reference)


READ_ONLY = """
mount -t tmpfs -o ro tmpfs "$1" || exit 90
exec $BATCHRUN run "$2" --no-progress
"""


def test_a_read_only_output_exits_1_naming_the_read_only_file_system(own_mounts, tmp_path, tiny_models):
    mount = tmp_path / "mnt"
    mount.mkdir()
    job = write_big_job(tmp_path / "job", tiny_models.text_classifier, mount, count=4)
    result = in_namespace(READ_ONLY, str(mount), str(job))
    assert result.returncode == 1, result.stderr
    assert plain(result.stderr)
    assert result.stderr.endswith(f"error: cannot write _batchrun.json in {mount}: Read-only file system (errno 30); "
                                  f"committed parts are kept: make it writable, {RERUN}\n")
