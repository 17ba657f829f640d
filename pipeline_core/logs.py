"""batchrun's log lines on stderr: short text lines for people, or with `--log-format json` one JSON object a line
for schedulers and log collectors (Airflow, Loki, CloudWatch).

A record's fields come from `logging`'s `extra=`: `event`, a short stable name (`start`, `part_committed`,
`progress`, `done`, `summary`...), and whatever it measured (`part`, `rows`, `rows_per_second`, ...). Text lines
show only the message, so they stay as short as before; a record marked `json_only` (one per committed part) is
left out of them altogether. Stdlib only: pipeline_core.entry reads `json_requested` before anything heavy loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

# the attributes every LogRecord has: anything else on a record came from extra= and is a field of its JSON line
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "json_only"}
_DEFAULT_EVENTS = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error", "DEBUG": "debug"}
_state = {"format": "text", "fields": {}, "saved": {}}  # the current setup, and library handlers replaced in json mode


def json_requested(argv: list[str]) -> bool:
    """`--log-format json` (or `--log-format=json`) among the arguments: known before click has parsed them, so that
    a usage error and the final error line are JSON too."""
    for position, argument in enumerate(argv):
        if argument == "--log-format=json" or (argument == "--log-format" and argv[position + 1:position + 2]
                                               == ["json"]):
            return True
    return False


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so a redirected or captured stderr gets the log lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, event, message, this process's identity, then the record's fields."""

    def __init__(self, fields: dict | None = None):
        super().__init__()
        self.fields = fields  # None: the process's identity as setup_logging last set it

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _iso(record.created), "level": record.levelname.lower(),
                 "event": getattr(record, "event", None) or _DEFAULT_EVENTS.get(record.levelname, "log"),
                 "message": record.getMessage()}
        if record.name != "batchrun":
            entry["logger"] = record.name  # datasets, transformers, py.warnings
        entry.update(self.fields if self.fields is not None else _state["fields"])
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            entry["traceback"] = self.formatException(record.exc_info)
        return json_line(entry)


def json_line(entry: dict) -> str:
    """Strict JSON (no NaN or Infinity, which many parsers refuse), whatever a field holds."""
    return json.dumps({key: _finite(value) for key, value in entry.items()}, default=str, ensure_ascii=False)


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _iso(created: float) -> str:
    """2026-12-03T14:05:09.123+0100: local time with its offset, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(created)) + f".{int(created % 1 * 1000):03d}" + \
        time.strftime("%z", time.localtime(created))


def _text_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "json_only", False)


def setup_logging(level: int = logging.INFO, tag: str = "", log_format: str = "text",
                  fields: dict | None = None) -> None:
    """batchrun's log lines go to stderr, so stdout stays the command's result (plan --json pipes cleanly).
    A scaled-out process tags its text lines with its rank or shard ("batchrun[rank 1/2]"); its JSON lines carry
    `fields` (rank, world_size, shard_index, num_shards) instead."""
    logger = logging.getLogger("batchrun")
    if not logger.handlers:
        logger.addHandler(StderrHandler())
    _state["format"], _state["fields"] = log_format, dict(fields or {})
    name = f"batchrun[{tag}]" if tag else "batchrun"
    for handler in logger.handlers:
        handler.removeFilter(_text_only)
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        else:
            handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s", "%H:%M:%S"))
            handler.addFilter(_text_only)
    # BATCHRUN_DEBUG=1: the debug lines too (a server's own log lines, each retried request)
    logger.setLevel(logging.DEBUG if os.environ.get("BATCHRUN_DEBUG", "") not in ("", "0") else level)
    _route_libraries(log_format == "json")
    # batchrun logs each stage's time; transformers' per-weight loading bars would only add noise to cron logs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _route_libraries(as_json: bool) -> None:
    """In json mode transformers' log lines and Python warnings (torch's, datasets') are JSON lines too, so that
    every line on stderr parses; in text mode they print as the libraries print them."""
    logging.captureWarnings(as_json)
    saved = _state["saved"]
    for name in ("transformers", "py.warnings"):
        logger = logging.getLogger(name)
        if as_json:
            saved.setdefault(name, (logger.handlers, logger.propagate))
            handler = StderrHandler()
            handler.setFormatter(JsonFormatter())
            logger.handlers, logger.propagate = [handler], False
        elif name in saved:
            logger.handlers, logger.propagate = saved.pop(name)


def route_datasets_logs() -> None:
    """datasets logs some failures with their traceback before raising; batchrun reports them as one message.
    Only `run` reads data: `plan` does not pay for importing datasets (pandas, pyarrow) just to set its logger."""
    import datasets  # noqa: F401 - sets up the "datasets" logger and its handler, which this replaces

    library = StderrHandler()
    if _state["format"] == "json":
        library.setFormatter(JsonFormatter())
    else:
        library.setFormatter(logging.Formatter("%(asctime)s datasets %(levelname)s %(message)s", "%H:%M:%S"))
    library.addFilter(_without_traceback)
    logging.getLogger("datasets").handlers = [library]


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def final_line(message: str, exit_code: int, event: str = "error", **fields) -> str:
    """The command's last word when it fails ("error: ..." in text) as a JSON object, with the exit code."""
    level = "warning" if event == "interrupted" else "error"
    return json_line({"time": _iso(time.time()), "level": level, "event": event, "message": message,
                      "exit_code": exit_code, **_state["fields"], "pid": os.getpid(), **fields})
