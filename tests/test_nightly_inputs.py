"""Inputs a nightly job meets: an empty partition is a run of 0 rows (exit 0, `_SUCCESS`), a glob that matches no
file is exit 2 naming it before any model loads, a file that cannot be parsed is exit 2 naming the file and line
(more in test_data_options_and_parse_errors.py); for every builder batchrun documents (JSON lines, CSV, Parquet),
streamed or not, with `--limit` and split slices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import jobs
from jobs import run
from pipeline_core.cli import run_cli
from pipeline_core.engines import in_process

BUILDERS = ("json", "csv", "parquet")
EXTENSIONS = {"json": "jsonl", "csv": "csv", "parquet": "parquet"}


def write_rows(path: Path, builder: str, rows: list[dict], columns=("id", "text")) -> Path:
    """`rows` in the builder's format; no rows gives the format's empty file (a CSV keeps its header, a Parquet
    file its schema)."""
    if builder == "json":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif builder == "csv":
        path.write_text(",".join(columns) + "\n" + "".join(f"{row['id']},{row['text']}\n" for row in rows))
    else:
        pq.write_table(pa.table({column: pa.array([row[column] for row in rows], pa.string()) for column in columns}),
                       path)
    return path


def nightly_job(directory: Path, model: Path, builder: str, data_files, streaming: bool = True,
                split: str = "train") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    dataset = {"path": builder, "data_files": data_files, "split": split, "streaming": streaming,
               "keep_columns": ["id"]}
    return jobs.write_manifest(directory / "job.yaml", jobs.manifest(
        model, dataset=dataset, output={"path": directory / "out", "rows_per_part": 4}))


def status(out: Path, capsys) -> dict:
    capsys.readouterr()
    assert run_cli(["status", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- an empty partition ----------------------------------------------------------------------------------------------

EMPTY_FILES = {  # builder -> how its empty file is written
    "json": lambda path: path.write_text(""),
    "json-blank-lines": lambda path: path.write_text("\n  \n\n"),
    "csv": lambda path: path.write_text(""),
    "csv-header-only": lambda path: write_rows(path, "csv", []),
    "parquet": lambda path: write_rows(path, "parquet", []),
    "parquet-zero-bytes": lambda path: path.write_bytes(b""),
    "json-empty-array": lambda path: path.write_text("[]\n"),  # a JSON document of no records
}


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
@pytest.mark.parametrize("case", sorted(EMPTY_FILES))
@pytest.mark.parametrize("extra", [(), ("--limit", "5")], ids=["all", "limit"])
def test_an_empty_file_is_a_run_of_0_rows(tmp_path, tiny_models, capsys, caplog, streaming, case, extra):
    builder = case.split("-")[0]
    EMPTY_FILES[case](tmp_path / f"day.{EXTENSIONS[builder]}")
    split = "train[2:9]" if extra else "train"
    job = nightly_job(tmp_path, tiny_models.text_classifier, builder, str(tmp_path / f"day.{EXTENSIONS[builder]}"),
                      streaming, split)
    caplog.set_level(logging.WARNING, logger="batchrun")
    assert run(job, *extra) == 0
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == ["_SUCCESS", "_batchrun.json", "_progress.json"]
    assert [record.getMessage() for record in caplog.records] == [
        f"dataset '{builder}' split {split} has no rows: a run of 0 rows"]
    report = status(out, capsys)
    assert (report["complete"], report["parts_done"], report["parts_total"], report["rows_total"]) == (True, 0, 0, 0)
    assert run(job, *extra) == 0  # a rerun of the finished empty run


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
def test_an_empty_file_datasets_opens_itself_is_a_run_of_0_rows_too(tmp_path, tiny_models, streaming):
    (tmp_path / "day.jsonl").write_text("")
    url = f"file://{tmp_path / 'day.jsonl'}"  # a URL: batchrun leaves it to datasets, which finds no table
    assert run(nightly_job(tmp_path, tiny_models.text_classifier, "json", url, streaming)) == 0
    assert (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.parametrize("builder", [*BUILDERS, "csv-header-only", "parquet-no-rows"])
@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
def test_empty_files_beside_files_with_rows_are_left_out(tmp_path, tiny_models, builder, streaming):
    builder, _, empty = builder.partition("-")
    extension = EXTENSIONS[builder]
    rows = [{"id": f"r{index}", "text": "the quick brown fox"} for index in range(6)]
    # first, where datasets takes the features from: a header's columns of no type must not become the split's
    if empty:
        write_rows(tmp_path / f"a.{extension}", builder, [])
    else:
        (tmp_path / f"a.{extension}").write_bytes(b"")
    write_rows(tmp_path / f"b.{extension}", builder, rows[:3])
    write_rows(tmp_path / f"c.{extension}", builder, rows[3:])
    job = nightly_job(tmp_path, tiny_models.text_classifier, builder, str(tmp_path / f"*.{extension}"), streaming)
    assert run(job) == 0
    result = pq.read_table(tmp_path / "out").to_pandas().sort_values("row_id")
    assert result["id"].tolist() == [row["id"] for row in rows]
    assert result["row_id"].tolist() == list(range(6))


# --- a glob that matches nothing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("builder", BUILDERS)
def test_a_pattern_that_matches_no_file_exits_2_before_the_model_loads(tmp_path, tiny_models, capsys, monkeypatch,
                                                                       builder):
    monkeypatch.setattr(in_process, "initialize", lambda *args: pytest.fail("the model was loaded"))
    (tmp_path / "2026-12-01").mkdir()
    pattern = str(tmp_path / "2026-12-01" / f"part-*.{EXTENSIONS[builder]}")
    job = nightly_job(tmp_path, tiny_models.text_classifier, builder, pattern)
    assert run(job) == 2
    err = capsys.readouterr().err
    assert f"dataset.data_files: '{pattern}' matches no file (looked in {tmp_path / '2026-12-01'})" in err
    assert "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out").exists()  # nothing written either


def test_a_missing_file_or_directory_is_named_too(tmp_path, tiny_models, capsys):
    missing = str(tmp_path / "no-such-day" / "rows.jsonl")
    assert run(nightly_job(tmp_path / "a", tiny_models.text_classifier, "json", missing)) == 2
    assert f"'{missing}' is not a file (looked in {tmp_path / 'no-such-day'}, which does not exist)" in \
        capsys.readouterr().err
    relative = {"train": ["rows-*.jsonl"]}
    assert run(nightly_job(tmp_path / "b", tiny_models.text_classifier, "json", relative)) == 2
    assert f"'rows-*.jsonl' matches no file (looked in {Path.cwd()})" in capsys.readouterr().err
    wild_directory = str(tmp_path / "2026-*" / "rows.jsonl")
    assert run(nightly_job(tmp_path / "c", tiny_models.text_classifier, "json", wild_directory)) == 2
    assert f"matches no file (looked in {tmp_path})" in capsys.readouterr().err


def test_a_json_file_of_one_row_beside_others_is_read(tmp_path, tiny_models):
    write_rows(tmp_path / "a.jsonl", "json", [{"id": "r0", "text": "the quick brown fox"}])
    write_rows(tmp_path / "b.jsonl", "json", [{"id": "r1", "text": "the lazy dog"}])
    assert run(nightly_job(tmp_path, tiny_models.text_classifier, "json", str(tmp_path / "*.jsonl"))) == 0
    assert pq.read_table(tmp_path / "out").to_pandas().sort_values("row_id")["id"].tolist() == ["r0", "r1"]


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
def test_files_whose_column_types_differ_exit_1_naming_the_file_and_column(tmp_path, tiny_models, capsys, streaming):
    (tmp_path / "a.csv").write_text("id,text,n\nr0,the quick fox,1\n")
    (tmp_path / "b.csv").write_text("id,text,n\nr1,the lazy dog,\n")  # a blank: pandas reads n as floats
    job = nightly_job(tmp_path, tiny_models.text_classifier, "csv", str(tmp_path / "*.csv"), streaming)
    jobs.edit_job(job, dataset={"keep_columns": ["id", "n"]})
    assert run(job) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]  # Arrow's schema error, on one line
    assert "Schema at index 1 was different" in line or "Couldn't cast" in line
    assert line.endswith(f"({tmp_path / 'b.csv'} has n: double where {tmp_path / 'a.csv'} has n: int64; give every "
                         "file the same column types)" + ("; committed parts are kept" if streaming else ""))
    assert "Traceback" not in err


# --- a broken file ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
def test_a_json_line_cut_in_the_middle_exits_2_naming_the_file_and_line(tmp_path, tiny_models, capsys, streaming):
    write_rows(tmp_path / "a.jsonl", "json", [{"id": "r0", "text": "the quick brown fox"}])
    (tmp_path / "b.jsonl").write_text('{"id": "r1", "text": "the lazy dog"}\n{"id": "r2", "text": "cut in the mid')
    job = nightly_job(tmp_path, tiny_models.text_classifier, "json", str(tmp_path / "*.jsonl"), streaming)
    assert run(job) == 2  # a retry would read the same bytes
    err = capsys.readouterr().err
    assert (f"error: dataset 'json': {tmp_path / 'b.jsonl'}, line 2: not valid JSON (Unterminated string starting at "
            "column 22); fix or remove that line (a retry would read the same bytes)") in err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_huge_unicode_blank_texts_and_nested_kept_columns_keep_working(tmp_path, tiny_models, builder):
    texts = ["fox " * 50_000, "👩‍👩‍👧 family 🇺🇦", "مرحبا بالعالم", "", "   ", "the quick brown fox"]
    rows = [{"id": str(index), "text": text, "meta": {"a": index, "b": [text[:3]]}, "tags": ["x"] * index}
            for index, text in enumerate(texts)]
    path = tmp_path / f"day.{EXTENSIONS[builder]}"
    if builder == "json":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    job = nightly_job(tmp_path, tiny_models.text_classifier, builder, str(path))
    jobs.edit_job(job, dataset={"keep_columns": ["id", "meta", "tags"]})
    assert run(job) == 0
    result = pq.read_table(tmp_path / "out").to_pandas().sort_values("row_id")
    assert result["error"].isna().all() and result["label"].notna().all()
    assert [dict(meta, b=list(meta["b"])) for meta in result["meta"]] == [row["meta"] for row in rows]
    assert [list(tags) for tags in result["tags"]] == [row["tags"] for row in rows]


def test_data_files_of_a_local_dataset_directory_are_left_to_datasets(tmp_path, tiny_models):
    # relative to dataset.path, not to the working directory: only builders' patterns are checked by batchrun
    write_rows(tmp_path / "rows.jsonl", "json", [{"id": "r0", "text": "the quick brown fox"}])
    job = nightly_job(tmp_path, tiny_models.text_classifier, "json", "rows.jsonl")
    jobs.edit_job(job, dataset={"path": tmp_path})
    assert run(job) == 0
    assert pq.read_table(tmp_path / "out").to_pandas()["id"].tolist() == ["r0"]
