"""OUTPUT and data files on S3, against a real S3 server: moto's standalone server on loopback, started for this
module (never a mocked client). Exclusive create, a run equal to a local run, data files read from s3://, kill -9
and resume, a server cut off mid-upload, a missing extra, and secrets kept out of what is written.

The server-cut test puts a loopback TCP relay between batchrun and moto and closes it while a part's upload is in
flight (moto keeps its buckets in memory, so stopping moto itself would lose them); moto's own port then shows
what the store holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs import edit_job, output, read_manifest, rows, run, start, write_job, write_manifest
from pipeline_core.cli import run_cli
from pipeline_core.output.fsspec_store import FsspecStore
from pipeline_core.output.store import LocalStore
from pipeline_core.output.stores import open_store

s3fs = pytest.importorskip("s3fs")
GENERATION = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
SECRET = "s3cr3t-Never-Written-4f9a"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server on a free loopback port, for this module; its endpoint URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(autouse=True)
def aws_environment(moto, monkeypatch):
    """Credentials and the endpoint as a user sets them, and nothing from this machine's own AWS setup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "/nonexistent")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def moto_fs(moto: str):
    """A client straight to moto's port, bypassing batchrun and any relay: what the store really holds."""
    return s3fs.S3FileSystem(endpoint_url=moto, key="testing", secret="testing", skip_instance_cache=True,
                             use_listings_cache=False)


@pytest.fixture
def bucket(moto) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    moto_fs(moto).mkdir(name)
    return name


def listing(fs, prefix: str) -> list[str]:
    try:
        return sorted(path.rsplit("/", 1)[1] for path in fs.ls(prefix, refresh=True))
    except FileNotFoundError:
        return []


