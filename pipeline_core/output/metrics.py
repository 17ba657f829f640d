"""What a run measures as it goes, for `batchrun report` and the summary line: one small JSON file per part.

`_metrics-00000i.json` holds part i's rows, failures by reason, seconds, real and padded tokens, each batch's
figures, and who computed it (worker id, host, pid, rank, shard, device, dtype, when the process started). It is
written (by run_dir.write_metrics) just before the part is committed, whole (no appends: object stores have none), so:
- only committed parts' metrics count (a reader skips the file of a part that is not committed);
- a part computed again after a kill, or twice by two processes, overwrites its file, never adds a second one,
  so the metrics of resumed and scaled-out runs add up without double counting;
- the leading underscore hides the files from Parquet readers, and `--fresh` removes them with the parts.

Batches are recorded as columns of numbers (no per-row Python); failure reasons are counted per distinct error
string with Arrow, then normalised (numbers become N) so that one cause is one reason.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline_core.output.run_dir import write_metrics

METRICS_VERSION = 1
BATCH_COLUMNS = ("ended", "seconds", "rows", "real_tokens", "padded_tokens")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def failure_reason(error: str) -> str:
    """One cause, whatever the row: the first line, numbers as N, at most 160 characters."""
    line = error.strip().splitlines()[0] if error.strip() else "(empty error)"
    reason = _NUMBER.sub("N", line)
    return reason if len(reason) <= 160 else reason[:157] + "..."


def failure_counts(errors: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """{reason: rows} of an error column (null: the row succeeded), counted by Arrow, not row by row."""
    counts: dict[str, int] = {}
    for entry in pc.value_counts(pc.drop_null(errors)).to_pylist():
        reason = failure_reason(entry["values"])
        counts[reason] = counts.get(reason, 0) + entry["counts"]
    return counts


@dataclass
class PartMeter:
    """One part's figures while its slices are computed."""

    started: float  # time.time() when its first slice started computing
    seconds: float = 0.0  # computing its slices (forward passes, decoding, assembling)
    prepare_seconds: float = 0.0  # preparing its slices, where that happened in this process (no workers)
    rows: int = 0
    failed_rows: int = 0
    truncated_rows: int = 0  # rows whose input was cut to max_length
    failures: dict = field(default_factory=dict)
    batches: list = field(default_factory=list)  # (ended, seconds, rows, real tokens, padded tokens) per batch
    requests: dict | None = None  # a server engine's: requests, retries, tokens, and each request's seconds


class RunMetrics:
    """This process's measurements: per part until it is committed, then added to the totals of the summary."""

    def __init__(self, process: dict, fingerprint: str):
        self.process = process  # worker, host, pid, rank, world_size, shard_index, num_shards, device, dtype, ...
        self.fingerprint = fingerprint
        self.meters: dict[int, PartMeter] = {}
        self.parts = self.rows = self.failed_rows = self.truncated_rows = self.real_tokens = self.padded_tokens = 0
        self.completion_tokens: int | None = None  # a server engine's answers' tokens, from their `usage`
        self.failures: dict[str, int] = {}

    def slice_done(self, index: int, table: pa.Table, batches: list, seconds: float, prepare_seconds: float,
                   truncated_rows: int = 0, requests=None) -> None:
        """A computed slice of part `index` (its assembled rows, with their `error` column), its batches, how many
        of its rows were truncated, and a server engine's request figures (engines/served.RequestFigures)."""
        meter = self.meters.get(index)
        if meter is None:
            meter = self.meters[index] = PartMeter(started=time.time() - seconds)
        meter.seconds += seconds
        meter.prepare_seconds += prepare_seconds
        meter.rows += table.num_rows
        meter.failed_rows += table.num_rows - table.column("error").null_count
        meter.truncated_rows += truncated_rows
        for reason, count in failure_counts(table.column("error")).items():
            meter.failures[reason] = meter.failures.get(reason, 0) + count
        meter.batches.extend(batches)
        if requests is not None:
            mine = meter.requests = meter.requests or {"requests": 0, "retries": 0, "prompt_tokens": 0,
                                                       "completion_tokens": 0, "latencies": []}
            for name in ("requests", "retries", "prompt_tokens", "completion_tokens"):
                mine[name] += getattr(requests, name)
            mine["latencies"] += requests.latencies

    def write_part(self, store, index: int) -> dict:
        """Part `index`'s metrics file, written whole just before the part is committed; its figures join the
        totals (the caller commits the part next: a failed commit fails the run)."""
        meter = self.meters.pop(index)
        batches = {name: [batch[column] for batch in meter.batches] for column, name in enumerate(BATCH_COLUMNS)}
        batches["ended"] = [round(value, 3) for value in batches["ended"]]
        batches["seconds"] = [round(value, 5) for value in batches["seconds"]]
        real, padded = sum(batches["real_tokens"]), sum(batches["padded_tokens"])
        record = {"version": METRICS_VERSION, "part": index, "fingerprint": self.fingerprint,
                  "rows": meter.rows, "failed_rows": meter.failed_rows, "truncated_rows": meter.truncated_rows,
                  "failures": meter.failures,
                  "started": round(meter.started, 3), "ended": round(time.time(), 3),
                  "seconds": round(meter.seconds, 4), "prepare_seconds": round(meter.prepare_seconds, 4),
                  "real_tokens": real, "padded_tokens": padded, "batches": batches, "process": self.process}
        if meter.requests is not None:
            record["requests"] = request_record(meter.requests)
            self.completion_tokens = (self.completion_tokens or 0) + meter.requests["completion_tokens"]
        write_metrics(store, index, record)
        self.parts += 1
        self.rows += meter.rows
        self.failed_rows += meter.failed_rows
        self.truncated_rows += meter.truncated_rows
        self.real_tokens += real
        self.padded_tokens += padded
        for reason, count in meter.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + count
        return record

    def summary(self, wall_seconds: float, load_seconds: float) -> dict:
        """The figures of the summary line: this process's committed parts over its time after the model loaded."""
        busy = max(wall_seconds - load_seconds, 1e-9)
        return {"rows": self.rows, "failed_rows": self.failed_rows, "truncated_rows": self.truncated_rows,
                "parts": self.parts,
                "wall_seconds": round(wall_seconds, 3), "load_seconds": round(load_seconds, 3),
                "rows_per_second": round(self.rows / busy, 3), "tokens_per_second": round(self.real_tokens / busy, 1),
                "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
                "padding_efficiency": padding_efficiency(self.real_tokens, self.padded_tokens),
                "device": self.process.get("device"), "dtype": self.process.get("dtype"),
                **({"completion_tokens": self.completion_tokens,
                    "completion_tokens_per_second": round(self.completion_tokens / busy, 1)}
                   if self.completion_tokens is not None else {})}


