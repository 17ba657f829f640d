"""Progress for people and schedulers: a tqdm bar on a terminal, else a log line every few seconds,
and `_progress.json` rewritten atomically after each committed part."""

from __future__ import annotations

import json
import logging
import sys
import time

from tqdm import tqdm

from pipeline_core.output import PROGRESS

log = logging.getLogger("batchrun")
LOG_EVERY_SECONDS = 10.0


class Progress:
    def __init__(self, store, total_rows: int | None, rows_per_part: int, rows_done: int, parts_done: int,
                 bar: bool | None = None):
        self.store = store
        self.total_rows = total_rows
        self.total_parts = -(-total_rows // rows_per_part) if total_rows is not None else None
        self.rows_done, self.parts_done = rows_done, parts_done
        self.failed_rows = 0
        self.started = time.monotonic()
        self.rows_this_run = self.tokens_this_run = 0
        self.last_log = self.started
        show_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total_rows, initial=rows_done, unit="row", dynamic_ncols=True) if show_bar else None

    def advance(self, rows: int, tokens: int) -> None:
        self.rows_this_run += rows
        self.tokens_this_run += tokens
        self.rows_done += rows
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{self.tokens_per_second():,.0f} tok/s", refresh=False)
        elif time.monotonic() - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = time.monotonic()
            log.info("%s", self.line())

    def part_committed(self, failed_rows: int) -> None:
        self.parts_done += 1
        self.failed_rows += failed_rows
        self.store.put(PROGRESS, json.dumps(self.snapshot(), indent=2).encode())

    def rows_per_second(self) -> float:
        return self.rows_this_run / max(time.monotonic() - self.started, 1e-9)

    def tokens_per_second(self) -> float:
        return self.tokens_this_run / max(time.monotonic() - self.started, 1e-9)

    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second()
        if self.total_rows is None or rate <= 0:
            return None
        return max(self.total_rows - self.rows_done, 0) / rate

    def line(self) -> str:
        total = f"/{self.total_rows:,}" if self.total_rows is not None else ""
        eta = self.eta_seconds()
        return (f"{self.rows_done:,}{total} rows, {self.rows_per_second():,.1f} rows/s, "
                f"{self.tokens_per_second():,.0f} tokens/s" + (f", ETA {eta:,.0f}s" if eta is not None else ""))

    def snapshot(self, complete: bool = False) -> dict:
        return {
            "parts_done": self.parts_done,
            "parts_total": self.total_parts,
            "rows_done": self.rows_done,
            "rows_total": self.total_rows,
            "failed_rows": self.failed_rows,
            "rows_per_second": round(self.rows_per_second(), 3),
            "tokens_per_second": round(self.tokens_per_second(), 1),
            "eta_seconds": None if complete else self.eta_seconds(),
            "complete": complete,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