def read_s3(moto: str, url: str) -> pd.DataFrame:
    return pd.read_parquet(url, storage_options={"endpoint_url": moto, "key": "testing", "secret": "testing"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """An uninterrupted local run of the generation job the S3 runs repeat: 24 rows in 6 parts."""
    job = write_job(tmp_path_factory.mktemp("local"), tiny_models.causal_lm, rows(24), task="text-generation",
                    model={"generation": GENERATION})
    assert run(job) == 0
    return job, output(job)


def s3_job(tmp_path: Path, reference_job: Path, **settings) -> Path:
    """The reference job, reading the very same file, with the output section given as `settings`."""
    return write_manifest(tmp_path / "job.yaml", {**read_manifest(reference_job), "output": settings})


# --- the store ---------------------------------------------------------------------------------------------------


def test_create_is_exclusive_on_s3_and_the_store_keeps_local_semantics(moto, bucket):
    """Two stores (two clients, as two processes have) create one name: exactly one wins, and the object holds the
    winner's bytes. moto honours If-None-Match: * (412 for the second)."""
    url = f"s3://{bucket}/out"
    first, second = open_store(url), open_store(url)
    assert isinstance(first, FsspecStore)
    assert [first.create(".claim-000000.0", b"first"), second.create(".claim-000000.0", b"second")] == [True, False]
    assert second.get(".claim-000000.0") == b"first"
    assert second.create(".claim-000000.1", b"next generation") is True
    # every listing is fresh: another client's object is seen at once, whatever was listed before
    assert second.names() == [".claim-000000.0", ".claim-000000.1"]
    first.put("part-000000.parquet", b"old")
    assert second.names() == [".claim-000000.0", ".claim-000000.1", "part-000000.parquet"]
    second.put("part-000000.parquet", b"new")
    assert first.get("part-000000.parquet") == b"new"
    with first.open("part-000000.parquet") as file:
        assert file.read() == b"new"
    assert first.exists("part-000000.parquet") and not first.exists("part-000001.parquet")
    assert 0.0 <= first.age("part-000000.parquet") < 30.0
    first.remove(".claim-000000.0")
    first.remove(".claim-000000.0")  # gone already: fine, as locally
    assert second.names() == [".claim-000000.1", "part-000000.parquet"]
    assert (first.get("nothing"), first.age("nothing"), open_store(f"s3://{bucket}/empty").names()) == (None, 0.0, [])
    with pytest.raises(FileNotFoundError):
        first.open("nothing")
    # plain paths and file:// stay local
    assert isinstance(open_store("/tmp/x"), LocalStore) and str(open_store("file:///tmp/x")) == "/tmp/x"


def test_missing_credentials_or_bucket_exit_2_and_a_dead_server_exits_1_within_seconds(tmp_path, tiny_models,
                                                                                        monkeypatch, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(4))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert run(job, "--output", "s3://anything/out") == 2
    err = capsys.readouterr().err
    assert "no usable credentials" in err and "AWS_ACCESS_KEY_ID" in err and "output.storage_options" in err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert run(job, "--output", "s3://no-such-bucket/out") == 2
    assert "the bucket no-such-bucket does not exist" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    assert run(job, "--output", "s3://anything/out") == 1
    err = capsys.readouterr().err
    assert time.monotonic() - started < 30
    assert err.startswith("error: cannot list s3://anything/out: Could not connect to the endpoint URL")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- runs --------------------------------------------------------------------------------------------------------


def test_a_run_into_s3_equals_a_local_run_and_writes_no_secret(tmp_path, moto, bucket, reference, capfd):
    """Credentials from output.storage_options alone (the environment's are removed): the parts equal the local
    run's, byte for byte (same fingerprint: storage_options and output.path are not part of the identity), the run
    ends with _SUCCESS and nothing else, `status` reads it, and the secret is in no file and no log line. Then the
    rest of a run directory's life: a finished rerun, another job refused, --fresh."""
    reference_job, expected = reference
    url = f"s3://{bucket}/out"
    job = s3_job(tmp_path, reference_job, path=url, rows_per_part=4,
                 storage_options={"key": "testing", "secret": SECRET, "endpoint_url": moto})
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            patch.delenv(name)
        assert run(job) == 0
    fs = moto_fs(moto)
    parts = [f"part-{index:06d}.parquet" for index in range(6)]
    metrics = [f"_metrics-{index:06d}.json" for index in range(6)]
    assert listing(fs, f"{bucket}/out") == ["_SUCCESS", "_batchrun.json", *metrics, "_progress.json", *parts]
    pd.testing.assert_frame_equal(read_s3(moto, url), expected)
    local = reference_job.parent / "out"
    assert all(fs.cat(f"{bucket}/out/{part}") == (local / part).read_bytes() for part in parts)
    info = json.loads(fs.cat(f"{bucket}/out/_batchrun.json"))
    assert info["fingerprint"] == json.loads((local / "_batchrun.json").read_text())["fingerprint"]
    assert info["manifest"]["output"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>",
                                                             "endpoint_url": "<redacted>"}
    written = b"".join(fs.cat(f"{bucket}/out/{name}") for name in ("_batchrun.json", "_progress.json", "_SUCCESS"))
    captured = capfd.readouterr()
    assert SECRET.encode() not in written and SECRET not in captured.err + captured.out
    assert run_cli(["status", url, "--json"]) == 0  # credentials and endpoint from the environment
    status = json.loads(capfd.readouterr().out)
    assert (status["complete"], status["parts_done"], status["rows_done"], status["failed_rows"]) == (True, 6, 24, 0)
    assert run(job) == 0  # finished: nothing to do
    assert "already holds this finished run" in capfd.readouterr().err
    fs.rm(f"{bucket}/out/part-000002.parquet")  # lost after the run finished: found by one listing of S3
    assert run_cli(["status", url, "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["complete"] is False
    assert run(job) == 0
    assert "computed 1 parts (4 rows) here" in capfd.readouterr().err
    assert fs.cat(f"{bucket}/out/part-000002.parquet") == (local / "part-000002.parquet").read_bytes()
    assert fs.exists(f"{bucket}/out/_SUCCESS")
    assert run(job, "--set", "output.rows_per_part=3") == 2  # another job's identity: refused, naming the key
    assert "output.rows_per_part: 4 -> 3" in capfd.readouterr().err
    fs.pipe(f"{bucket}/out/part-000009.parquet", b"a stray part")
    assert run(job, "--fresh") == 0  # discards everything of the run, the stray part too, and starts over
    assert listing(fs, f"{bucket}/out") == ["_SUCCESS", "_batchrun.json", *metrics, "_progress.json", *parts]
    pd.testing.assert_frame_equal(read_s3(moto, url), expected)


@pytest.mark.parametrize("builder", ["parquet", "json"])
def test_data_files_on_s3_with_dataset_storage_options(tmp_path, moto, bucket, reference, builder, monkeypatch):
    """s3:// data_files read with dataset.storage_options only (no credentials in the environment): as Parquet by
    row group (batchrun's reader) and as JSON lines (datasets' reader); the output equals the local run's, and the
    input's ETag is part of the run's identity."""
    reference_job, expected = reference
    fs = moto_fs(moto)
    data = [json.loads(line) for line in (reference_job.parent / "rows.jsonl").read_text().splitlines()]
    if builder == "parquet":
        frame = pd.DataFrame(data)
        fs.pipe(f"{bucket}/in/a.parquet", frame.iloc[:10].to_parquet(index=False, row_group_size=4))
        fs.pipe(f"{bucket}/in/b.parquet", frame.iloc[10:].to_parquet(index=False, row_group_size=4))
    else:
        lines = [json.dumps(row) + "\n" for row in data]
        fs.pipe(f"{bucket}/in/a.jsonl", "".join(lines[:10]).encode())
        fs.pipe(f"{bucket}/in/b.jsonl", "".join(lines[10:]).encode())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    pattern = f"s3://{bucket}/in/*.{'parquet' if builder == 'parquet' else 'jsonl'}"
    job = s3_job(tmp_path, reference_job, path=str(tmp_path / "out"), rows_per_part=4)
    options = json.dumps({"key": "testing", "secret": SECRET, "endpoint_url": moto})
    assert run(job, "--set", f"dataset.path={builder}", "--set", f"dataset.data_files={pattern}",
               "--set", f"dataset.storage_options={options}") == 0
    pd.testing.assert_frame_equal(output(job), expected)
    info = json.loads((tmp_path / "out" / "_batchrun.json").read_text())
    files = info["identity"]["input.resolved"]["files"]
    assert sorted(files) == [pattern.replace("*", "a"), pattern.replace("*", "b")]
    assert all(summary["etag"] for summary in files.values())
    assert SECRET not in (tmp_path / "out" / "_batchrun.json").read_text()


def test_kill_9_mid_run_then_resume_keeps_the_committed_parts(tmp_path, moto, bucket, reference):
    """The run (with a DataLoader worker, which claims parts through its own client) is killed as soon as its first
    part object appears; the rerun uploads only the parts that were missing and ends equal to the local run."""
    reference_job, expected = reference
    url = f"s3://{bucket}/out"
    job = s3_job(tmp_path, reference_job, path=url, rows_per_part=4)
    edit_job(job, batching={"num_workers": 1})
    fs = moto_fs(moto)
    with open(tmp_path / "killed.log", "w") as log:
        process = start(job, stderr=log)
    deadline = time.monotonic() + 120
    while not [name for name in listing(fs, f"{bucket}/out") if name.startswith("part-")]:
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "no part within 120 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = {name: fs.info(f"{bucket}/out/{name}")["ETag"] for name in listing(fs, f"{bucket}/out")
            if name.startswith("part-")}
    assert process.returncode == -signal.SIGKILL and 1 <= len(kept) < 6
    assert "_SUCCESS" not in listing(fs, f"{bucket}/out")
    with Relay(moto) as relay:  # the rerun goes through the relay, which records every request
        assert run(job, "--set", f"output.storage_options={{endpoint_url: '{relay.url}'}}") == 0
    uploaded = {path.rsplit("/", 1)[1] for method, path in relay.requests if method == "PUT" and "/part-" in path}
    assert uploaded == {f"part-{index:06d}.parquet" for index in range(6)} - set(kept)
    pd.testing.assert_frame_equal(read_s3(moto, url), expected)
    assert {name: fs.info(f"{bucket}/out/{name}")["ETag"] for name in kept} == kept
    assert not [name for name in listing(fs, f"{bucket}/out") if name.startswith(".")]  # claims, records gone


def test_server_cut_off_mid_upload_exits_1_leaves_nothing_partial_and_the_rerun_completes(tmp_path, moto, bucket,
                                                                                          reference, capfd):
    reference_job, expected = reference
    url = f"s3://{bucket}/out"
    fs = moto_fs(moto)
    with Relay(moto, cut_on=f"PUT /{bucket}/out/part-000002.parquet") as relay:
        job = s3_job(tmp_path, reference_job, path=url, rows_per_part=4, storage_options={"endpoint_url": relay.url})
        started = time.monotonic()
        assert run(job) == 1
        assert relay.was_cut.is_set()
        took = time.monotonic() - started
        err = capfd.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: cannot write part-000002.parquet in {url}: Could not connect to the endpoint URL: "
                          f'"{relay.url}/{bucket}/out/part-000002.parquet"; committed parts are kept: check that '
                          "the store is reachable, then rerun the same command to resume"], err
        assert "Traceback" not in err and "internal error" not in err and took < 60
        # through moto's own port: the two committed parts, whole, and no part-000002 at all (moto saw half a body)
        names = listing(fs, f"{bucket}/out")
        # part 2's metrics are written just before its upload, and count only once the part is committed
        assert [name for name in names if not name.startswith(".") and name != "_metrics-000002.json"] == [
            "_batchrun.json", "_metrics-000000.json", "_metrics-000001.json", "_progress.json",
            "part-000000.parquet", "part-000001.parquet"]
        assert all(name.startswith((".claim-", ".worker-")) for name in names if name.startswith("."))  # no temporary
        for name in ("part-000000.parquet", "part-000001.parquet"):
            assert pq.read_table(fs.open(f"{bucket}/out/{name}")).num_rows == 4
        relay.restart()
        assert run(job) == 0
    pd.testing.assert_frame_equal(read_s3(moto, url), expected)
    assert not [request for request in relay.requests[relay.cut_at:]
                if request[0] == "PUT" and re.search(r"part-00000[01]", request[1])]


def test_another_fsspec_filesystem_writes_a_temporary_then_moves_it_and_the_run_warns(tmp_path, tiny_models,
                                                                                       capfd):
    """memory:// stands for filesystems without an exclusive create (sftp, hdfs): the same methods, a put through a
    hidden temporary, a create that checks first, and a run that says only one process may write there."""
    import fsspec

    memory = fsspec.filesystem("memory")
    store = open_store("memory://batchrun-test/out")
    assert isinstance(store, FsspecStore) and not store.exclusive_create
    moves = []
    real_mv = store.fs.mv
    store.fs.mv = lambda source, target, **kwargs: (moves.append((source, target)), real_mv(source, target))
    store.put("part-000000.parquet", b"whole")
    [(source, target)] = moves
    assert source.rsplit("/", 1)[1].startswith(".part-000000.parquet.tmp-") and target.endswith("/part-000000.parquet")
    assert [store.create("_SUCCESS", b""), store.create("_SUCCESS", b"")] == [True, False]
    assert store.names() == ["_SUCCESS", "part-000000.parquet"] and 0.0 <= store.age("_SUCCESS") < 30
    job = write_job(tmp_path, tiny_models.text_classifier, rows(6))
    assert run(job, "--output", "memory://batchrun-test/run") == 0
    assert "has no exclusive create" in capfd.readouterr().err
    assert sorted(path.rsplit("/", 1)[1] for path in memory.ls("/batchrun-test/run", detail=False)) == [
        "_SUCCESS", "_batchrun.json", "_metrics-000000.json", "_metrics-000001.json", "_progress.json",
        "part-000000.parquet", "part-000001.parquet"]
    memory.rm("/batchrun-test", recursive=True)


# --- missing extras and messages -----------------------------------------------------------------------------------


def test_a_missing_extra_names_it_and_exits_2(tmp_path, tiny_models, monkeypatch, capsys):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(4))
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` fails, as where the extra is not installed
    assert run(job, "--output", "s3://bucket/out") == 2
    assert capsys.readouterr().err == 'error: output.path s3://bucket/out needs the s3fs package: ' \
                                      'pip install "batchrun[s3]"\n'
    assert run(job, "--set", "dataset.path=parquet", "--set", "dataset.data_files=s3://bucket/in/*.parquet") == 2
    assert capsys.readouterr().err == 'error: dataset.data_files s3://bucket/in/*.parquet needs the s3fs package: ' \
                                      'pip install "batchrun[s3]"\n'
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    assert run(job, "--output", "gs://bucket/out") == 2
    assert capsys.readouterr().err.endswith('needs the gcsfs package: pip install "batchrun[gcs]"\n')
    assert not (tmp_path / "out").exists()


# --- the relay ---------------------------------------------------------------------------------------------------


class Relay:
    """A loopback TCP relay to moto: records each request's method and path and, given `cut_on` (the start of a
    request line), cuts everything while that request is in flight: half of its bytes reach moto, then every
    connection is closed and nothing listens any more, as when a server goes away mid-upload."""

    def __init__(self, moto: str, cut_on: str | None = None):
        self.target = int(moto.rsplit(":", 1)[1])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut_on = cut_on.encode() if cut_on else None
        self.requests: list[tuple[str, str]] = []
        self.was_cut = threading.Event()
        self.cut_at = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Relay:
        self._listen()
        return self

    def __exit__(self, *exc_info):
        self.cut()

    def restart(self) -> None:
        self.cut_on, self.cut_at = None, len(self.requests)
        self._listen()

    def _listen(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if requests:
                for method, path in re.findall(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.1\r\n", data):
                    self.requests.append((method.decode(), path.decode().split("?")[0]))
                if self.cut_on and self.cut_on in data:
                    sink.sendall(data[:len(data) // 2])
                    self.cut()
                    return
            try:
                sink.sendall(data)
            except OSError:
                break
        for end in (source, sink):
            _close(end)

    def cut(self) -> None:
        self.listener.close()
        with self._lock:
            for end in self.sockets:
                _close(end)
        self.was_cut.set()


def _close(end: socket.socket) -> None:
    try:
        end.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    end.close()


def test_the_inputs_files_on_s3_are_listed_afresh_for_each_provenance(moto, bucket):
    """A rerun's provenance must see files changed since the last one listed them: a cached filesystem instance
    would answer from its earlier listing."""
    from pipeline_core.identity.provenance import remote_files

    options = {"endpoint_url": moto, "key": "testing", "secret": "testing"}
    fs = moto_fs(moto)
    fs.pipe(f"{bucket}/in/day.jsonl", b'{"text": "a"}\n')
    first = remote_files([f"s3://{bucket}/in/*.jsonl"], options)
    fs.pipe(f"{bucket}/in/day.jsonl", b'{"text": "a longer row"}\n')
    fs.pipe(f"{bucket}/in/night.jsonl", b'{"text": "b"}\n')
    second = remote_files([f"s3://{bucket}/in/*.jsonl"], options)
    assert [(name, summary["size"]) for name, summary in first.items()] == [(f"s3://{bucket}/in/day.jsonl", 14)]
    assert [(name, summary["size"]) for name, summary in second.items()] == [
        (f"s3://{bucket}/in/day.jsonl", 25), (f"s3://{bucket}/in/night.jsonl", 14)]
    # S3's ETag of a single-part upload is its MD5, given without the quotes S3 wraps it in; the time as text
    day = second[f"s3://{bucket}/in/day.jsonl"]
    assert day["etag"] == hashlib.md5(b'{"text": "a longer row"}\n').hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d.*", day["mtime"])
