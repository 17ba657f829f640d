"""Generation on a server (model.engine), against a real `transformers serve` on 127.0.0.1 with the tiny GPT-2: a
server batchrun starts and one given by URL, a loopback relay in front of it that fails the way servers fail, kill -9,
SIGTERM, a server killed mid-run, two shards, and the API key kept out of every file and log line. No mocks.

Greedy answers are compared with the in-process engine's on the same rows. One server serves the module's URL tests;
the tests that start their own (kill -9, SIGTERM, a killed server) start one each, about 20 s apiece here.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import jobs
from pipeline_core.cli import run_cli

TRANSFORMERS = str(Path(sys.executable).with_name("transformers"))
ROWS = jobs.sample_rows(24)
NEW_TOKENS = 12
SECRET = "sk-test-very-secret-0123456789"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(*extra: str) -> list[str]:
    return [TRANSFORMERS, "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}", *extra]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "transformers serve exited"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("transformers serve did not become healthy")


@pytest.fixture(scope="module")
def server(tiny_models):
    """One `transformers serve` of the tiny GPT-2 for the module's URL tests."""
    port = free_port()
    process = subprocess.Popen([TRANSFORMERS, "serve", str(tiny_models.causal_lm), "--host", "127.0.0.1", "--port",
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def write_generation_job(directory: Path, checkpoint, engine: dict | None, /, data=ROWS, **changes) -> Path:
    model_section = {"generation": {"max_new_tokens": NEW_TOKENS}, **({"engine": engine} if engine else {})}
    return jobs.write_job(directory, checkpoint, data, task="text-generation", rows_per_part=4,
                          model=jobs.merged(model_section, changes.pop("model", {})), **changes)


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> dict[str, str]:
    """{id: generated_text} of the in-process engine over ROWS."""
    job = write_generation_job(tmp_path_factory.mktemp("in-process"), tiny_models.causal_lm, None)
    assert jobs.run(job) == 0
    return answers(job)


def answers(job: Path) -> dict[str, str]:
    frame = jobs.output(job)
    assert frame["error"].isna().all(), frame["error"].dropna().tolist()
    return dict(zip(frame["id"], frame["generated_text"], strict=True))


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State"))
            except (OSError, StopIteration):
                continue
            if marker in command and "zombie" not in state:
                found.append(int(entry.name))
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def started_port(log: Path) -> int:
    """The port of the server batchrun started, from its log line."""
    wait_for(lambda: "starting the server:" in log.read_text(), 60, "batchrun did not start the server")
    line = next(line for line in log.read_text().splitlines() if "starting the server:" in line)
    return int(line.rsplit("--port ", 1)[1].split()[0])


def start_run(job: Path, log: Path, *args: str) -> subprocess.Popen:
    return jobs.start(job, *args, stderr=log.open("w"))


def committed(job: Path) -> list[Path]:
    return sorted((job.parent / "out").glob("part-*.parquet"))


class Relay:
    """A loopback relay in front of the server: it answers each request from a script of faults (`503`, `429`,
    `drop`, `stall`, `pass`), then passes requests through; `always` is the fault once the script is spent."""

    def __init__(self, upstream: str):
        self.upstream, self.script, self.always = upstream, [], "pass"
        self.seen: list[dict] = []  # per request to /v1/...completions: its headers
        self.retry_after = "0.2"
        self.active = self.peak = 0  # requests being passed through now, and the most at once
        self.lock = threading.Lock()
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                relay.seen.append(dict(self.headers))
                fault = relay.script.pop(0) if relay.script else relay.always
                if fault in ("503", "429"):
                    self._answer(int(fault), {"error": {"message": "busy"}}, {"Retry-After": relay.retry_after})
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif fault == "stall":
                    time.sleep(5)
                    self.close_connection = True
                else:
                    with relay.lock:
                        relay.active += 1
                        relay.peak = max(relay.peak, relay.active)
                    try:
                        self._forward(body)
                    finally:
                        with relay.lock:
                            relay.active -= 1

            def _forward(self, body):
                request = urllib.request.Request(relay.upstream + self.path, data=body,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        self._answer(answer.status, json.load(answer))
                except urllib.error.HTTPError as error:
                    self._answer(error.code, json.load(error))

            def _answer(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                    **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def relay(server):
    relay = Relay(server)
    yield relay
    relay.close()


def url_engine(url: str, **more) -> dict:
    return {"kind": "server", "url": url, **more}


# ---- the same answers as in process --------------------------------------------------------------------------

def test_a_started_server_answers_as_the_in_process_engine_and_is_gone_after_the_run(tmp_path, tiny_models,
                                                                                       reference, caplog,
                                                                                       monkeypatch):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, {"kind": "server", "command": serve_command()})
    monkeypatch.setenv("BATCHRUN_DEBUG", "1")  # the server's lines are debug lines
    assert jobs.run(job) == 0
    assert answers(job) == reference  # all 24 rows, greedy, equal
    line = next(record.getMessage() for record in caplog.records if "starting the server:" in record.getMessage())
    port = int(line.rsplit("--port ", 1)[1].split()[0])
    assert processes_with(f"--port {port}") == [] and port_is_free(port)
    assert any(record.getMessage().startswith("[server] ") and record.levelname == "DEBUG" for record in caplog.records)
    metrics = json.loads((tmp_path / "out" / "_metrics-000000.json").read_text())
    requests = metrics["requests"]
    assert requests["requests"] == 4 and requests["retries"] == 0
    assert requests["completion_tokens"] == 4 * NEW_TOKENS and requests["prompt_tokens"] > 0
    assert 0 < requests["latency_p50"] <= requests["latency_p90"] <= requests["latency_p99"]
    summary = next(record.getMessage() for record in caplog.records if record.getMessage().startswith("summary:"))
    assert "completion tokens/s" in summary
    info = json.loads((tmp_path / "out" / "_batchrun.json").read_text())
    assert info["engine"]["served_model"] == str(tiny_models.causal_lm)
    assert info["identity"]["model.engine"]["request"] == {"max_tokens": NEW_TOKENS, "temperature": 0}


def test_a_url_server_answers_as_the_in_process_engine_and_the_key_is_never_written(tmp_path, tiny_models, reference,
                                                                                      relay, monkeypatch, capsys):
    monkeypatch.setenv("BATCHRUN_TEST_KEY", SECRET)
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(
        relay.url, api_key="${BATCHRUN_TEST_KEY}", headers={"X-Team": SECRET[::-1]}, max_concurrency=8))
    assert run_cli(["run", str(job), "--no-progress", "--log-format", "json"]) == 0
    assert answers(job) == reference
    assert relay.seen and all(seen["Authorization"] == f"Bearer {SECRET}" for seen in relay.seen)  # it was sent
    logged = capsys.readouterr()
    for text in [logged.out, logged.err] + [path.read_bytes().decode(errors="replace")
                                            for path in (tmp_path / "out").iterdir()]:
        assert SECRET not in text and SECRET[::-1] not in text
    identity = json.loads((tmp_path / "out" / "_batchrun.json").read_text())["identity"]
    assert relay.url not in json.dumps(identity)
    assert identity["model.engine"]["served_model"] == str(tiny_models.causal_lm)


def test_the_chat_api_answers_as_the_in_process_chat_template(tmp_path, tiny_models, server):
    chat = {"chat_template": True, "prompt": "Continue: {text}"}
    in_process = write_generation_job(tmp_path / "in-process", tiny_models.causal_lm, None, data=ROWS[:8], model=chat)
    served = write_generation_job(tmp_path / "served", tiny_models.causal_lm, url_engine(server), data=ROWS[:8],
                                  model=chat)
    assert jobs.run(in_process) == 0 and jobs.run(served) == 0
    assert answers(served) == answers(in_process)
    assert json.loads((tmp_path / "served" / "out" / "_batchrun.json").read_text())["engine"]["api"] == "chat"


def test_the_url_and_credentials_are_not_the_identity_but_the_request_fields_are(tmp_path, tiny_models, server,
                                                                                  relay, capsys):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(server), data=ROWS[:4])
    assert jobs.run(job) == 0
    jobs.edit_job(job, model={"engine": {"url": relay.url, "api_key": "another"}})
    assert jobs.run(job) == 0  # the same job through another address: already finished
    capsys.readouterr()
    jobs.edit_job(job, model={"engine": {"request": {"seed": 7}}})
    assert jobs.run(job) == 2
    assert "model.engine" in capsys.readouterr().err


# ---- failures, sorted ------------------------------------------------------------------------------------------

def test_a_row_the_server_rejects_fails_alone_with_the_servers_message(tmp_path, tiny_models, reference, server):
    long_row = {"id": "long", "text": " ".join(["word"] * 900)}  # over the model's 512 positions
    data = [*ROWS[:3], long_row, *ROWS[3:8]]
    # a model the server alone has: no tokenizer here, so nothing is shortened and the server judges the length
    job = write_generation_job(tmp_path, "tiny-gpt2-on-the-server", url_engine(server), data=data)
    assert jobs.run(job) == 0
    frame = jobs.output(job).set_index("id")
    assert "HTTP 400" in frame.loc["long", "error"] and "512" in frame.loc["long", "error"]
    assert frame.drop("long")["error"].isna().all()
    assert dict(frame.drop("long")["generated_text"]) == {row["id"]: reference[row["id"]] for row in data
                                                         if row["id"] != "long"}


@pytest.mark.parametrize("faults", [["503", "503"], ["429", "429"], ["drop", "drop"], ["stall"]],
                         ids=["503", "429", "dropped", "stalled"])
def test_overload_and_lost_connections_are_retried(tmp_path, tiny_models, reference, relay, faults, caplog,
                                                   monkeypatch):
    relay.script, relay.retry_after = list(faults), "1.5" if faults[0] == "429" else "0.2"
    monkeypatch.setenv("BATCHRUN_DEBUG", "1")  # each retry is a debug line
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(
        relay.url, retries=3, request_timeout=2, max_concurrency=1), data=ROWS[:4])
    started = time.monotonic()
    assert jobs.run(job) == 0
    assert answers(job) == {row["id"]: reference[row["id"]] for row in ROWS[:4]}
    if faults[0] == "429":  # Retry-After, longer than the first retry's backoff (under 0.5 s), is honoured
        assert time.monotonic() - started >= float(relay.retry_after)
    assert json.loads((tmp_path / "out" / "_metrics-000000.json").read_text())["requests"]["retries"] == len(faults)
    assert sum("retry" in record.getMessage() for record in caplog.records) == len(faults)


