"""SIGTERM and SIGINT ask the run to stop: no new batches, committed parts stay, exit 75.

Schedulers (Airflow, Kubernetes, Slurm) send SIGTERM and wait a grace period before SIGKILL; a second signal
stops at once. Stdlib only: the command imports this before torch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("batchrun")


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


class StopOnSignals:
    def __init__(self):
        self.flag = StopFlag()
        self._previous: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self.flag

    def _handle(self, signum, _frame) -> None:
        if self.flag.requested:
            raise KeyboardInterrupt  # the second signal: stop now
        self.flag.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing the current batch, then stopping (send it again to stop now)",
                    self.flag.signal_name)

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
