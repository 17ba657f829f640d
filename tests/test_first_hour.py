"""A new user's first hour: a misspelt column or path fails before any weights load (exit 2, naming what exists);
`dataset.path` takes every layout the table of docs/datasets.md lists; the row ids of a sliced split are positions in
the unsliced split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

import jobs
from jobs import run
from pipeline_core.cli import run_cli
from pipeline_core.engines import in_process

ROWS = [{"id": f"r{index:02d}", "text": " ".join(["the quick brown fox"] * (1 + index % 5))} for index in range(60)]
LAYOUT_ROWS = ROWS[:10]


def write_job(directory: Path, model: Path, dataset: dict, **model_keys) -> Path:
    """The usual job of tests/jobs.py over `dataset`, with no errors section."""
    directory.mkdir(parents=True, exist_ok=True)
    job = {**jobs.job_manifest(directory, model, model=model_keys, errors=None), "dataset": dataset}
    return jobs.write_manifest(directory / "job.yaml", job)


def json_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def result(job: Path) -> pa.Table:
    return pq.read_table(job.parent / "out").sort_by("row_id")


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model would load: the checks under test must come first."""
    monkeypatch.setattr(in_process, "initialize", lambda *args: pytest.fail("the model was loaded"))


# --- fail fast -------------------------------------------------------------------------------------------------------

