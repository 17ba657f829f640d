"""Progress for people and schedulers: a tqdm bar on a terminal, else a log line every few seconds,
and `_progress.json` rewritten atomically after each committed part.

Where several processes share the work, each counts its own rows and rate; after each commit it takes the parts
committed by all of them and their rates (from their worker records), so the one process that shows progress shows
the job's, and `_progress.json` says the job's whoever writes it last.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

from pipeline_core.output.run_dir import write_progress

log = logging.getLogger("batchrun")
LOG_EVERY_SECONDS = 10.0


class Progress:
    def __init__(self, store, total_rows: int | None, rows_per_part: int, rows_done: int, parts_done: int,
                 bar: bool | None = None, quiet: bool = False):
        self.store = store
        self.total_rows = total_rows
        self.total_parts = -(-total_rows // rows_per_part) if total_rows is not None else None
        self.rows_done, self.parts_done = rows_done, parts_done  # rows_done counts rows computed, not yet committed
        self.rows_committed = rows_done  # what _progress.json says: rows in committed parts only
        self.failed_rows = 0
        self.started = time.monotonic()
        self.rows_this_run = self.tokens_this_run = 0
        self.last_log = self.started
        self.quiet = quiet  # another process of the group shows the progress
        self.peers_rows_per_second = 0.0
        self.parts_here = 0  # parts this process committed (its rows are rows_this_run)
        self.input = None  # what this process read of the input (ReadStats), where the source says
        self.job: dict | None = None  # the whole job's figures when this process computes only a shard of it
        show_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total_rows, initial=rows_done, unit="row", dynamic_ncols=True) if show_bar else None

    def advance(self, rows: int, tokens: int) -> None:
        self.rows_this_run += rows
        self.tokens_this_run += tokens
        self.rows_done += rows
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{self.tokens_per_second():,.0f} tok/s", refresh=False)
        elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = time.monotonic()
            log.info("%s", self.line(), extra={"event": "progress", **self.fields(), "failed_rows": self.failed_rows})

    def part_committed(self, failed_rows: int, parts_done: int | None = None, rows_done: int | None = None,
                       peers_rows_per_second: float = 0.0) -> None:
        """One more part of this process; `parts_done` and `rows_done`, when given, count every process's."""
        self.parts_done += 1
        self.parts_here += 1
        self.failed_rows += failed_rows
        if parts_done is not None:
            self.parts_done = max(self.parts_done, parts_done)
            if self.bar is not None and rows_done > self.rows_done:
                self.bar.update(rows_done - self.rows_done)
            self.rows_done = max(self.rows_done, rows_done)
        self.rows_committed = rows_done if rows_done is not None else self.rows_done
        self.peers_rows_per_second = peers_rows_per_second
        write_progress(self.store, self.snapshot())

    def complete(self, total_parts: int, rows: int, failed_rows: int) -> dict:
        """The job is whole: its figures as the committed parts give them (known for sure now, even for a stream),
        and the snapshot `_progress.json` ends with."""
        self.total_parts, self.total_rows = total_parts, rows
        self.parts_done, self.rows_done, self.rows_committed = total_parts, rows, rows
        self.failed_rows = failed_rows
        return self.snapshot(complete=True)

    def input_read(self, stats) -> None:
        self.input = stats if self.input is None else self.input + stats

    def own_rows_per_second(self) -> float:
        return self.rows_this_run / max(time.monotonic() - self.started, 1e-9)

    def rows_per_second(self) -> float:
        """This process's rate plus its live peers': the job's."""
        return self.own_rows_per_second() + self.peers_rows_per_second

    def figures(self) -> dict:
        """What this process's worker record says of its work (status shows it per process)."""
        figures = {"rows_per_second": round(self.own_rows_per_second(), 3), "parts_done": self.parts_here,
                   "rows_done": self.rows_this_run}
        if self.input is not None:
            figures["input_read"] = vars(self.input)
        return figures

    def tokens_per_second(self) -> float:
        return self.tokens_this_run / max(time.monotonic() - self.started, 1e-9)

    def eta_seconds(self) -> float | None:
        return _eta(self.total_rows, self.rows_done, self.rows_per_second())

    def fields(self) -> dict:
        """The figures of the progress line, for JSON log lines."""
        return {"rows_done": self.rows_done, "rows_total": self.total_rows, "parts_done": self.parts_done,
                "parts_total": self.total_parts, "rows_per_second": round(self.rows_per_second(), 3),
                "tokens_per_second": round(self.tokens_per_second(), 1), "eta_seconds": _rounded(self.eta_seconds())}

    def line(self) -> str:
        total = f"/{self.total_rows:,}" if self.total_rows is not None else ""
        eta = self.eta_seconds()
        return (f"{self.rows_done:,}{total} rows, {self.rows_per_second():,.1f} rows/s, "
                f"{self.tokens_per_second():,.0f} tokens/s" + (f", ETA {eta:,.0f}s" if eta is not None else ""))

    def snapshot(self, complete: bool = False) -> dict:
        """`_progress.json`: the job's committed figures (a shard knows the job's parts from the listing). Rows of
        parts still in progress are not counted: a stopped run would otherwise claim rows it never wrote."""
        job = {"parts_done": self.parts_done, "parts_total": self.total_parts, "rows_done": self.rows_committed,
               "rows_total": self.total_rows, **(self.job if self.job and not complete else {})}
        return {
            **job,
            "failed_rows": self.failed_rows,
            "rows_per_second": round(self.rows_per_second(), 3),
            "tokens_per_second": round(self.tokens_per_second(), 1),
            "eta_seconds": None if complete else _eta(job["rows_total"], job["rows_done"], self.rows_per_second()),
            "complete": complete,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _eta(total_rows: int | None, rows_done: int, rate: float) -> float | None:
    if total_rows is None or rate <= 0:
        return None
    return max(total_rows - rows_done, 0) / rate
