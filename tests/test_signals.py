"""SIGTERM and SIGINT: the first asks the run to stop after the current batch, a second stops at once (exit 75).

The signals are real (os.kill of this process); Python runs their handlers in the main thread, where pytest runs
the tests. Each test first installs handlers of its own, so a StopOnSignals that failed to install its handler
records the signal there instead of killing or aborting the test session.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

import pipeline_core.runner
from pipeline_core.cli import run_cli
from pipeline_core.signals import StopOnSignals


@pytest.fixture
def own_handlers():
    """{signum: signals received} while handlers of the test's own are installed for SIGTERM and SIGINT."""
    received = {signal.SIGTERM: [], signal.SIGINT: []}
    previous = {signum: signal.signal(signum, lambda number, _frame: received[number].append(number))
                for signum in received}
    yield received
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # os.kill runs the handler of a signal sent to this process before it returns


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_first_signal_asks_to_stop_and_the_second_stops_at_once(own_handlers, signum):
    with StopOnSignals() as flag:
        assert not flag.requested
        send(signum)
        assert flag.requested and flag.signal_name == signal.Signals(signum).name
        with pytest.raises(KeyboardInterrupt):
            send(signum)
        assert flag.signal_name == signal.Signals(signum).name
    assert own_handlers == {signal.SIGTERM: [], signal.SIGINT: []}  # StopOnSignals took both signals


def test_a_sigint_after_a_sigterm_also_stops_at_once(own_handlers):
    with StopOnSignals() as flag:
        send(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGINT)
    assert flag.signal_name == "SIGTERM"


def test_the_previous_handlers_come_back_on_leaving(own_handlers):
    before = {signum: signal.getsignal(signum) for signum in own_handlers}
    with StopOnSignals():
        assert all(signal.getsignal(signum) is not handler for signum, handler in before.items())
    assert {signum: signal.getsignal(signum) for signum in own_handlers} == before
    with pytest.raises(KeyboardInterrupt), StopOnSignals():  # also when the second signal ends the block
        send(signal.SIGINT)
        send(signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in own_handlers} == before
    send(signal.SIGTERM)
    assert own_handlers[signal.SIGTERM] == [signal.SIGTERM]


def test_outside_the_main_thread_nothing_is_installed(own_handlers):
    before = {signum: signal.getsignal(signum) for signum in own_handlers}
    seen = []

    def enter():
        with StopOnSignals() as flag:  # signal.signal would raise ValueError here
            seen.append({signum: signal.getsignal(signum) for signum in own_handlers})
            seen.append(flag.requested)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [before, False]


def test_a_second_signal_during_a_run_exits_75_at_once(tmp_path, tiny_models, monkeypatch, capsys, own_handlers):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {index}"}) + "\n" for index in range(4)))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"task: feature-extraction\nmodel: {{name: '{tiny_models.embedder}'}}\n"
        f"dataset: {{path: json, data_files: '{data}'}}\nbatching: {{num_workers: 0}}\n"
        f"output: {{path: '{tmp_path / 'out'}', rows_per_part: 2}}\n"
    )
    initialize = pipeline_core.runner.initialize

    def initialize_then_two_signals(job):
        pipeline = initialize(job)
        send(signal.SIGTERM)  # asks to stop: the run would end before its first part, exit 75
        send(signal.SIGTERM)  # stops at once, from inside the run
        return pipeline  # reached only if the second signal was ignored: the run then ends as after one

    monkeypatch.setattr(pipeline_core.runner, "initialize", initialize_then_two_signals)
    before = {signum: signal.getsignal(signum) for signum in own_handlers}
    assert run_cli(["run", str(job), "--no-progress"]) == 75
    err = capsys.readouterr().err
    assert "SIGTERM received" in err and err.splitlines()[-1] == "interrupted"
    assert "stopped by SIGTERM" not in err and "Traceback" not in err  # not the first signal's orderly stop
    # stopped while the model loaded: the run info made before it, and this process's record, stopped; no part,
    # no claim
    names = sorted(path.name for path in Path(tmp_path / "out").iterdir())
    assert len(names) == 2 and names[1] == "_batchrun.json" and names[0].startswith(".worker-")
    assert json.loads((tmp_path / "out" / names[0]).read_text())["state"] == "stopped"
    info = json.loads((tmp_path / "out" / "_batchrun.json").read_text())
    assert list(info) == ["fingerprint", "identity", "started"]
    assert own_handlers == {signal.SIGTERM: [], signal.SIGINT: []}
    assert {signum: signal.getsignal(signum) for signum in own_handlers} == before  # the run put them back
