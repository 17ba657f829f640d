"""SIGTERM and SIGINT: the first asks the run to stop after the current batch, a second stops at once (exit 75).

The in-process tests send real signals to this process (os.kill); Python runs their handlers in the main thread,
where pytest runs the tests. Each test first installs handlers of its own, so a StopOnSignals that failed to install
its handler records the signal there instead of killing or aborting the test session.

The command's tests send real signals to `python -m pipeline_core run` processes they started: during the imports,
two in a row at gaps from 50 ms to 1 s (the second one often lands in the DataLoader teardown or the interpreter's
shutdown), and a Ctrl-C to the process group with DataLoader workers. Every one of them must end in exit 75.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import jobs
import pipeline_core.signals
from pipeline_core.cli import run_cli
from pipeline_core.engines import in_process
from pipeline_core.errors import EXIT_INTERRUPTED
from pipeline_core.signals import STOP_SIGNALS, ProcessGuard, StopOnSignals


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
    data = jobs.write_rows(tmp_path / "rows.jsonl", [{"text": f"row {index}"} for index in range(4)])
    job = jobs.write_manifest(tmp_path / "job.yaml", jobs.manifest(
        tiny_models.embedder, task="feature-extraction", dataset={"path": "json", "data_files": data},
        batching={"num_workers": 0}, output={"path": tmp_path / "out", "rows_per_part": 2}))
    initialize = in_process.initialize

    def initialize_then_two_signals(job, *more):
        pipeline = initialize(job, *more)
        send(signal.SIGTERM)  # asks to stop: the run would end before its first part, exit 75
        send(signal.SIGTERM)  # stops at once, from inside the run
        return pipeline  # reached only if the second signal was ignored: the run then ends as after one

    monkeypatch.setattr(in_process, "initialize", initialize_then_two_signals)
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


# The command's guard, in process: installed over the test's own handlers, which come back after each test.

@pytest.fixture
def guard(own_handlers, monkeypatch):
    """A ProcessGuard as entry.main installs it, for this test only."""
    guard = ProcessGuard()
    guard.install()
    monkeypatch.setattr(pipeline_core.signals, "_guard", guard)
    return guard


def test_the_guard_asks_once_stops_once_then_ignores(guard, caplog):
    send(signal.SIGTERM)
    assert guard.flag.signal_name == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        send(signal.SIGINT)
    send(signal.SIGTERM)  # a further KeyboardInterrupt would break the cleanup of the first
    send(signal.SIGINT)
    assert [record.getMessage() for record in caplog.records if record.levelname == "WARNING"] == [
        "SIGTERM received: finishing the current batch, then stopping (send it again to stop now)"]
    assert guard.flag.signal_name == "SIGTERM"


def test_once_the_command_has_its_result_signals_are_ignored_not_defaulted(guard):
    guard.finish()
    # SIG_IGN, not the default: the interpreter's shutdown would otherwise die of a late signal with 143 or 130
    assert [signal.getsignal(signum) for signum in STOP_SIGNALS] == [signal.SIG_IGN, signal.SIG_IGN]
    send(signal.SIGTERM)
    assert not guard.flag.requested


def test_under_the_guard_the_run_shares_its_flag_and_installs_nothing(guard):
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with StopOnSignals() as flag:
        assert flag is guard.flag
        assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == handlers
        send(signal.SIGTERM)
        assert flag.requested
    # leaving the run puts nothing back: the guard stays until the process exits
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == handlers


def test_a_forked_child_leaves_the_signals_to_the_command():
    # a DataLoader worker is forked with the command's handler and keeps it until its worker_init_fn runs: a
    # Ctrl-C to the process group then must not log the warning once per worker, nor stop anything in the worker
    script = (
        "import os, signal, sys\n"
        "from pipeline_core.signals import guard_process\n"
        "guard = guard_process()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os._exit(3 if guard.flag.requested else 0)\n"
        "_, status = os.waitpid(child, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status) or (4 if guard.flag.requested else 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=jobs.ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def test_the_entry_point_imports_neither_click_nor_torch():
    script = "import sys, pipeline_core.entry; print(sorted({'click', 'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], cwd=jobs.ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout == "[]\n", done.stderr


# The command: real signals to `python -m pipeline_core run` processes started here, and to nothing else.

CAUGHT_SIGTERM = 1 << (signal.SIGTERM - 1)  # its bit in the SigCgt mask of /proc/PID/status
ROWS = 400  # over a second of computing here: the run is still computing when the test's signals come
PAIRS = {"SIGTERM+SIGTERM": (signal.SIGTERM, signal.SIGTERM), "SIGINT+SIGINT": (signal.SIGINT, signal.SIGINT),
         "SIGTERM+SIGINT": (signal.SIGTERM, signal.SIGINT)}


class Command:
    """`python -m pipeline_core run JOB.yaml` in its own process group, its stderr read as it comes."""

    def __init__(self, job: Path):
        self.job = job
        self.process = jobs.start(job)
        self.lines: list[str] = []
        self.computing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if "first part to compute" in line:
                self.computing.set()

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)  # never to a reused pid: send_signal skips a process already waited for

    def wait_until_computing(self) -> None:
        deadline = time.monotonic() + 120
        while not self.computing.wait(0.05):
            assert self.process.poll() is None, f"the run ended before computing:\n{''.join(self.lines)}"
            assert time.monotonic() < deadline, "the run did not start computing within 120 s"

    def wait_until_sigterm_is_caught(self) -> None:
        """Until the command catches SIGTERM; fails where torch was loaded first (handlers installed too late)."""
        deadline = time.monotonic() + 60
        while True:
            # the memory map first: torch loaded there, and SIGTERM still not caught after, is no race
            torch_loaded = "libtorch" in Path(f"/proc/{self.process.pid}/maps").read_text()
            if caught(self.process.pid, CAUGHT_SIGTERM):
                return
            assert not torch_loaded, "torch was imported before the command caught SIGTERM"
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.lines)
            time.sleep(0.001)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code, "".join(self.lines)

    def stop(self) -> None:
        """A test that failed half-way leaves no run behind: its process group, workers included, is ours."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def caught(pid: int, mask: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16) & mask)