def write_source(directory: Path, builder: str, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if builder == "json":
        return json_lines(directory / "rows.jsonl", rows)
    if builder == "csv":
        path = directory / "rows.csv"
        path.write_text("id,text\n" + "".join(f"{row['id']},{row['text']}\n" for row in rows))
        return path
    path = directory / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


MISTAKES = {  # what is misspelt -> (dataset keys, model keys, the column reported missing)
    "input_column": ({"input_column": "body"}, {}, "'body'"),
    "keep_columns": ({"keep_columns": ["id", "source"]}, {}, "'source'"),
    "prompt": ({}, {"prompt": "Classify: {title} {text}"}, "'title'"),
}


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
@pytest.mark.parametrize("builder", ["json", "csv", "parquet"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_misspelt_column_exits_2_before_the_model_loads_or_output_is_written(tmp_path, tiny_models, capsys, no_model,
                                                                              builder, streaming, mistake):
    keys, model_keys, missing = MISTAKES[mistake]
    source = write_source(tmp_path, builder, ROWS[:6])
    dataset = {"path": builder, "data_files": str(source), "streaming": streaming, "keep_columns": ["id"], **keys}
    job = write_job(tmp_path, tiny_models.text_classifier, dataset, **model_keys)
    assert run(job) == 2  # a streamed CSV too, which knows its columns only once read: not 1, Airflow's retry
    err = capsys.readouterr().err
    assert f"has no column {missing}; its columns are id, text" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written, so the fixed job needs no --fresh


def test_the_fixed_job_runs_without_fresh(tmp_path, tiny_models):
    source = write_source(tmp_path, "csv", ROWS[:6])
    dataset = {"path": "csv", "data_files": str(source), "input_column": "body"}
    job = write_job(tmp_path, tiny_models.text_classifier, dataset)
    assert run(job) == 2
    jobs.edit_job(job, dataset={"input_column": "text"})
    assert run(job) == 0
    assert result(job)["row_id"].to_pylist() == list(range(6))


@pytest.mark.parametrize("path", ["./no-such-dir", "/no/such/dataset", "/no-such-dataset", "~/no-such-dataset",
                                  "data/no/such"])
def test_a_missing_local_dataset_directory_exits_2_before_the_model_loads(tmp_path, tiny_models, capsys, no_model,
                                                                         path):
    assert run(write_job(tmp_path, tiny_models.text_classifier, {"path": path})) == 2
    err = capsys.readouterr().err
    assert f"dataset.path={path!r}: no such file or directory (from " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_dataset_is_checked_before_the_model_even_for_a_model_that_cannot_load(tmp_path, capsys):
    """No monkeypatch: a model directory that does not exist would fail with its own message if it came first."""
    source = write_source(tmp_path, "json", ROWS[:3])
    job = write_job(tmp_path, tmp_path / "no-model", {"path": "json", "data_files": str(source),
                                                      "input_column": "body"})
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "has no column 'body'" in err and "no-model" not in err


# --- layouts ---------------------------------------------------------------------------------------------------------

def arrow_stream(path: Path, rows: list[dict]) -> Path:
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)
    return path


def arrow_file(path: Path, rows: list[dict]) -> Path:
    feather.write_feather(pa.Table.from_pylist(rows), path)  # the Arrow IPC file format (Feather v2)
    return path


def text_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(row["text"] + "\n" for row in rows))
    return path


def saved_dataset(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def saved_dataset_dict(path: Path, rows: list[dict]) -> Path:
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[20:23]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def data_directory(path: Path, rows: list[dict], write=json_lines, extension: str = "jsonl") -> Path:
    """A directory of two data files, the rows split between them."""
    path.mkdir()
    write(path / f"a.{extension}", rows[:4])
    write(path / f"b.{extension}", rows[4:])
    return path


def dataset_repository(path: Path, rows: list[dict]) -> Path:
    """A directory laid out as a hub dataset repository: a card whose `configs` name each split's files."""
    (path / "data").mkdir(parents=True)
    json_lines(path / "data" / "eval.jsonl", rows)
    json_lines(path / "data" / "other.jsonl", ROWS[30:33])
    (path / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                    "  - split: train\n    path: data/other.jsonl\n"
                                    "  - split: test\n    path: data/eval.jsonl\n---\n# eval set\n")
    return path


# layout -> (how its data is written under a directory, the dataset keys given the written path). The layout's name,
# up to a comma, is a row of the table in docs/datasets.md.
LAYOUTS = {
    "json builder": (lambda d, r: json_lines(d / "x.jsonl", r), lambda f: {"path": "json", "data_files": f}),
    "csv builder": (lambda d, r: write_source(d, "csv", r), lambda f: {"path": "csv", "data_files": f}),
    "parquet builder": (lambda d, r: write_source(d, "parquet", r), lambda f: {"path": "parquet", "data_files": f}),
    "text builder": (lambda d, r: text_file(d / "x.txt", r), lambda f: {"path": "text", "data_files": f}),
    "arrow builder, stream format": (lambda d, r: arrow_stream(d / "x.arrow", r),
                                     lambda f: {"path": "arrow", "data_files": f}),
    "arrow builder, file format": (lambda d, r: arrow_file(d / "x.arrow", r),
                                   lambda f: {"path": "arrow", "data_files": f}),
    "one data file, .jsonl": (lambda d, r: json_lines(d / "x.jsonl", r), lambda f: {"path": f}),
    "one data file, .csv": (lambda d, r: write_source(d, "csv", r), lambda f: {"path": f}),
    "one data file, .parquet": (lambda d, r: write_source(d, "parquet", r), lambda f: {"path": f}),
    "one data file, .arrow": (lambda d, r: arrow_stream(d / "x.arrow", r), lambda f: {"path": f}),
    "one data file, .txt": (lambda d, r: text_file(d / "x.txt", r), lambda f: {"path": f}),
    "a directory of data files": (lambda d, r: data_directory(d / "dir", r), lambda f: {"path": f}),
    "a directory of data files, arrow": (lambda d, r: data_directory(d / "arrows", r, arrow_stream, "arrow"),
                                           lambda f: {"path": f}),
    "a dataset repository": (lambda d, r: dataset_repository(d / "repo", r), lambda f: {"path": f, "split": "test"}),
    "save_to_disk Dataset": (lambda d, r: saved_dataset(d / "saved", r), lambda f: {"path": f}),
    "save_to_disk DatasetDict": (lambda d, r: saved_dataset_dict(d / "saved", r),
                                 lambda f: {"path": f, "split": "test"}),
}


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_in_the_docs_table_runs(tmp_path, tiny_models, layout, streaming):
    write, keys = LAYOUTS[layout]
    (tmp_path / "data").mkdir()
    dataset = {**keys(str(write(tmp_path / "data", LAYOUT_ROWS))), "streaming": streaming}
    text_only = layout.endswith(("text builder", ".txt"))  # the text builder's one column is `text`
    if not text_only:
        dataset["keep_columns"] = ["id"]
    job = write_job(tmp_path, tiny_models.text_classifier, dataset)
    assert run(job) == 0
    table = result(job)
    assert table["row_id"].to_pylist() == list(range(len(LAYOUT_ROWS)))
    if not text_only:
        assert table["id"].to_pylist() == [row["id"] for row in LAYOUT_ROWS]
    assert table["error"].null_count == len(LAYOUT_ROWS)


def test_the_docs_table_lists_every_tested_layout():
    page = (Path(__file__).resolve().parent.parent / "docs" / "datasets.md").read_text()
    table = page.split("<!-- dataset layouts -->")[1]
    for layout in LAYOUTS:
        assert f"| {layout.split(',')[0]} |" in table, layout


def test_a_saved_dataset_is_memory_mapped_with_random_access_even_streamed(tmp_path, tiny_models):
    from pipeline_core.data.source import open_split
    from pipeline_core.manifest import load_job

    job = write_job(tmp_path, tiny_models.text_classifier, {"path": str(saved_dataset(tmp_path / "s", ROWS)),
                                                            "split": "train[5:17]", "keep_columns": ["id"]})
    split = open_split(load_job(job))
    assert split.random_access and split.total == 12 and split.offset == 5
    assert split.read_part(1, 4)["id"].to_pylist() == ["r09", "r10", "r11", "r12"]


@pytest.mark.parametrize("keys, message", [
    ({"split": "validation"}, "dataset.split='validation': Unknown split \"validation\". Should be one of ['train', "
                              "'test']. ({saved} holds train, test)"),
    ({"data_files": "x.jsonl"}, "dataset.data_files cannot be used with dataset.path='{saved}', a directory written "
                                "by save_to_disk (it holds its own files); remove the key"),
])
def test_a_saved_dataset_dict_refuses_what_it_cannot_mean(tmp_path, tiny_models, capsys, no_model, keys, message):
    saved = saved_dataset_dict(tmp_path / "saved", ROWS[:3])
    assert run(write_job(tmp_path, tiny_models.text_classifier, {"path": str(saved), **keys})) == 2
    assert message.format(saved=saved) in capsys.readouterr().err


def test_a_saved_split_is_the_split_it_records(tmp_path, tiny_models, capsys, no_model):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS[:3], split=datasets.Split.VALIDATION).save_to_disk(str(saved))
    assert run(write_job(tmp_path, tiny_models.text_classifier, {"path": str(saved)})) == 2
    assert f"dataset.split names 'train', but {saved} holds the 'validation' split only (set dataset.split: " \
           "validation)" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("x.xml", "batchrun reads a single file of type .arrow, .csv, .geoparquet, .gpq, .json, .jsonl, .ndjson, .parquet, "
              ".txt, not .xml"),
    ("x", "not one without an extension"),
])
def test_a_single_file_of_another_type_is_refused(tmp_path, tiny_models, capsys, no_model, name, message):
    (tmp_path / name).write_text("<rows/>")
    assert run(write_job(tmp_path, tiny_models.text_classifier, {"path": str(tmp_path / name)})) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("split, expected", [("test", range(10)), ("test[2:5]", range(2, 5))])
