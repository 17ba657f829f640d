"""Logs for schedulers, recorded metrics and the run report: `--log-format json` lines of a run, a failing run and a
sharded run all parse and carry their fields; the summary line matches the output and a padding efficiency
computed here from the rows' token lengths; text logs stay human; one metrics file per committed part, invisible to
Parquet readers, counted once after a failed commit and a resume, removed by `--fresh`; `batchrun report` writes an
HTML page embedding its PNG charts for one process and for two shards, whose legends cover no line or bar, and
refuses plainly without metrics or without matplotlib.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings

import pandas as pd
import pyarrow.dataset as pads
import pytest
from transformers import AutoTokenizer

import jobs
from pipeline_core import work as work_module
from pipeline_core.cli import run_cli
from pipeline_core.data.batching import pack_batches
from pipeline_core.errors import StorageError
from pipeline_core.logs import setup_logging
from pipeline_core.output.metrics import failure_reason
from pipeline_core.output.run_dir import read_metrics
from pipeline_core.output.store import LocalStore
from pipeline_core.report import chart_figures, png, run_facts, spread

ROWS, ROWS_PER_PART, MAX_TOKENS, MAX_BATCH = 40, 8, 256, 8
NULL_ROWS = (5, 17, 30)  # their text is null: each fails with "input column 'text' is null"
PNG = b"\x89PNG\r\n\x1a\n"
IDENTITY = ("rank", "world_size", "shard_index", "num_shards", "pid")


def data() -> list[dict]:
    rows = jobs.rows(ROWS, seed=3)
    for index in NULL_ROWS:
        rows[index]["text"] = None
    return rows


@pytest.fixture(autouse=True)
def text_logs_afterwards():
    yield
    setup_logging()  # later tests' log lines as a plain run writes them


@pytest.fixture
def job(tmp_path, tiny_models):
    return jobs.write_job(tmp_path, tiny_models.text_classifier, data(), rows_per_part=ROWS_PER_PART)


def run(job, capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = jobs.run(job, *args)
    return code, capsys.readouterr().err.splitlines()


def parsed(lines: list[str]) -> list[dict]:
    """Every line a JSON object with the fields every line has."""
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"time", "level", "event", "message"} <= set(entry), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}", entry["time"])
    return entries


def expected_tokens(model) -> tuple[int, int]:
    """(real, padded) tokens computed here: each part's rows tokenized, packed under the job's budget, and every
    batch costing its longest row times its rows."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    real = padded = 0
    rows = data()
    for start in range(0, ROWS, ROWS_PER_PART):
        texts = [row["text"] for row in rows[start:start + ROWS_PER_PART] if row["text"] is not None]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        real += sum(lengths)
        padded += sum(max(lengths[i] for i in batch) * len(batch)
                      for batch in pack_batches(lengths, MAX_TOKENS, MAX_BATCH))
    return real, padded


# --- logs ------------------------------------------------------------------------------------------------------------


def test_json_lines_of_a_run_parse_and_carry_the_fields(job, tiny_models, capsys):
    code, lines = run(job, capsys, "--log-format", "json")
    assert code == 0
    entries = parsed(lines)
    assert all(entry[key] == value for entry in entries
               for key, value in {"rank": 0, "world_size": 1, "shard_index": 0, "num_shards": 1}.items())
    events = [entry["event"] for entry in entries]
    assert events[-1] == "summary" and events.count("summary") == 1
    assert {"stage", "start", "first_part", "done", "failed_rows"} <= set(events)
    committed = [entry for entry in entries if entry["event"] == "part_committed"]
    assert [(entry["part"], entry["rows"]) for entry in committed] == [(index, ROWS_PER_PART) for index in range(5)]
    assert [entry["failed_rows"] for entry in committed] == [1, 0, 1, 1, 0]  # rows 5, 17 and 30
    assert committed[-1]["rows_done"] == ROWS and committed[-1]["rows_per_second"] > 0
    assert all("eta_seconds" in entry and "tokens_per_second" in entry for entry in committed)

    summary = entries[-1]
    out = pd.read_parquet(job.parent / "out")
    assert (summary["rows"], summary["failed_rows"]) == (len(out), int(out["error"].notna().sum())) == (ROWS, 3)
    assert (summary["output_rows"], summary["output_failed_rows"], summary["exit_code"]) == (ROWS, 3, 0)
    real, padded = expected_tokens(tiny_models.text_classifier)
    assert (summary["real_tokens"], summary["padded_tokens"]) == (real, padded)
    assert summary["padding_efficiency"] == round(real / padded, 4) and 0.5 < real / padded < 1
    assert (summary["device"], summary["dtype"]) == ("cpu", "float32")
    assert summary["rows_per_second"] > 0 and summary["wall_seconds"] >= summary["load_seconds"] > 0
    assert summary["message"].startswith(f"summary: {ROWS} rows, 3 failed, wall ")


