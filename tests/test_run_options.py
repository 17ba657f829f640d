"""Documented claims about job options and run flags, each checked in a real run against a plain reference (the model on
one row, or a run without the option): token-budget batching, streamed and not streamed reading, split slicing and
`--limit`, `model.pooling: none`, Parquet codecs, truncation by `batching.max_length`, DataLoader workers, batch sizes
and workers that change between attempts, data_files forms; and remote code refused unless trusted.

What the output holds is in test_run.py; what the runner does around the parts is in test_runner.py.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import jobs
from pipeline_core import execute
from pipeline_core.cli import run_cli
from pipeline_core.tasks.classification import TextClassificationTask

# rows of 1 to 40 words; every word is one token of the tiny models' vocabulary, so a row has words + 2 tokens
rows = functools.partial(jobs.rows, seed=3)


def write_job(directory: Path, task: str, model: Path, data: list[dict], rows_per_part: int = 4) -> Path:
    """The usual job of tests/jobs.py with no errors section; the tests pass its variations as --set overrides."""
    return jobs.write_job(directory, model, data, task=task, rows_per_part=rows_per_part, errors=None)


def run(job: Path, output: Path, *overrides: str) -> int:
    settings = [argument for override in overrides for argument in ("--set", override)]
    return run_cli(["run", str(job), "--no-progress", "--output", str(output), *settings])


def part_files(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


@pytest.fixture
def batches(monkeypatch) -> list[dict]:
    """Per part a run computes: its index, the shapes of its batches as the workers packed them, and the real
    token lengths of the rows of each batch that went through the classifier's forward pass."""
    seen: list[dict] = []
    part_runner, forward = execute.PartRunner.run, TextClassificationTask.forward

    def watching_run(self, part):
        seen.append({"index": part.index, "packed": [tuple(batch["inputs"]["input_ids"].shape)
                                                     for batch in part.batches], "forward": []})
        return part_runner(self, part)

    def watching_forward(self, model, inputs):
        seen[-1]["forward"].append(inputs["attention_mask"].sum(dim=1).tolist())
        assert inputs["input_ids"].shape[1] == max(seen[-1]["forward"][-1])  # padded to its longest row only
        return forward(self, model, inputs)

    monkeypatch.setattr(execute.PartRunner, "run", watching_run)
    monkeypatch.setattr(TextClassificationTask, "forward", watching_forward)
    return seen


def token_lengths(model: Path, data: list[dict]) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [len(tokenizer(row["text"])["input_ids"]) for row in data]


def test_batches_keep_the_token_budget_longest_first_without_changing_values(tmp_path, tiny_models, batches):
    data = rows(24)
    lengths = token_lengths(tiny_models.text_classifier, data)
    job = write_job(tmp_path, "text-classification", tiny_models.text_classifier, data, rows_per_part=8)
    assert run(job, tmp_path / "budget", "batching.max_tokens=96", "batching.max_batch_size=4") == 0
    assert [part["index"] for part in batches] == [0, 1, 2]
    for part in batches:
        rows_of_part = lengths[8 * part["index"]:8 * part["index"] + 8]
        # as packed by the workers, and as run: both limits hold, or a row too long for the budget runs alone
        shapes = part["packed"], [(len(batch), max(batch)) for batch in part["forward"]]
        for where, found in zip(("packed", "run"), shapes, strict=True):
            over = [(size, width) for size, width in found if size > 4 or (size * width > 96 and size > 1)]
            assert over == [], f"part {part['index']}: batches (rows, width) over the limits as {where}"
        assert len(part["forward"]) > 1
        # every row once, the longest first across the part's batches
        assert [length for batch in part["forward"] for length in batch] == sorted(rows_of_part, reverse=True)
    assert any(len(batch) == 4 for part in batches for batch in part["forward"])  # the row limit binds too
    budgeted = pd.read_parquet(tmp_path / "budget")
    batches.clear()
    assert run(job, tmp_path / "unlimited", "batching.max_tokens=1000000", "batching.max_batch_size=64") == 0
    assert [len(part["forward"]) for part in batches] == [1, 1, 1]
    pd.testing.assert_frame_equal(budgeted, pd.read_parquet(tmp_path / "unlimited"))


@pytest.fixture
def streaming_seen(monkeypatch) -> list[bool]:
    """The `streaming` argument of each datasets.load_dataset call."""
    seen: list[bool] = []
    load_dataset = datasets.load_dataset

    def watching(*args, **kwargs):
        seen.append(kwargs["streaming"])
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", watching)
    return seen