def test_a_single_file_is_the_split_the_job_names(tmp_path, tiny_models, split, expected):
    source = json_lines(tmp_path / "x.jsonl", LAYOUT_ROWS)
    job = write_job(tmp_path, tiny_models.text_classifier, {"path": str(source), "split": split,
                                                           "keep_columns": ["id"]})
    assert run(job) == 0
    assert result(job)["id"].to_pylist() == [LAYOUT_ROWS[row]["id"] for row in expected]


def test_a_single_file_with_data_files_is_refused(tmp_path, tiny_models, capsys, no_model):
    source = json_lines(tmp_path / "x.jsonl", ROWS[:2])
    job = write_job(tmp_path, tiny_models.text_classifier, {"path": str(source), "data_files": str(source)})
    assert run(job) == 2
    assert f"dataset.path='{source}' is a file, so dataset.data_files cannot also be set" in capsys.readouterr().err


# --- row ids of a sliced split ---------------------------------------------------------------------------------------

SOURCES = {  # how the 60 rows are stored -> dataset keys
    "json": lambda d: {"path": "json", "data_files": str(json_lines(d / "rows.jsonl", ROWS))},
    "parquet": lambda d: {"path": "parquet", "data_files": str(_parquet_groups(d / "rows.parquet"))},
    "saved": lambda d: {"path": str(saved_dataset(d / "saved", ROWS))},
}