def test_past_the_retries_the_run_exits_1_with_nothing_partial_committed(tmp_path, tiny_models, reference, relay,
                                                                        capsys):
    relay.script, relay.always = ["pass"] * 4, "503"  # the first part's four rows, then only 503s
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(relay.url, retries=2, max_concurrency=1),
                               data=ROWS[:12])
    assert jobs.run(job) == 1
    assert "after 2 retries" in capsys.readouterr().err
    assert [path.name for path in committed(job)] == ["part-000000.parquet"]
    assert pq.read_table(committed(job)[0]).column("error").null_count == 4
    relay.always = "pass"
    assert jobs.run(job) == 0
    assert answers(job) == {row["id"]: reference[row["id"]] for row in ROWS[:12]}


# ---- a server batchrun started: kill -9, SIGTERM, its death ------------------------------------------------------

def run_until_a_part_is_committed(tmp_path: Path, tiny_models):
    """`batchrun run` as a command with a server it starts, one request at a time (so the run lasts), once its first
    part is committed: (job, its log, the process, the server's port)."""
    job = write_generation_job(tmp_path, tiny_models.causal_lm,
                               {"kind": "server", "command": serve_command(), "max_concurrency": 1})
    log = tmp_path / "run.log"
    process = start_run(job, log)
    port = started_port(log)
    wait_for(lambda: committed(job), 120, "no part was committed")
    return job, log, process, port