def test_not_streaming_gives_the_streamed_output(tmp_path, tiny_models, streaming_seen):
    data = rows(10)
    job = write_job(tmp_path, "text-classification", tiny_models.text_classifier, data)
    assert run(job, tmp_path / "streamed") == 0
    assert run(job, tmp_path / "loaded", "dataset.streaming=false") == 0
    assert streaming_seen == [True, False]
    loaded = pd.read_parquet(tmp_path / "loaded")
    assert loaded["row_id"].tolist() == list(range(10))
    assert loaded["id"].tolist() == [row["id"] for row in data]
    pd.testing.assert_frame_equal(loaded, pd.read_parquet(tmp_path / "streamed"))


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("start, stop", [(3, 9), (8, None)])
def test_a_sliced_split_processes_exactly_its_rows(tmp_path, tiny_models, streaming_seen, streaming, start, stop):
    data = rows(12)
    job = write_job(tmp_path, "text-classification", tiny_models.text_classifier, data)
    assert run(job, tmp_path / "all") == 0
    split = f"train[{start}:{'' if stop is None else stop}]"
    assert run(job, tmp_path / "slice", f"dataset.split={split}", f"dataset.streaming={str(streaming).lower()}") == 0
    assert streaming_seen == [True, streaming]
    got = pd.read_parquet(tmp_path / "slice")
    source = data[start:stop]
    assert got["id"].tolist() == [row["id"] for row in source]
    # row ids are positions in the unsliced split, so the slice's rows are the whole run's rows, row ids included
    assert got["row_id"].tolist() == list(range(start, start + len(source)))
    everything = pd.read_parquet(tmp_path / "all").iloc[start:stop].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, everything)



def test_limit_takes_the_first_rows(tmp_path, tiny_models):
    job = jobs.write_sample_job(tmp_path, tiny_models.text_classifier, jobs.sample_rows())
    assert jobs.run(job, "--limit", "7") == 0
    assert pd.read_parquet(tmp_path / "out")["row_id"].tolist() == list(range(7))


def test_pooling_none_keeps_every_token_vector(tmp_path, tiny_models):
    data = rows(9)
    job = write_job(tmp_path, "feature-extraction", tiny_models.embedder, data)
    assert run(job, tmp_path / "out", "model.pooling=none", "batching.max_tokens=64") == 0
    got = pd.read_parquet(tmp_path / "out")["embedding"]
    model = AutoModel.from_pretrained(tiny_models.embedder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    lengths = set()
    for index, row in enumerate(data):
        with torch.no_grad():
            hidden = model(**tokenizer(row["text"], return_tensors="pt")).last_hidden_state[0].numpy()
        vectors = np.stack(got[index])
        assert vectors.shape == hidden.shape  # one vector per real token, padding left out
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, hidden, atol=1e-5, rtol=1e-5)
        lengths.add(len(hidden))
    assert len(lengths) > 3  # rows of many lengths, padded together in batches


@pytest.fixture(scope="module")
def zstd_run(tmp_path_factory, tiny_models) -> tuple[Path, pd.DataFrame]:
    directory = tmp_path_factory.mktemp("codecs")
    job = write_job(directory, "text-classification", tiny_models.text_classifier, rows(6))
    assert run(job, directory / "zstd") == 0
    assert codecs(directory / "zstd") == {"ZSTD"}
    return job, pd.read_parquet(directory / "zstd")


def codecs(output: Path) -> set[str]:
    """The codec of every column chunk of every part."""
    found = set()
    for path in part_files(output):
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            found |= {metadata.row_group(group).column(column).compression
                      for column in range(metadata.num_columns)}
    return found


@pytest.mark.parametrize("compression, codec", [("snappy", "SNAPPY"), ("gzip", "GZIP"), ("brotli", "BROTLI"),
                                                ("lz4", "LZ4"), ("none", "UNCOMPRESSED")])
def test_output_compression_sets_every_column_chunks_codec(tmp_path, zstd_run, compression, codec):
    job, expected = zstd_run
    assert run(job, tmp_path / compression, f"output.compression={compression}") == 0
    assert len(part_files(tmp_path / compression)) == 2
    assert codecs(tmp_path / compression) == {codec}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / compression), expected)