def test_text_logs_stay_short_lines_for_people_ending_with_the_summary(job, capsys):
    code, lines = run(job, capsys)
    assert code == 0
    assert not [line for line in lines if line.lstrip().startswith("{")]
    assert not [line for line in lines if "committed part" in line]  # per-part records are the JSON format's
    assert all(re.match(r"\d\d:\d\d:\d\d batchrun (INFO|WARNING) ", line) for line in lines), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d batchrun INFO summary: 40 rows, 3 failed, wall [\d.]+s \(load [\d.]+s\), "
                        r"[\d,.]+ rows/s, [\d,]+ tokens/s, padding efficiency \d+\.\d%, device cpu, dtype float32",
                        lines[-1])


def test_a_failing_run_in_a_child_process_prints_only_json_lines_ending_with_the_error(tmp_path, tiny_models):
    """The real command, imports and all: a second data file cut mid-line fails the run after three parts (exit 2:
    a retry would read the same bytes). datasets' own error line is JSON too, and so is the final error with its exit
    code."""
    rows = data()
    job = jobs.write_job(tmp_path, tiny_models.text_classifier, rows[:24], rows_per_part=ROWS_PER_PART)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[24]) + '\n{"id": "x", "text": "cut\n')
    jobs.edit_job(job, dataset={"data_files": [tmp_path / "rows.jsonl", broken]})
    process = jobs.start(job, "--log-format", "json")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    entries = parsed(err.splitlines())
    assert [entry["part"] for entry in entries if entry["event"] == "part_committed"] == [0, 1, 2]
    assert any(entry.get("logger", "").startswith("datasets") and "broken.jsonl" in entry["message"]
               for entry in entries)
    summary, error = entries[-2], entries[-1]
    assert (summary["event"], summary["rows"], summary["failed_rows"], summary["exit_code"]) == ("summary", 24, 2,
                                                                                                 None)
    assert (error["event"], error["level"], error["exit_code"]) == ("error", "error", 2)
    assert error["message"].startswith(f"dataset 'json': {broken}, line 2: not valid JSON")
    assert error["pid"] == process.pid


def test_usage_errors_are_json_too(job, capsys):
    assert run_cli(["run", str(job), "--log-format", "json", "--limit", "0"]) == 2
    (entry,) = parsed(capsys.readouterr().err.splitlines())
    assert (entry["event"], entry["exit_code"]) == ("usage_error", 2) and "--limit" in entry["message"]
    job.write_text(job.read_text() + "batchng: {}\n")
    assert run_cli(["run", str(job), "--log-format=json"]) == 2
    (entry,) = parsed(capsys.readouterr().err.splitlines())
    assert (entry["event"], entry["exit_code"]) == ("error", 2) and "did you mean batching?" in entry["message"]


def test_library_lines_and_warnings_are_json_lines_in_json_mode_and_text_again_after(capsys):
    setup_logging(log_format="json", fields={"rank": 1, "world_size": 2})
    from pipeline_core.logs import route_datasets_logs

    route_datasets_logs()
    logging.getLogger("datasets").warning("a datasets warning")
    logging.getLogger("transformers").warning("a transformers warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a python warning", UserWarning, stacklevel=1)
    logging.getLogger("batchrun").info("odd %s", "values", extra={"event": "x", "ratio": float("nan")})
    entries = parsed(capsys.readouterr().err.splitlines())
    assert [(entry.get("logger"), entry["level"]) for entry in entries] == [
        ("datasets", "warning"), ("transformers", "warning"), ("py.warnings", "warning"), (None, "info")]
    assert "a python warning" in entries[2]["message"]
    assert entries[3]["ratio"] is None and entries[3]["message"] == "odd values"  # NaN is not JSON
    assert all((entry["rank"], entry["world_size"]) == (1, 2) for entry in entries)
    setup_logging()
    route_datasets_logs()
    logging.getLogger("datasets").warning("plain again")
    assert capsys.readouterr().err.endswith("datasets WARNING plain again\n")