def _parquet_groups(path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=7)  # read by row group (data/parquet.py)
    return path


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("split, limit, expected", [
    ("train[10:50]", None, range(10, 50)),
    ("train[10:50]", "5", range(10, 15)),
    ("train[45:]", None, range(45, 60)),
    ("train[:7]", None, range(0, 7)),
])
def test_row_ids_of_a_sliced_split_are_positions_in_the_unsliced_split(tmp_path, tiny_models, source, streaming,
                                                                        split, limit, expected):
    dataset = {**SOURCES[source](tmp_path), "split": split, "streaming": streaming, "keep_columns": ["id"]}
    job = write_job(tmp_path, tiny_models.text_classifier, dataset)
    assert run(job, *(["--limit", limit] if limit else [])) == 0
    table = result(job)
    assert table["row_id"].to_pylist() == list(expected)
    assert table["id"].to_pylist() == [ROWS[row]["id"] for row in expected]  # the row id joins back to the source


def test_percent_slices_start_where_datasets_rounds_them(tmp_path, tiny_models):
    dataset = {**SOURCES["json"](tmp_path), "split": "train[25%:50%]", "streaming": False, "keep_columns": ["id"]}
    job = write_job(tmp_path, tiny_models.text_classifier, dataset)
    assert run(job) == 0
    table = result(job)
    assert table["row_id"].to_pylist() == list(range(15, 30))
    assert table["id"].to_pylist() == [row["id"] for row in ROWS[15:30]]


def test_two_slices_of_one_split_join_back_without_arithmetic(tmp_path, tiny_models):
    ids = []
    for split in ("train[:25]", "train[25:]"):
        dataset = {**SOURCES["parquet"](tmp_path), "split": split, "keep_columns": ["id"]}
        job = write_job(tmp_path / split, tiny_models.text_classifier, dataset)
        assert run(job) == 0
        ids += result(job)["row_id"].to_pylist()
    assert ids == list(range(60))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_sliced_run_resumes_keeping_its_committed_parts(tmp_path, tiny_models, caplog, source):
    dataset = {**SOURCES[source](tmp_path), "split": "train[10:50]", "keep_columns": ["id"]}
    job = write_job(tmp_path, tiny_models.text_classifier, dataset)
    assert run(job) == 0
    whole = result(job)
    out = tmp_path / "out"
    (out / "_SUCCESS").unlink()
    (out / "part-000003.parquet").unlink()
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")}
    caplog.set_level(logging.INFO, logger="batchrun")
    assert run(job) == 0
    assert "damaged" not in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet") if path.name in before} == before
    assert result(job).equals(whole)


def test_status_counts_the_parts_of_a_sliced_run(tmp_path, tiny_models, capsys):
    dataset = {**SOURCES["json"](tmp_path), "split": "train[10:50]"}
    job = write_job(tmp_path, tiny_models.text_classifier, dataset)
    assert run(job) == 0
    capsys.readouterr()
    assert run_cli(["status", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["parts_done"], report["damaged_parts"], report["rows_done"]) == (10, 0, 40)
