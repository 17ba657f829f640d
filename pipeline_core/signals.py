"""SIGTERM and SIGINT ask the run to stop: no new batches, committed parts stay, exit 75.

Schedulers (Airflow, Kubernetes, Slurm) send SIGTERM and wait a grace period before SIGKILL; a second signal
stops at once.

The `batchrun` command installs one `ProcessGuard` before anything else (pipeline_core.entry): a signal during
its imports, or while DataLoader workers and the interpreter shut down, must end in 75 too, not in the default
handlers' 143 or 130. Without it (library use, tests calling run_cli in process), `StopOnSignals` installs
handlers for the run only. Stdlib only: this module is imported before torch.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("batchrun")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class StopFlag:
    signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early for a stop request; True when a stop was requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        return self.requested


def _ask_to_stop(flag: StopFlag, signum: int) -> None:
    """The first signal: the run finishes its current batch, commits what is complete, then exits 75."""
    flag.signal_name = signal.Signals(signum).name
    log.warning("%s received: finishing the current batch, then stopping (send it again to stop now)",
                flag.signal_name, extra={"event": "signal", "signal": flag.signal_name})


class ProcessGuard:
    """The command's handlers, from its first line until the process exits; never put back to the defaults, which
    would turn a signal during shutdown (DataLoader teardown, interpreter finalization) into 143 or 130."""

    def __init__(self):
        self.flag = StopFlag()
        self.pid = os.getpid()
        self.stopped_now = False  # the one KeyboardInterrupt was raised
        self.finished = False  # the command has its result: later signals change nothing

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self.pid:
            return  # a forked DataLoader worker, until its worker_init_fn ignores signals: stopping is the run's
        if self.finished or self.stopped_now:
            log.debug("%s ignored: the command is already stopping", signal.Signals(signum).name)
            return
        if not self.flag.requested:
            _ask_to_stop(self.flag, signum)
            return
        self.stopped_now = True  # once only: a further KeyboardInterrupt would break the cleanup of this one
        raise KeyboardInterrupt

    def finish(self) -> None:
        """The command has its exit code: later signals change nothing. Ignored, not merely noted: after the atexit
        functions the interpreter puts the default handlers back for Python-handled signals, and its shutdown with
        torch loaded still takes most of a second."""
        self.finished = True
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


_guard: ProcessGuard | None = None


def guard_process() -> ProcessGuard:
    """Install the command's handlers for the rest of this process (main thread only, as signal.signal is)."""
    global _guard
    _guard = ProcessGuard()
    _guard.install()
    return _guard


def _guarded() -> ProcessGuard | None:
    return _guard if _guard is not None and _guard.pid == os.getpid() else None


class StopOnSignals:
    """The run's stop flag: the command's guard's when it has one; otherwise handlers for the block only."""

    def __init__(self):
        self.flag = StopFlag()
        self._previous: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopFlag:
        guard = _guarded()
        if guard is not None:
            self.flag = guard.flag
        elif threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            self._pid = os.getpid()
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self.flag

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker, as in ProcessGuard._handle
        if self.flag.requested:
            raise KeyboardInterrupt  # the second signal: stop now
        _ask_to_stop(self.flag, signum)

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