@pytest.fixture
def command(tmp_path, tiny_models, monkeypatch):
    """Starts commands over jobs of ROWS rows (one directory each) and stops those a failed test left running."""
    # one torch thread each: several commands share the 2 cores, and OpenMP threads spinning for their turn made
    # them wait on each other several times over
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started: list[Command] = []

    def start(name: str, workers: int = 0) -> Command:
        job = jobs.write_job(tmp_path / name, tiny_models.text_classifier, jobs.rows(ROWS), workers=workers)
        started.append(Command(job))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def concurrently(*calls):
    """The calls in threads at once, a command each: the 2-core machine runs two commands' imports side by side."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def assert_interrupted(code: int, err: str) -> None:
    """The invariant: a signal the command received ends in 75, without a traceback. A signal that came after the
    run had finished is ignored, and the run's own 0 stands."""
    assert "Traceback" not in err, err
    assert code == (EXIT_INTERRUPTED if " received: " in err else 0), err


def parts(job: Path) -> dict[str, list[dict]]:
    return {path.name: pq.read_table(path, columns=["row_id", "label", "score"]).to_pylist()
            for path in sorted((job.parent / "out").glob("part-*.parquet"))}


def test_sigterm_during_the_imports_exits_75_with_no_part(command):
    def sigterm_after(delay: float):
        run = command(f"after-{delay}")
        run.wait_until_sigterm_is_caught()
        time.sleep(delay)  # at once, then during click's, torch's and transformers' imports
        run.send(signal.SIGTERM)
        return run, *run.finish()

    for run, code, err in concurrently(*(lambda delay=delay: sigterm_after(delay) for delay in (0, 0.3, 1.0))):
        assert code == EXIT_INTERRUPTED and "SIGTERM received" in err and "Traceback" not in err, err
        assert not parts(run.job)


