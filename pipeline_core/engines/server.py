"""A server batchrun starts: the command for the engine kind, a free port, waiting for /health, its log lines into
batchrun's log, restarts after it dies, and stopping it.

The server runs under guard.py, which takes its whole process group down when batchrun stops it or is gone (kill -9
included). Its output goes to batchrun's log tagged `[server]`, at debug level; the last lines are kept for the
message when it fails to start or dies.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline_core.errors import BatchrunError, UsageError

log = logging.getLogger("batchrun")
GUARD = Path(__file__).with_name("guard.py")
STOP_GRACE_SECONDS = 15.0  # a server asked to stop has this long to exit before it is killed
TAIL_LINES = 40

# kind -> (the command before model.engine.args, what to install when its program is missing)
COMMANDS = {
    "vllm": (["vllm", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}"], "vllm"),
    "sglang": ([sys.executable, "-m", "sglang.launch_server", "--model-path", "{model}", "--host", "127.0.0.1",
                "--port", "{port}"], "sglang"),
}


def server_command(kind: str, command: list[str] | None, args: list[str]) -> list[str]:
    """The command with its placeholders unfilled: what `plan` shows and the run's identity holds."""
    base = COMMANDS[kind][0] if kind in COMMANDS else list(command or [])
    return [*base, *args]


def check_executable(kind: str, command: list[str]) -> None:
    """Exit 2 before anything starts when the server's program is not installed, naming the package."""
    if kind == "sglang":
        if importlib.util.find_spec("sglang") is None:
            raise UsageError("model.engine.kind sglang: the sglang package is not installed in this Python "
                             f"({sys.executable}); pip install 'sglang[all]'")
        return
    program = command[0]
    if shutil.which(program) is None:
        hint = f"; pip install {COMMANDS[kind][1]}" if kind in COMMANDS else ""
        raise UsageError(f"model.engine.kind {kind}: the command {program!r} is not found on PATH{hint}")


def fill(command: list[str], model: str, port: int, device: str) -> list[str]:
    """The placeholders replaced, and only they: other braces in an argument stay (a JSON argument such as
    `--chat-template-kwargs '{"enable_thinking": true}'`)."""
    values = {"{model}": model, "{port}": str(port), "{device}": device}
    filled = []
    for part in command:
        for placeholder, value in values.items():
            part = part.replace(placeholder, value)
        filled.append(part)
    return filled


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """One started server: start, wait until healthy, restart after a death (a bounded number of times), stop."""

    def __init__(self, command: list[str], model: str, device: str, startup_timeout: float, restarts: int,
                 environment: dict | None = None):
        self.template, self.model, self.device = command, model, device
        self.startup_timeout, self.restarts_left = startup_timeout, restarts
        self.environment = environment
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.lock = threading.Lock()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, should_stop=lambda: False) -> None:
        """Start the server and wait for /health: exit 1 with its last lines when it exits or times out first."""
        self.port = free_port()
        command = fill(self.template, self.model, self.port, self.device)
        log.info("starting the server: %s", " ".join(command), extra={"event": "server_starting", "port": self.port})
        self.tail.clear()
        self.process = subprocess.Popen(
            [sys.executable, "-s", str(GUARD), str(os.getpid()), str(STOP_GRACE_SECONDS), "--", *command],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **(self.environment or {})})
        self.starts += 1
        threading.Thread(target=self._relay_log, args=(self.process,), daemon=True, name="server-log").start()
        started = time.monotonic()
        while not self._healthy():
            if self.process.poll() is not None:
                self.process.wait()
                raise BatchrunError(f"the server exited with code {self.process.returncode} before it answered "
                                    f"/health:\n{self.last_lines()}")
            if time.monotonic() - started > self.startup_timeout or should_stop():
                self.stop()
                if should_stop():
                    return
                raise BatchrunError(f"the server did not answer /health within model.engine.startup_timeout="
                                    f"{self.startup_timeout:g}s:\n{self.last_lines()}")
            time.sleep(0.25)
        log.info("the server answers on port %d after %.1fs", self.port, time.monotonic() - started,
                 extra={"event": "server_ready", "port": self.port, "seconds": round(time.monotonic() - started, 1)})

    def restart(self, seen_start: int) -> None:
        """Start the server again after it died (once for all the requests that saw the death); exit 1 past
        model.engine.restarts."""
        with self.lock:
            if self.starts != seen_start and self.alive():
                return  # another request restarted it already
            code = self.process.poll() if self.process is not None else None
            if self.restarts_left <= 0:
                raise BatchrunError(f"the server died (exit code {code}) and model.engine.restarts is used up; its "
                                    f"last lines:\n{self.last_lines()}")
            self.restarts_left -= 1
            log.warning("the server died (exit code %s); starting it again (%d restarts left). Its last lines:\n%s",
                        code, self.restarts_left, self.last_lines(),
                        extra={"event": "server_restart", "exit_code": code})
            self.stop()
            self.start()

    def stop(self) -> None:
        """Ask the guard to take the server down; wait for it (it kills what is left after the grace period)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("the server on port %d stopped", self.port, extra={"event": "server_stopped"})

    def last_lines(self) -> str:
        return "\n".join(f"  [server] {line}" for line in self.tail) or "  (the server wrote nothing)"

    def _healthy(self) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as answer:
                    if answer.status == 200:
                        return True
            except (urllib.error.URLError, OSError, ValueError):
                continue
        return False

    def _relay_log(self, process: subprocess.Popen) -> None:
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.tail.append(line)
                log.debug("[server] %s", line, extra={"event": "server_log"})