# --- metrics ---------------------------------------------------------------------------------------------------------


def test_one_metrics_file_per_committed_part_invisible_to_parquet_readers(job, capsys):
    assert run(job, capsys)[0] == 0
    out = job.parent / "out"
    assert sorted(path.name for path in out.glob("_metrics-*")) == [f"_metrics-00000{i}.json" for i in range(5)]
    records = read_metrics(LocalStore(out))
    assert [record["part"] for record in records] == [0, 1, 2, 3, 4]
    assert sum(record["rows"] for record in records) == ROWS
    assert [record["failures"] for record in records if record["failures"]] == [
        {"input column 'text' is null": 1}] * 3
    first = records[0]
    assert sum(first["batches"]["rows"]) == ROWS_PER_PART - 1  # the null row never reached a batch
    assert first["real_tokens"] == sum(first["batches"]["real_tokens"]) <= first["padded_tokens"]
    assert {"worker", "host", "pid", "rank", "shard_index", "device", "dtype", "started"} <= set(first["process"])
    assert first["process"]["pid"] == os.getpid()
    assert run_cli(["report", str(out)]) == 0  # its _report directory is hidden too
    assert sorted(pads.dataset(out).files) == sorted(str(path) for path in out.glob("part-*.parquet"))
    assert len(pd.read_parquet(out)) == ROWS
    assert list(pd.read_parquet(out).columns) == ["row_id", "id", "label", "score", "error"]


def test_metrics_of_a_part_whose_commit_failed_are_not_counted_and_a_resume_counts_each_part_once(job, capsys,
                                                                                                   monkeypatch):
    """Killed between writing part 2's metrics and committing it (here: the commit fails), then resumed."""
    commit = work_module._commit_whole_part

    def failing(index, *args):
        if index == 2:
            raise StorageError("cannot write part-000002.parquet: the disk went away")
        return commit(index, *args)

    monkeypatch.setattr(work_module, "_commit_whole_part", failing)
    assert run(job, capsys)[0] == 1
    out = job.parent / "out"
    assert (out / "_metrics-000002.json").exists() and not (out / "part-000002.parquet").exists()
    assert [record["part"] for record in read_metrics(LocalStore(out))] == [0, 1]
    first_attempt = json.loads((out / "_metrics-000002.json").read_text())["process"]["worker"]
    monkeypatch.undo()
    code, lines = run(job, capsys)
    assert code == 0 and "summary: 24 rows, 2 failed" in lines[-1]  # parts 2, 3 and 4 computed here
    records = read_metrics(LocalStore(out))
    assert [record["part"] for record in records] == [0, 1, 2, 3, 4]
    assert sum(record["rows"] for record in records) == ROWS
    assert sum(sum(record["failures"].values()) for record in records) == 3
    assert records[2]["process"]["worker"] != first_attempt  # rewritten by the resume, not added beside
    facts = run_facts(records, {})
    assert facts["rows"] == ROWS and len(facts["processes"]) == 2


def test_fresh_removes_the_metrics_with_the_parts(job, capsys):
    assert run(job, capsys)[0] == 0
    out = job.parent / "out"
    assert run(job, capsys, "--fresh", "--limit", "8")[0] == 0
    assert sorted(path.name for path in out.glob("_metrics-*")) == ["_metrics-000000.json"]


def test_failure_reasons_are_normalised_so_that_one_cause_is_one_reason():
    assert failure_reason("forward pass failed: RuntimeError: index 512 is out of range (size 3.5)\nTraceback") == \
        "forward pass failed: RuntimeError: index N is out of range (size N)"
    kept = "input column 'text' holds float32, not text"  # digits inside a word stay
    assert failure_reason(kept) == kept
    assert len(failure_reason("x" * 500)) == 160


def test_spread_keeps_every_row_and_puts_each_where_its_batch_ran():
    rows = spread([(0.0, 1.0, 10), (1.0, 1.0, 4), (2.5, 4.0, 6)], total=4.0, bins=4)
    assert rows == [10.0, 4.0, 2.0, 4.0]