def test_kill_9_of_batchrun_takes_its_server_down_and_a_rerun_completes(tmp_path, tiny_models, reference):
    job, _, process, port = run_until_a_part_is_committed(tmp_path, tiny_models)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    wait_for(lambda: not processes_with(f"--port {port}"), 30, "the server outlived batchrun")
    wait_for(lambda: port_is_free(port), 30, "the server's port is still taken")
    assert len(committed(job)) < 6, "the run finished before the kill: the test proves nothing"
    assert jobs.run(job) == 0
    assert answers(job) == reference


def test_sigterm_stops_sending_commits_whole_parts_stops_the_server_and_exits_75(tmp_path, tiny_models, reference):
    job, _, process, port = run_until_a_part_is_committed(tmp_path, tiny_models)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 75
    assert not processes_with(f"--port {port}") and port_is_free(port)
    parts = committed(job)
    assert 0 < len(parts) < 6
    for part in parts:  # every committed part whole, no row failed by the stop
        table = pq.read_table(part)
        assert table.num_rows == 4 and table.column("error").null_count == 4
    assert jobs.run(job) == 0
    assert answers(job) == reference


def test_a_server_that_dies_mid_run_is_started_again_and_the_output_is_the_same(tmp_path, tiny_models, reference):
    job, log, process, port = run_until_a_part_is_committed(tmp_path, tiny_models)
    for pid in processes_with(f"serve {tiny_models.causal_lm} --host 127.0.0.1 --port {port}"):
        os.kill(pid, signal.SIGKILL)
    assert process.wait(300) == 0, log.read_text()[-3000:]
    assert "starting it again" in log.read_text()
    assert answers(job) == reference
    assert not processes_with(f"--port {port}")