def two_signals(run: Command, pair: str, gap: float) -> tuple[int, str]:
    first, second = PAIRS[pair]
    run.wait_until_computing()
    run.send(first)
    time.sleep(gap)
    run.send(second)
    return run.finish()


def test_two_signals_exit_75_then_a_rerun_completes_equal_to_an_uninterrupted_run(command, tmp_path, tiny_models):
    interrupted = {(pair, gap): command(f"{pair}-{gap}") for pair, gap in
                   (("SIGINT+SIGINT", 0.3), ("SIGTERM+SIGTERM", 0.6), ("SIGTERM+SIGTERM", 1.0))}
    with ThreadPoolExecutor(len(interrupted)) as pool:
        signalled = [pool.submit(two_signals, run, *key) for key, run in interrupted.items()]
        # the uninterrupted run meanwhile, in this process: it has torch imported already (one thread, as theirs)
        reference = jobs.write_job(tmp_path / "reference", tiny_models.text_classifier, jobs.rows(ROWS))
        assert jobs.run(reference) == 0
        for outcome in signalled:
            assert_interrupted(*outcome.result())
    rerun = jobs.start(interrupted["SIGTERM+SIGTERM", 0.6].job)
    _, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    assert parts(interrupted["SIGTERM+SIGTERM", 0.6].job) == parts(reference)


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.05, 0.1, 0.3, 0.6, 1.0])
def test_every_pair_of_signals_at_every_gap_exits_75(command, gap):
    runs = {pair: command(f"{pair}-{gap}") for pair in PAIRS}
    for code, err in concurrently(*(lambda pair=pair, run=run: two_signals(run, pair, gap)
                                    for pair, run in runs.items())):
        assert_interrupted(code, err)


def test_ctrl_c_to_the_process_group_warns_once_and_exits_75(command):
    run = command("ctrl-c", workers=2)
    run.wait_until_computing()
    os.killpg(run.process.pid, signal.SIGINT)  # a terminal's Ctrl-C: the run and its DataLoader workers
    code, err = run.finish()
    assert code == EXIT_INTERRUPTED and "Traceback" not in err, err
    assert sum("SIGINT received" in line for line in err.splitlines()) == 1, err


def _worker_starting(ready) -> None:
    """A DataLoader worker between its fork and its worker_init_fn (where torch's own SIGTERM handler would end it),
    then the worker_init_fn batchrun gives it."""
    from pipeline_core.data.loader import _quiet_worker

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as deadly as torch's handler there
    ready.set()
    time.sleep(1.0)  # the test's SIGTERM comes now
    _quiet_worker(0)
    time.sleep(0.2)  # a signal that got through would have ended the process by now


@pytest.mark.parametrize("held", [True, False], ids=["started-by-workers_started", "started-bare"])
def test_a_sigterm_to_a_worker_before_its_init_is_held_then_ignored(held):
    """Caught before (1 in 5 runs of the torchrun SIGTERM test): torchrun's SIGTERM reached a DataLoader worker
    between its fork and _quiet_worker and killed it, failing the run with "DataLoader worker killed by signal"."""
    import contextlib
    import multiprocessing

    from pipeline_core.data.loader import workers_started

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    with workers_started() if held else contextlib.nullcontext():
        worker = context.Process(target=_worker_starting, args=(ready,), daemon=True)
        worker.start()
    assert ready.wait(30)
    os.kill(worker.pid, signal.SIGTERM)  # a process of this test's own, before its _quiet_worker
    worker.join(30)
    assert worker.exitcode == (0 if held else -signal.SIGTERM)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(STOP_SIGNALS) == set()  # nothing left held here
