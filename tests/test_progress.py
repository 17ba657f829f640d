"""Progress: part totals from rows_per_part, rows/s and tokens/s over this attempt, the ETA, the log line and its
cadence without a terminal, the tqdm bar on one, and `_progress.json` rewritten after each committed part.

A fake clock drives `time.monotonic`, so every rate and ETA below is an exact value.
"""

from __future__ import annotations

import json
import logging
import re
import time
from types import SimpleNamespace

import pytest

from pipeline_core.output import progress as progress_module
from pipeline_core.output.progress import Progress
from pipeline_core.output.run_dir import PROGRESS
from pipeline_core.output.store import LocalStore

START = 1000.0
FIXED_TIME = time.localtime(1_700_000_000)


class Clock:
    def __init__(self):
        self.now = START

    def at(self, seconds: float) -> None:
        """`seconds` after the Progress was made."""
        self.now = START + seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    fake = SimpleNamespace(monotonic=lambda: clock.now, strftime=lambda fmt: time.strftime(fmt, FIXED_TIME))
    monkeypatch.setattr(progress_module, "time", fake)
    return clock


def make(tmp_path, total_rows, rows_per_part=4, rows_done=0, parts_done=0, bar=False) -> Progress:
    return Progress(LocalStore(tmp_path), total_rows, rows_per_part, rows_done, parts_done, bar)


@pytest.mark.parametrize("total_rows, rows_per_part, parts", [(10, 4, 3), (8, 4, 2), (1, 4, 1), (0, 4, 0),
                                                              (None, 4, None)])
def test_total_parts_is_total_rows_divided_by_rows_per_part_rounded_up(tmp_path, clock, total_rows, rows_per_part,
                                                                      parts):
    progress = make(tmp_path, total_rows, rows_per_part)
    assert progress.total_parts == parts
    assert progress.total_rows == total_rows


def test_rates_count_this_attempts_rows_and_tokens_over_its_own_time(tmp_path, clock):
    progress = make(tmp_path, total_rows=100, rows_done=40, parts_done=10)  # 40 rows of an earlier attempt
    clock.at(0.25)
    progress.advance(6, 50)
    progress.advance(4, 0)
    assert (progress.rows_this_run, progress.tokens_this_run, progress.rows_done) == (10, 50, 50)
    assert progress.rows_per_second() == 40.0  # 10 rows in a quarter of a second, not in a whole one
    assert progress.tokens_per_second() == 200.0
    assert progress.eta_seconds() == 50 / 40.0


def test_rates_before_any_time_has_passed_do_not_divide_by_zero(tmp_path, clock):
    progress = make(tmp_path, total_rows=10)
    assert (progress.rows_per_second(), progress.tokens_per_second(), progress.eta_seconds()) == (0.0, 0.0, None)


def test_eta_is_none_without_a_total_or_a_rate(tmp_path, clock):
    stream = make(tmp_path, total_rows=None)
    clock.at(2)
    stream.advance(10, 10)
    assert stream.eta_seconds() is None
    idle = make(tmp_path, total_rows=10)
    clock.at(4)
    assert idle.eta_seconds() is None


def test_eta_at_a_slow_rate_and_past_the_total(tmp_path, clock):
    progress = make(tmp_path, total_rows=10)
    clock.at(4)
    progress.advance(2, 0)  # half a row per second
    assert progress.eta_seconds() == 16.0
    progress.advance(10, 0)  # more rows than the total announced: never a negative ETA
    assert progress.eta_seconds() == 0.0


def test_line_with_a_known_total(tmp_path, clock):
    progress = make(tmp_path, total_rows=1_200_000, rows_per_part=1000, rows_done=1_000, parts_done=1)
    clock.at(2)
    progress.advance(1_000, 2_000)
    progress.advance(500, 470)
    assert progress.line() == "2,500/1,200,000 rows, 750.0 rows/s, 1,235 tokens/s, ETA 1,597s"


def test_line_of_a_stream_has_no_total_and_no_eta(tmp_path, clock):
    progress = make(tmp_path, total_rows=None, rows_done=1_000)
    clock.at(2)
    progress.advance(1_500, 2_470)
    assert progress.line() == "2,500 rows, 750.0 rows/s, 1,235 tokens/s"


def test_without_a_bar_the_line_is_logged_every_10_seconds(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="batchrun")
    progress = make(tmp_path, total_rows=100)
    logged = []
    for seconds in (9.99, 10.0, 15.0, 19.99, 20.0):
        clock.at(seconds)
        progress.advance(1, 10)
        logged += [(seconds, record.getMessage()) for record in caplog.records]
        caplog.clear()
    assert logged == [(10.0, "2/100 rows, 0.2 rows/s, 2 tokens/s, ETA 490s"),
                      (20.0, "5/100 rows, 0.2 rows/s, 2 tokens/s, ETA 380s")]


def test_bar_starts_at_the_rows_done_and_shows_tokens_per_second(tmp_path, clock, caplog):
    caplog.set_level(logging.INFO, logger="batchrun")
    progress = make(tmp_path, total_rows=20, rows_done=4, parts_done=1, bar=True)
    bar = progress.bar
    assert (bar.total, bar.n, bar.unit, bool(bar.dynamic_ncols)) == (20, 4, "row", True)
    clock.at(12)
    progress.advance(6, 1_200)
    assert (bar.n, bar.postfix) == (10, "100 tok/s")
    assert caplog.records == []  # the bar replaces the log line
    progress.close()
    assert bar.disable is True  # closed


class Terminal:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, bar, shown", [(True, None, True), (False, None, False), (True, False, False),
                                             (False, True, True)])
def test_bar_by_default_only_on_a_terminal(tmp_path, clock, monkeypatch, tty, bar, shown):
    monkeypatch.setattr(progress_module, "sys", SimpleNamespace(stderr=Terminal(tty)))
    progress = make(tmp_path, total_rows=8, bar=bar)
    assert (progress.bar is not None) == shown
    progress.close()  # with or without a bar


def test_progress_json_after_each_part_and_at_the_end(tmp_path, clock):
    progress = make(tmp_path, total_rows=22, rows_done=0, parts_done=0)
    clock.at(3)
    progress.advance(10, 100)
    progress.part_committed(2)
    raw = (tmp_path / PROGRESS).read_text()
    first = json.loads(raw)
    assert raw == json.dumps(first, indent=2)
    updated = first.pop("updated")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", updated)
    assert updated == time.strftime("%Y-%m-%dT%H:%M:%S%z", FIXED_TIME)
    assert first == {"parts_done": 1, "parts_total": 6, "rows_done": 10, "rows_total": 22, "failed_rows": 2,
                     "rows_per_second": 3.333, "tokens_per_second": 33.3, "eta_seconds": pytest.approx(3.6),
                     "complete": False}

    clock.at(4)
    progress.advance(4, 0)
    progress.part_committed(1)
    second = json.loads((tmp_path / PROGRESS).read_text())
    assert (second["parts_done"], second["rows_done"], second["failed_rows"]) == (2, 14, 3)
    assert second["rows_per_second"] == 3.5 and second["tokens_per_second"] == 25.0

    final = progress.snapshot(complete=True)
    assert (final["complete"], final["eta_seconds"], final["parts_done"]) == (True, None, 2)
    assert progress.snapshot()["eta_seconds"] == pytest.approx(8 / 3.5)