def test_two_shards_at_once_share_one_url(tmp_path, tiny_models, reference, server):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(server, max_concurrency=4))
    shards = [jobs.start(job, "--num-shards", "2", "--shard-index", str(index)) for index in range(2)]
    assert [shard.wait(300) for shard in shards] == [0, 0]
    assert answers(job) == reference
    assert (tmp_path / "out" / "_SUCCESS").exists()


# ---- found before OUTPUT: exit 2, or exit 1 for a server that will not start -----------------------------------

def test_a_missing_server_program_exits_2_naming_the_package_before_output(tmp_path, tiny_models, capsys):
    for kind, package in (("vllm", "pip install vllm"), ("sglang", "pip install 'sglang[all]'")):
        job = write_generation_job(tmp_path / kind, tiny_models.causal_lm, {"kind": kind})
        assert jobs.run(job) == 2
        assert package in capsys.readouterr().err
        assert run_cli(["plan", str(job)]) == 2
        assert not (tmp_path / kind / "out").exists()


def test_what_a_server_engine_cannot_serve_exits_2_before_output(tmp_path, tiny_models, server, capsys):
    seq2seq = jobs.write_job(tmp_path / "seq2seq", tiny_models.seq2seq, ROWS[:2], task="summarization",
                             model={"engine": url_engine(server)})
    assert jobs.run(seq2seq) == 2
    assert "sequence-to-sequence" in capsys.readouterr().err
    beams = write_generation_job(tmp_path / "beams", tiny_models.causal_lm, url_engine(server),
                                 model={"generation": {"num_beams": 2}})
    assert jobs.run(beams) == 2
    assert "model.generation.num_beams" in capsys.readouterr().err
    classifier = jobs.write_job(tmp_path / "classify", tiny_models.text_classifier, ROWS[:2],
                                model={"engine": url_engine(server)})
    assert jobs.run(classifier) == 2
    assert "model.engine.kind server serves text-generation and summarization" in capsys.readouterr().err
    nowhere = write_generation_job(tmp_path / "nowhere", tiny_models.causal_lm,
                                   url_engine(f"http://127.0.0.1:{free_port()}"))
    # a server that does not answer may be restarting: a run exits 1 (a scheduler retries); plan says the job is wrong
    assert jobs.run(nowhere) == 1 and run_cli(["plan", str(nowhere)]) == 2
    assert capsys.readouterr().err.count("no OpenAI-compatible server answers") == 2
    assert not any((tmp_path / name / "out").exists() for name in ("seq2seq", "beams", "classify", "nowhere"))