def test_max_length_truncates_inputs(tmp_path, tiny_models):
    data = rows(10)
    data[2]["text"], data[5]["text"] = "fox", "the lazy dog jumps"  # 3 tokens, and exactly 6 with [CLS] [SEP]
    job = write_job(tmp_path, "feature-extraction", tiny_models.embedder, data)
    assert run(job, tmp_path / "out", "batching.max_length=6") == 0
    got = np.stack(pd.read_parquet(tmp_path / "out")["embedding"].to_numpy())
    model = AutoModel.from_pretrained(tiny_models.embedder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)

    def mean_embedding(inputs) -> np.ndarray:
        with torch.no_grad():
            return model(**inputs).last_hidden_state[0].mean(dim=0).numpy()

    long_rows = 0
    for index, row in enumerate(data):
        truncated = tokenizer(row["text"], truncation=True, max_length=6, return_tensors="pt")
        np.testing.assert_allclose(got[index], mean_embedding(truncated), atol=1e-5, rtol=1e-5)
        whole = tokenizer(row["text"], return_tensors="pt")
        if whole["input_ids"].shape[1] > 6:
            long_rows += 1
            assert not np.allclose(got[index], mean_embedding(whole), atol=1e-3)
    assert 3 <= long_rows < len(data)


def test_batch_sizes_and_workers_may_change_between_attempts(tmp_path, tiny_models, batches):
    job = write_job(tmp_path, "text-classification", tiny_models.text_classifier, rows(20))
    first = ("batching.max_batch_size=2", "batching.max_tokens=40", "batching.num_workers=0")
    assert run(job, tmp_path / "out", *first) == 0
    uninterrupted = pd.read_parquet(tmp_path / "out")
    assert [part["index"] for part in batches] == [0, 1, 2, 3, 4]
    assert max(len(batch) for part in batches for batch in part["forward"]) == 2
    (tmp_path / "out" / "_SUCCESS").unlink()  # as if the first attempt had stopped after three parts
    for path in part_files(tmp_path / "out")[3:]:
        path.unlink()
    batches.clear()
    second = ("batching.max_batch_size=16", "batching.max_tokens=1000", "batching.num_workers=2")
    assert run(job, tmp_path / "out", *second) == 0  # not refused as another job's output
    assert sorted(part["index"] for part in batches) == [3, 4]  # two workers may hand in part 4 first
    assert [len(part["forward"]) for part in batches] == [1, 1]  # the second attempt's limits: one batch a part
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), uninterrupted)



def test_workers_give_the_same_output_as_the_main_process(tmp_path, tiny_models):
    rows = jobs.sample_rows(31)
    job = jobs.write_sample_job(tmp_path, tiny_models.text_classifier, rows, rows_per_part=4)
    assert jobs.run(job, "--set", "batching.num_workers=0") == 0
    alone = pd.read_parquet(tmp_path / "out")
    assert jobs.run(job, "--fresh", "--set", "batching.num_workers=2") == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), alone)
    assert jobs.run(job, "--fresh", "--set", "batching.num_workers=auto") == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), alone)


@pytest.mark.parametrize("form", ["list", "split-mapping"])
def test_data_files_as_a_list_or_a_mapping_of_splits(tmp_path, tiny_models, form):
    data = rows(9)
    job = write_job(tmp_path, "text-classification", tiny_models.text_classifier, data)
    assert run(job, tmp_path / "one-file") == 0
    halves = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    for half, chunk in zip(halves, (data[:4], data[4:]), strict=True):
        half.write_text("".join(json.dumps(row) + "\n" for row in chunk))
    files = [str(half) for half in halves]
    if form == "list":
        overrides = [f"dataset.data_files={json.dumps(files)}"]
    else:  # the rows of the other split are not read
        other = tmp_path / "other.jsonl"
        other.write_text("".join(json.dumps(row) + "\n" for row in rows(5, seed=9)))
        overrides = [f"dataset.data_files={json.dumps({'test': files, 'train': str(other)})}", "dataset.split=test"]
    assert run(job, tmp_path / form, *overrides) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / form), pd.read_parquet(tmp_path / "one-file"))


def test_remote_code_is_refused_unless_trusted(tmp_path, capsys):
    model = tmp_path / "custom-model"
    model.mkdir()
    # a checkpoint whose classes live in its own repository: loading them means running its code
    (model / "config.json").write_text(json.dumps({"model_type": "shout", "auto_map": {
        "AutoConfig": "configuration_shout.ShoutConfig", "AutoModel": "modeling_shout.ShoutModel"}}))
    (model / "configuration_shout.py").write_text("raise SystemExit('custom code ran')\n")
    job = write_job(tmp_path, "feature-extraction", model, rows(2))
    assert run_cli(["plan", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"model.name={str(model)!r} cannot be loaded" in err and "trust_remote_code=True" in err
    assert "Traceback" not in err
