"""Data files batchrun cannot parse exit 2 naming the file and the 1-based line (a retry would read the same bytes),
streamed or converted, keeping the parts committed before; `dataset.options` reach the builder (a `;` CSV), are
checked against its config class at validate and at run time, are refused for a save_to_disk directory, and are part
of the run's identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.exceptions import DatasetGenerationError
from pandas.errors import ParserError

import jobs
from jobs import run
from pipeline_core.cli import run_cli
from pipeline_core.data.files import holds_no_rows
from pipeline_core.data.parse_errors import InvalidText, check_text, is_parse_error
from pipeline_core.output.run_dir import part_name

STREAMING = pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
TEXT = "the quick brown fox"


def data_job(directory: Path, model: Path, path: str, data_files=None, options=None, streaming: bool = True,
             keep=("id",), rows_per_part: int = 4) -> Path:
    dataset = {"path": path, "streaming": streaming, "keep_columns": list(keep)}
    if data_files is not None:
        dataset["data_files"] = data_files
    if options is not None:
        dataset["options"] = options
    return jobs.write_manifest(directory / "job.yaml", jobs.manifest(
        model, dataset=dataset, batching={"max_tokens": 256, "num_workers": 0},
        output={"path": directory / "out", "rows_per_part": rows_per_part}))


def json_lines(path: Path, count: int, prefix: str = "r", bad: dict[int, bytes] | None = None) -> Path:
    """`count` rows {id, text} one a line; `bad`: {1-based line: its bytes instead}."""
    lines = [json.dumps({"id": f"{prefix}{i}", "text": TEXT}).encode() for i in range(count)]
    for line, raw in (bad or {}).items():
        lines[line - 1] = raw
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def committed(out: Path) -> list[str]:
    """The parts a reader of OUTPUT sees."""
    return sorted(path.name for path in out.glob("*.parquet") if not path.name.startswith((".", "_")))


def error_line(err: str) -> str:
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err
    return line


# --- a file that cannot be parsed ------------------------------------------------------------------------------------

BAD_JSON_LINES = {  # line 12's bytes -> why the message gives
    "lone surrogate": (b'{"id": "r11", "text": "\\ud800"}',
                       "a lone surrogate \\ud800 in a string, which is not valid Unicode"),
    "cut in half": (b'{"id": "r11", "text": "the qu', "not valid JSON (Unterminated string starting at column 23)"),
    "not UTF-8": (b'{"id": "r11", "text": "the \xff\xfe fox"}', "bytes that are not valid utf-8 (b'\\xff' at byte 28)"),
}


@STREAMING
@pytest.mark.parametrize("case", list(BAD_JSON_LINES))
def test_a_json_line_that_cannot_be_parsed_exits_2_naming_the_file_and_line(tmp_path, tiny_models, capsys,
                                                                            streaming, case):
    raw, why = BAD_JSON_LINES[case]
    data = json_lines(tmp_path / "data.jsonl", 20, bad={12: raw})
    assert run(data_job(tmp_path, tiny_models.text_classifier, "json", str(data), streaming=streaming)) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: dataset 'json': {data}, line 12: {why}; fix or remove that line (a retry would "
                           "read the same bytes)")
    # whatever was committed holds rows before the bad one only: Arrow's JSON reader fails a whole block at once, and
    # lets bytes that are not UTF-8 through to the part check, which stops at part 2 (rows 8-11)
    parts = committed(tmp_path / "out")
    assert parts == ([part_name(0), part_name(1)] if case == "not UTF-8" else [])
    if parts:
        assert pq.read_table(tmp_path / "out")["id"].to_pylist() == [f"r{i}" for i in range(8)]


def test_a_bad_line_in_a_later_file_keeps_the_parts_committed_before_it(tmp_path, tiny_models, capsys):
    json_lines(tmp_path / "a.jsonl", 8, prefix="a")
    bad = json_lines(tmp_path / "b.jsonl", 20, prefix="b", bad={12: b'{"id": "b11", "text": "cut'})
    job = data_job(tmp_path, tiny_models.text_classifier, "json", str(tmp_path / "*.jsonl"))
    assert run(job) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: dataset 'json': {bad}, line 12: not valid JSON (Unterminated string starting at column 23); fix or "
        "remove that line (a retry would read the same bytes); committed parts are kept")
    out = tmp_path / "out"
    assert committed(out) == [part_name(0), part_name(1)]
    assert pq.read_table(out).to_pandas().sort_values("row_id")["id"].tolist() == [f"a{i}" for i in range(8)]
    # fixing the file changes the input: the rerun names it rather than mixing parts of two inputs
    json_lines(bad, 20, prefix="b")
    assert run(job) == 2
    assert f"input files changed: {bad}" in capsys.readouterr().err
    assert run(job, "--fresh") == 0


def test_bytes_that_are_not_utf8_in_a_kept_column_never_reach_a_part(tmp_path, tiny_models, capsys):
    data = json_lines(tmp_path / "data.jsonl", 20, bad={12: b'{"id": "r\xff", "text": "the quick fox"}'})
    assert run(data_job(tmp_path, tiny_models.text_classifier, "json", str(data))) == 2
    assert f"{data}, line 12: bytes that are not valid utf-8 (b'\\xff' at byte 10)" in capsys.readouterr().err
    assert pq.read_table(tmp_path / "out")["id"].to_pylist() == [f"r{i}" for i in range(8)]


BAD_CSV = {  # the file's lines (a quoted field spans lines 3-4, so pandas' record count differs from the line)
    "a field too many": ('r9,the lazy dog,extra', "Expected 2 fields, saw 3"),
    "a quote never closed": ('r9,"the lazy dog', "EOF inside string"),
}


@STREAMING
@pytest.mark.parametrize("case", list(BAD_CSV))
def test_a_csv_line_the_parser_rejects_exits_2_naming_the_file_and_line(tmp_path, tiny_models, capsys, streaming,
                                                                        case):
    bad, why = BAD_CSV[case]
    data = tmp_path / "data.csv"
    data.write_text("id,text\nr0,the quick fox\nr1,\"the quick\nbrown fox\"\n"
                    + "".join(f"r{i},the quick fox\n" for i in range(2, 9)) + bad + "\nr10,the end\n")
    assert run(data_job(tmp_path, tiny_models.text_classifier, "csv", str(data), streaming=streaming)) == 2
    assert error_line(capsys.readouterr().err).startswith(
        f"error: dataset 'csv': {data}, line 12: {why}; fix or remove that line (a retry would read the same bytes)")


@pytest.mark.parametrize("error, unparsable", [
    (pa.ArrowInvalid("JSON parse error: Missing a closing quotation mark in string. in row 1"), True),
    (ParserError("Error tokenizing data. C error: Expected 2 fields in line 3, saw 4"), True),
    (InvalidText("column 'text' of row_id 3 holds bytes that are not valid UTF-8"), True),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), True),  # a CSV's bytes, or JSON's encoding
    (pa.ArrowInvalid("Parquet magic bytes not found in footer"), False),  # damaged, maybe still being written
    (OSError("connection reset"), False),
    (ConnectionError("refused"), False),
])
def test_only_errors_of_the_bytes_themselves_are_not_for_a_retry(error, unparsable):
    assert is_parse_error(error) is unparsable
    wrapped = DatasetGenerationError("An error occurred while generating the dataset")
    wrapped.__cause__ = error
    assert is_parse_error(wrapped) is unparsable  # a converted split's reader errors come wrapped


def test_the_part_check_names_the_first_row_and_column_that_are_not_utf8():
    good = pa.array(["a", "b", "c", "d", "e"])
    bad = pa.Array.from_buffers(pa.string(), 5, pa.array([b"a", b"b", b"c", b"\xff", b"e"], pa.binary()).buffers())
    table = pa.table({"id": good, "text": bad})
    with pytest.raises(InvalidText, match=r"^column 'text' of row_id 13 holds bytes that are not valid UTF-8$"):
        check_text(table, first_row=10)
    assert check_text(table.select(["id"]), 0).equals(table.select(["id"]))


# --- dataset.options -------------------------------------------------------------------------------------------------

SEMICOLONS = "id;text\nr0;the quick, brown fox\nr1;the lazy dog\n"


@STREAMING
def test_a_semicolon_csv_is_read_with_its_options(tmp_path, tiny_models, streaming):
    data = tmp_path / "data.csv"
    data.write_text("id;text\nr0;the quick, brown fox\nr1;'the lazy; dog'\nr2;people walk\n")
    job = data_job(tmp_path, tiny_models.text_classifier, "csv", str(data), options={"sep": ";", "quotechar": "'"},
                   streaming=streaming, keep=("id", "text"))
    assert run(job) == 0
    result = pq.read_table(tmp_path / "out").to_pandas()
    assert result["row_id"].tolist() == [0, 1, 2] and result["id"].tolist() == ["r0", "r1", "r2"]
    assert result["text"].tolist() == ["the quick, brown fox", "the lazy; dog", "people walk"]
    assert result["error"].isna().all()
    assert json.loads((tmp_path / "out" / "_batchrun.json").read_text())["identity"]["dataset.options"] == {
        "sep": ";", "quotechar": "'"}


def test_the_column_check_sees_the_columns_the_options_make(tmp_path, tiny_models, capsys):
    data = tmp_path / "data.csv"
    data.write_text(SEMICOLONS)
    job = data_job(tmp_path, tiny_models.text_classifier, "csv", str(data), options={"sep": ";"}, keep=("ids",))
    assert run(job) == 2  # streamed: the CSV's first row is read for its columns, with the options
    assert "has no column 'ids'; its columns are id, text (check" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_files_whose_column_types_differ_are_named_when_read_with_the_options(tmp_path, tiny_models, capsys):
    (tmp_path / "a.csv").write_text("id;text;n\nr0;the quick fox;1\n")
    (tmp_path / "b.csv").write_text("id;text;n\nr1;the lazy dog;\n")  # a blank: pandas reads n as floats
    job = data_job(tmp_path, tiny_models.text_classifier, "csv", str(tmp_path / "*.csv"), options={"sep": ";"},
                   keep=("id", "n"), streaming=False)
    assert run(job) == 1
    assert error_line(capsys.readouterr().err).endswith(
        f"({tmp_path / 'b.csv'} has n: double where {tmp_path / 'a.csv'} has n: int64; give every file the same "
        "column types)")


def test_parquet_with_options_is_read_through_datasets(tmp_path, tiny_models):
    data = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(10)], "n": list(range(10)), "text": [TEXT] * 10}), data,
                   row_group_size=3)
    job = data_job(tmp_path, tiny_models.text_classifier, "parquet", str(data),
                   options={"filters": [["n", ">=", 6]]})  # the row-group reader would read every row
    assert run(job) == 0
    assert pq.read_table(tmp_path / "out")["id"].to_pylist() == ["r6", "r7", "r8", "r9"]


UNKNOWN = ("dataset.options.sepp: the csv builder (CsvConfig) has no option 'sepp'; did you mean sep? (its options: "
           "chunksize, column_names, comment, converters, ")


def test_an_unknown_option_exits_2_at_validate_time_listing_the_builders_options(tmp_path, tiny_models, capsys):
    data = tmp_path / "data.csv"
    data.write_text(SEMICOLONS)
    options = {"sepp": ";", "name": "x", "features": None, "cache_dir": "/tmp", "quotechar": 1}
    for path, data_files in (("csv", str(data)), (str(data), None)):  # a builder, and one data file
        job = data_job(tmp_path, tiny_models.text_classifier, path, data_files, options=options)
        assert run_cli(["validate", str(job)]) == 2
        err = capsys.readouterr().err
        assert f"  - {UNKNOWN}" in err and ", quotechar, quoting, sep, skip_blank_lines," in err
        assert "  - dataset.options.name is not a builder option: set dataset.name instead" in err
        assert ("  - dataset.options.features is not a builder option: column types cannot be written in a "
                "manifest; remove it (the builder infers them)") in err
        assert ("  - dataset.options.cache_dir is not a builder option but an argument of load_dataset, which "
                "batchrun sets itself; remove it") in err
        assert "  - dataset.options.quotechar must be str, got 1 (CsvConfig.quotechar)" in err
    assert run_cli(["validate", str(data_job(tmp_path, tiny_models.text_classifier, "csv", str(data),
                                             options={"sep": ";"}))]) == 0


@STREAMING
def test_an_unknown_option_of_a_dataset_directory_exits_2_when_it_opens(tmp_path, tiny_models, capsys, streaming):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.csv").write_text(SEMICOLONS)
    job = data_job(tmp_path, tiny_models.text_classifier, str(tmp_path / "data"), options={"sepp": ";"},
                   streaming=streaming)
    assert run_cli(["validate", str(job)]) == 0  # datasets picks the builder from the files: not known before
    capsys.readouterr()
    assert run(job) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {UNKNOWN}")
    assert not (tmp_path / "out").exists()  # before OUTPUT is touched or the model loads


def test_options_on_a_save_to_disk_directory_exit_2(tmp_path, tiny_models, capsys):
    datasets.Dataset.from_dict({"id": ["r0"], "text": [TEXT]}).save_to_disk(str(tmp_path / "saved"))
    assert run(data_job(tmp_path, tiny_models.text_classifier, str(tmp_path / "saved"), options={"sep": ";"})) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: dataset.options cannot be used with dataset.path={str(tmp_path / 'saved')!r}, a directory written by "
        "save_to_disk: it is read as saved, with no builder to pass options to; remove the key")


def test_other_options_on_the_same_output_exit_2_naming_dataset_options(tmp_path, tiny_models, capsys):
    data = tmp_path / "data.csv"
    data.write_text(SEMICOLONS)
    job = data_job(tmp_path, tiny_models.text_classifier, "csv", str(data), options={"sep": ";"})
    assert run(job) == 0
    capsys.readouterr()
    assert run(job, "--set", "dataset.options.quotechar=\"'\"") == 2
    assert """  - dataset.options: {"sep": ";"} -> {"sep": ";", "quotechar": "'"}""" in capsys.readouterr().err


def test_a_job_without_options_keeps_the_identity_older_runs_recorded(tmp_path, tiny_models):
    """No options, no key: a _batchrun.json written before dataset.options existed still matches, and resumes."""
    data = json_lines(tmp_path / "data.jsonl", 6)
    job = data_job(tmp_path, tiny_models.text_classifier, "json", str(data))
    assert run(job, "--limit", "4") == 0  # one part of 4
    info = json.loads((tmp_path / "out" / "_batchrun.json").read_text())
    assert "dataset.options" not in info["identity"]
    (tmp_path / "out" / "_SUCCESS").unlink()
    (tmp_path / "out" / part_name(0)).unlink()
    assert run(job, "--limit", "4") == 0  # resumes the recorded run
    assert json.loads((tmp_path / "out" / "_batchrun.json").read_text())["fingerprint"] == info["fingerprint"]


@pytest.mark.parametrize("options, text, empty", [
    ({}, "id,text\n", True),
    ({"header": None}, "r0,the quick fox\n", False),  # no header line: its one line is a row
    ({"names": ["id", "text"]}, "r0,the quick fox\n", False),
    ({"skiprows": 2}, "exported by x\n\nid,text\n", True),
    ({"skiprows": 2}, "\n\nid,text\nr0,the quick fox\n", False),  # skipped lines count whether blank or not
    ({"skiprows": [0]}, "junk\nid,text\n", True),
    ({"header": 1}, "junk\nid,text\nr0,fox\n", False),
    ({"lineterminator": "~"}, "id,text~r0,fox~", False),  # lines not followed: never called empty
    ({"encoding": "utf-16"}, "id,text\n", True),
])
def test_a_csv_holds_no_rows_as_its_options_read_it(tmp_path, options, text, empty):
    path = tmp_path / "data.csv"
    path.write_text(text, encoding=options.get("encoding", "utf-8"))
    assert holds_no_rows("csv", str(path), options) is empty
    rows = pd.read_csv(path, **options) if "lineterminator" not in options else None
    assert rows is None or (len(rows) == 0) is empty  # pandas, which datasets reads with, agrees