# --- report ----------------------------------------------------------------------------------------------------------


def assert_report(directory, charts: list[str]) -> str:
    page = (directory / "report.html").read_text()
    assert sorted(path.name for path in directory.glob("*.png")) == sorted(f"{name}.png" for name in charts)
    for name in charts:
        png = (directory / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) < 150_000
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page  # embedded, not linked
    assert page.count("<img ") == len(charts) and "src=\"http" not in page
    return page


def test_report_of_a_single_run(job, capsys, tmp_path):
    assert run(job, capsys)[0] == 0
    out = job.parent / "out"
    assert run_cli(["report", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out / '_report' / 'report.html'} (throughput.png, batches.png, " \
                                      "failures.png)\n"
    page = assert_report(out / "_report", ["throughput", "batches", "failures"])
    for row in ("<th scope='row'>rows</th><td>40</td>", "<th scope='row'>failed rows</th><td>3</td>",
                "<th scope='row'>device</th><td>cpu</td>", "<th scope='row'>dtype</th><td>float32</td>",
                "<th scope='row'>processes</th><td>1</td>", "<td>input column &#x27;text&#x27; is null</td><td>3</td>"):
        assert row in page
    assert re.search(r"<th scope='row'>padding efficiency</th><td>\d+\.\d% \([\d,]+ real / [\d,]+ padded", page)
    assert run_cli(["report", str(out), "--out", str(tmp_path / "elsewhere")]) == 0
    assert_report(tmp_path / "elsewhere", ["throughput", "batches", "failures"])


def test_report_of_two_shards_shows_each_process(job, capsys):
    """Shard 1 runs first, then shard 0, each logging JSON; the report charts both."""
    entries = []
    for index in ("1", "0"):
        code, lines = run(job, capsys, "--num-shards", "2", "--shard-index", index, "--log-format", "json")
        assert code == 0
        entries += parsed(lines)
        assert {(entry["shard_index"], entry["num_shards"]) for entry in entries[-len(lines):]} == {(int(index), 2)}
    assert [entry["event"] for entry in entries].count("shard_done") == 1  # shard 1, finished first
    summaries = [entry for entry in entries if entry["event"] == "summary"]
    # a stream of unknown length is dealt round-robin: shard 1 has parts 1 and 3, shard 0 parts 0, 2 and 4
    assert [(entry["rows"], entry["parts"]) for entry in summaries] == [(16, 2), (24, 3)]
    out = job.parent / "out"
    assert run_cli(["report", str(out)]) == 0
    page = assert_report(out / "_report", ["throughput", "batches", "failures", "processes"])
    assert "<th scope='row'>processes</th><td>2</td>" in page
    assert re.search(r"<td>shard 0/2 pid \d+</td>.*<td>3</td><td>24</td><td>2</td></tr>", page)
    assert re.search(r"<td>shard 1/2 pid \d+</td>.*<td>2</td><td>16</td><td>1</td></tr>", page)


def four_processes_records() -> list[dict]:
    """Metrics of 2 shards x 2 ranks loaded at the same moment, whose lines in processes.png reach every corner: one
    commits all its rows at once (top left), one steadily until the end (top right), one 2 rows at the end (bottom
    right). The batches of the first two are mostly padding: the padding chart's tallest bar is at its left."""
    loaded = 1_000.0
    parts = {0: [(0.2, 100)], 1: [(second, 10) for second in range(1, 11)], 2: [(10.0, 2)],
             3: [(second, 12) for second in (2, 4, 6, 8)]}
    records = []
    for worker, committed in parts.items():
        process = {"worker": f"w{worker}", "pid": 100 + worker, "rank": worker % 2, "world_size": 2,
                   "shard_index": worker // 2, "num_shards": 2, "device": "cpu", "dtype": "float32",
                   "started": loaded - 1, "loaded": loaded}
        for moment, rows in committed:
            batch_rows = [10] * (rows // 10) + [rows % 10] * (rows % 10 > 0)
            padded = [64 * count for count in batch_rows]
            real = [tokens // 50 if worker < 2 else tokens * 3 // 4 for tokens in padded]
            ended = [loaded + moment] * len(batch_rows)
            records.append({
                "part": len(records), "rows": rows, "failed_rows": 1, "failures": {"input column 'text' is null": 1},
                "started": loaded + moment - 0.1, "ended": loaded + moment, "real_tokens": sum(real),
                "padded_tokens": sum(padded), "process": process,
                "batches": {"ended": ended, "seconds": [0.1 / len(batch_rows)] * len(batch_rows), "rows": batch_rows,
                            "real_tokens": real, "padded_tokens": padded}})
    return records


def covered_by(box, figure) -> list[str]:
    """The lines and bars of `figure` that cross `box` (display pixels): their points, and the segments between
    them where they are drawn (steps as drawn, axhline/axvline through their own transforms)."""
    from matplotlib.cbook import STEP_LOOKUP_MAP
    from matplotlib.path import Path

    covered = []
    for axes in figure.axes:
        for line in axes.lines:
            if not len(line.get_xydata()):
                continue  # a legend entry without data
            drawn = STEP_LOOKUP_MAP[line.get_drawstyle()](*line.get_xydata().T)
            points = line.get_transform().transform(list(zip(*drawn, strict=True)))
            joined = line.get_linestyle() not in ("None", "", " ")
            if box.count_contains(points) or joined and Path(points).intersects_bbox(box, filled=False):
                label = line.get_label()
                covered.append(f"{axes.get_title()}: " + (f"line {label}" if not label.startswith("_") else "dots"))
        for patch in axes.patches:
            outline = patch.get_transform().transform_path(patch.get_path())
            if outline.intersects_bbox(box, filled=patch.get_fill()):
                covered.append(f"{axes.get_title()}: a {type(patch).__name__}")
    return covered


def test_report_legends_cover_no_data_and_lie_within_the_png():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    figures = chart_figures(run_facts(four_processes_records(), {}), Figure)
    assert list(figures) == ["throughput", "batches", "failures", "processes"]
    problems = []
    for name, figure in figures.items():
        canvas = FigureCanvasAgg(figure)
        image = Image.open(io.BytesIO(png(figure)))
        assert image.size == (round(figure.bbox.width), round(figure.bbox.height))
        renderer = canvas.get_renderer()  # the one that drew the PNG: the legends where the PNG shows them
        legends = [*figure.legends, *(axes.get_legend() for axes in figure.axes if axes.get_legend())]
        assert len(legends) == (name != "failures"), name
        for legend in legends:
            box = legend.get_window_extent(renderer)
            width, height = image.size
            if not (0 <= box.x0 and 0 <= box.y0 and box.x1 <= width and box.y1 <= height):
                problems.append(f"{name}: the legend is cut off the PNG")
            problems += [f"{name}: the legend covers {artist}" for artist in covered_by(box, figure)]
    assert not problems, "\n".join(problems)


def test_report_without_metrics_or_without_a_run_exits_2_saying_why(job, capsys, tmp_path):
    assert run(job, capsys)[0] == 0
    out = job.parent / "out"
    for path in out.glob("_metrics-*"):
        path.unlink()  # as a batchrun from before metrics left it
    assert run_cli(["report", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out} has no metrics to report: its 5 committed parts were written by "
                                       "a batchrun that did not record metrics yet; rerun the job with --fresh to "
                                       "record them\n")
    assert not (out / "_report").exists()
    assert run_cli(["report", str(tmp_path / "nothing")]) == 2
    assert "holds no batchrun run" in capsys.readouterr().err


def test_report_without_matplotlib_names_the_extra_to_install(job, capsys, monkeypatch):
    assert run(job, capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert run_cli(["report", str(job.parent / "out")]) == 2
    assert capsys.readouterr().err == ("error: batchrun report draws its charts with matplotlib, which is not "
                                       'installed: pip install "batchrun[report]"\n')


def test_report_command_in_a_child_process_writes_the_page(job, capsys):
    """The installed entry point, as a user runs it after a run (matplotlib imported there, not here)."""
    assert run(job, capsys)[0] == 0
    result = subprocess.run([sys.executable, "-m", "pipeline_core", "report", str(job.parent / "out")],
                            capture_output=True, text=True, timeout=120, cwd=jobs.ROOT)
    assert result.returncode == 0, result.stderr
    assert_report(job.parent / "out" / "_report", ["throughput", "batches", "failures"])