def request_record(figures: dict) -> dict:
    """A part's requests as its metrics file holds them: counts, tokens, and latency percentiles in seconds."""
    latencies = sorted(figures["latencies"])

    def percentile(share: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(share * len(latencies)))], 4) if latencies else None

    return {"requests": figures["requests"], "retries": figures["retries"],
            "prompt_tokens": figures["prompt_tokens"], "completion_tokens": figures["completion_tokens"],
            "latency_p50": percentile(0.50), "latency_p90": percentile(0.90), "latency_p99": percentile(0.99)}


def recorded_summary(info: dict, wall_seconds: float, exit_code: int) -> dict:
    """The summary of a rerun that found the run finished: nothing computed here, the output as `_batchrun.json`
    recorded it when the run finished."""
    rows, failed_rows = info.get("rows"), info.get("failed_rows")
    recorded = isinstance(rows, int) and isinstance(failed_rows, int)
    return {"rows": 0, "failed_rows": 0, "truncated_rows": 0, "parts": 0, "wall_seconds": round(wall_seconds, 3),
            "load_seconds": 0.0, "rows_per_second": 0.0, "tokens_per_second": 0.0, "real_tokens": 0,
            "padded_tokens": 0, "padding_efficiency": None, "device": info.get("device"), "dtype": info.get("dtype"),
            "output_rows": rows if recorded else None, "output_failed_rows": failed_rows if recorded else None,
            "exit_code": exit_code}


def padding_efficiency(real: int, padded: int) -> float | None:
    """Real tokens / padded tokens: 1.0 is no padding at all; None when nothing was padded (no token inputs)."""
    return round(real / padded, 4) if padded else None


def summary_line(summary: dict) -> str:
    """The run's last line for people: `summary: 40 rows, 2 failed, ...`."""
    efficiency = summary.get("padding_efficiency")
    words = [f"{summary['rows']:,} rows", f"{summary['failed_rows']:,} failed",
             *([f"{summary['truncated_rows']:,} truncated"] if summary.get("truncated_rows") else []),
             f"wall {summary['wall_seconds']:,.1f}s (load {summary['load_seconds']:,.1f}s)",
             f"{summary['rows_per_second']:,.1f} rows/s", f"{summary['tokens_per_second']:,.0f} tokens/s",
             *([f"{summary['completion_tokens_per_second']:,.1f} completion tokens/s"]
               if summary.get("completion_tokens_per_second") is not None else []),
             f"padding efficiency {efficiency:.1%}" if efficiency is not None else "padding efficiency -",
             f"device {summary.get('device') or '-'}", f"dtype {summary.get('dtype') or '-'}"]
    line = "summary: " + ", ".join(words)
    if summary.get("output_rows") is not None and summary["output_rows"] != summary["rows"]:
        line += f"; the output holds {summary['output_rows']:,} rows, {summary['output_failed_rows']:,} failed"
    return line
