"""A started server's keeper: it starts the server in a process group of its own and takes the whole group down when
batchrun asks (SIGTERM) or when batchrun is gone, however it went (kill -9 included), so that no server outlives the
run and holds the GPU or the port.

Run as a script by engines/server.py (`python guard.py PARENT_PID GRACE -- COMMAND...`), so it imports only the
standard library and starts in milliseconds. It polls its parent's pid (five times a second) rather than asking for
Linux's parent-death signal: that signal follows the thread that started the child, not the process, and a restart
is started from a worker thread, whose end would take a healthy server down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.2


def _take_down(server: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the server's group, SIGKILL to what is left after `grace` seconds (children included)."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    try:  # children the server left behind, once it is gone itself
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    parent, grace, command = int(argv[0]), float(argv[1]), argv[3:]
    stop = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: stop.append(number))
    if os.getppid() != parent:  # batchrun died while this started
        return 1
    try:
        server = subprocess.Popen(command, start_new_session=True)
    except OSError as error:
        print(f"batchrun could not start {command[0]!r}: {error}", file=sys.stderr, flush=True)
        return 127
    while server.poll() is None:
        if stop or os.getppid() != parent:
            _take_down(server, grace)
            return 0
        time.sleep(POLL_SECONDS)
    _take_down(server, 0)  # the server exited: what it started goes with it
    return server.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