def test_plan_shows_the_engine_and_checks_a_url_serves_the_model(tmp_path, tiny_models, server, capsys):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(server))
    assert run_cli(["plan", str(job), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["engine"]["served_model"] == str(tiny_models.causal_lm) and plan["engine"]["url"] == server
    assert plan["generation_config"] == {"max_tokens": NEW_TOKENS, "temperature": 0}
    started = write_generation_job(tmp_path / "started", tiny_models.causal_lm,
                                   {"kind": "server", "command": serve_command("--continuous-batching")})
    assert run_cli(["plan", str(started)]) == 0
    shown = capsys.readouterr().out
    assert "starts: " + TRANSFORMERS + " serve {model}" in shown and "--continuous-batching" in shown
    other = write_generation_job(tmp_path / "other", "some-other-model", url_engine(server))
    assert run_cli(["plan", str(other)]) == 0  # the server serves one model: that one is used


def test_a_server_that_exits_or_never_answers_fails_the_run_with_its_last_lines(tmp_path, tiny_models, capsys):
    exits = write_generation_job(tmp_path / "exits", tiny_models.causal_lm, {"kind": "server", "command": [
        sys.executable, "-c", "print('CUDA out of memory while loading'); raise SystemExit(3)"]})
    assert jobs.run(exits) == 1
    err = capsys.readouterr().err
    assert "exited with code 3" in err and "CUDA out of memory while loading" in err
    marker = f"never-healthy-{os.getpid()}"
    silent = write_generation_job(tmp_path / "silent", tiny_models.causal_lm, {
        "kind": "server", "startup_timeout": 2,
        "command": [sys.executable, "-c", f"import time; print('{marker}', flush=True); time.sleep(600)"]})
    assert jobs.run(silent) == 1
    err = capsys.readouterr().err
    assert "startup_timeout=2" in err and marker in err
    wait_for(lambda: not processes_with(f"print('{marker}'"), 30, "the server that never answered was left running")


def test_a_long_row_is_shortened_here_as_in_process_when_the_tokenizer_is_here(tmp_path, tiny_models, server):
    data = [*ROWS[:3], {"id": "long", "text": " ".join(["word"] * 900)}]  # over the model's 512 positions
    in_process = write_generation_job(tmp_path / "in-process", tiny_models.causal_lm, None, data=data)
    served = write_generation_job(tmp_path / "served", tiny_models.causal_lm, url_engine(server), data=data)
    assert jobs.run(in_process) == 0 and jobs.run(served) == 0
    assert answers(served) == answers(in_process)  # the long row answered, not rejected by the server
    metrics = json.loads((tmp_path / "served" / "out" / "_metrics-000000.json").read_text())
    assert metrics["truncated_rows"] == 1 and metrics["requests"]["prompt_tokens"] <= 4 * (512 - NEW_TOKENS)


def test_the_next_parts_requests_go_out_before_the_current_part_is_answered(tmp_path, tiny_models, reference, relay):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(relay.url, max_concurrency=16))
    assert jobs.run(job) == 0
    assert answers(job) == reference
    assert relay.peak > 4, "never more requests in flight than one part of 4 rows: the server idles between parts"


def torchrun(job: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "-m", "pipeline_core", "run",
            str(job), "--no-progress"]


def test_torchrun_ranks_share_one_url(tmp_path, tiny_models, reference, server):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, url_engine(server, max_concurrency=4))
    log = tmp_path / "ranks.log"
    process = subprocess.run(torchrun(job), cwd=jobs.ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                             timeout=300)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert answers(job) == reference
    ranks = {json.loads(path.read_text())["process"]["rank"] for path in (tmp_path / "out").glob("_metrics-*.json")}
    assert ranks == {0, 1}  # both ranks computed parts


@pytest.mark.slow
def test_each_torchrun_rank_starts_its_own_server_and_none_outlives_the_run(tmp_path, tiny_models, reference):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, {"kind": "server", "command": serve_command()})
    log = tmp_path / "ranks.log"
    process = subprocess.run(torchrun(job), cwd=jobs.ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                             timeout=600)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert answers(job) == reference
    ports = {int(line.rsplit("--port ", 1)[1].split()[0]) for line in log.read_text().splitlines()
             if "starting the server:" in line}
    assert len(ports) == 2  # one server a rank
    assert all(not processes_with(f"--port {port}") and port_is_free(port) for port in ports)


# A server that answers /health and /v1/models, then dies at its first request: a real process on a real port, so
# that the restart limit is reached in seconds rather than a `transformers serve` start each time. Its braces pass
# through the command untouched: only {port} and {model} are placeholders.
DYING_SERVER = """
import http.server, json, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": sys.argv[2]}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        print("dying at the first request", flush=True)
        os._exit(1)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_server_that_keeps_dying_stops_the_run_past_its_restarts_with_its_last_lines(tmp_path, tiny_models,
                                                                                       capsys):
    job = write_generation_job(tmp_path, tiny_models.causal_lm, {
        "kind": "server", "restarts": 1, "command": [sys.executable, "-c", DYING_SERVER, "{port}", "{model}"]},
        data=ROWS[:4])
    assert jobs.run(job) == 1
    err = capsys.readouterr().err
    assert "starting it again (0 restarts left)" in err and "model.engine.restarts is used up" in err
    assert "dying at the first request" in err
    assert committed(job) == []  # nothing partial: no part of "connection refused" rows
    assert not processes_with("dying at the first request")
