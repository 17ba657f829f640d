"""`batchrun run` end to end on the tiny models, for what the output holds: each task's rows checked against a plain
one-row-at-a-time reference (`pooling`, `normalize`, the merged generation settings), the output tree and its columns
as readers see them, and rows that fail beside rows left unchanged.

What the runner does around the parts (the run info, logs, reruns, exit codes, the token budget) is in test_runner.py;
job options and run flags checked against a run without them are in test_run_options.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from tiny_models import SUMMARIZATION_PARAMS
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
)

from jobs import run, sample_rows, write_sample_job


def read(output: Path) -> pd.DataFrame:
    return pd.read_parquet(output)


def test_output_tree_row_order_and_readers(tmp_path, tiny_models):
    rows = sample_rows(23)
    job = write_sample_job(tmp_path, tiny_models.embedder, rows, task="feature-extraction")
    assert run(job) == 0
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "_SUCCESS", "_batchrun.json", *[f"_metrics-00000{index}.json" for index in range(5)], "_progress.json",
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet", "part-000003.parquet",
        "part-000004.parquet",
    ]
    table = pads.dataset(out).to_table()
    assert table.column_names == ["row_id", "id", "embedding", "error"]
    assert table.column("row_id").to_pylist() == list(range(23))
    assert table.column("id").to_pylist() == [row["id"] for row in rows]
    assert table.column("error").null_count == 23
    assert len(read(out)) == 23
    # datasets' data_dir takes every file, _SUCCESS and _batchrun.json included (docs/reading-results.md): glob
    # the parts
    loaded = datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train")
    assert loaded["row_id"] == list(range(23))
    info = json.loads((out / "_batchrun.json").read_text())
    assert info["device"] == "cpu" and info["dtype"] == "float32" and len(info["fingerprint"]) == 16
    assert info["finished"] and info["manifest"]["task"] == "feature-extraction"
    progress = json.loads((out / "_progress.json").read_text())
    assert (progress["parts_done"], progress["rows_done"], progress["complete"]) == (5, 23, True)


@pytest.mark.parametrize("pooling, normalize", [("mean", False), ("cls", True)])
def test_embeddings_match_one_row_at_a_time(tmp_path, tiny_models, pooling, normalize):
    rows = sample_rows()
    job = write_sample_job(tmp_path, tiny_models.embedder, rows, task="feature-extraction",
                           model={"pooling": pooling, "normalize": normalize})
    assert run(job) == 0
    got = np.stack(read(tmp_path / "out")["embedding"].to_numpy())
    assert got.dtype == np.float32
    model = AutoModel.from_pretrained(tiny_models.embedder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    for index, row in enumerate(rows):
        with torch.no_grad():
            hidden = model(**tokenizer(row["text"], return_tensors="pt")).last_hidden_state[0]
        vector = hidden.mean(dim=0) if pooling == "mean" else hidden[0]
        if normalize:
            vector = vector / vector.norm()
        np.testing.assert_allclose(got[index], vector.numpy(), atol=1e-5, rtol=1e-5)


def test_text_classification_matches_one_row_at_a_time(tmp_path, tiny_models):
    rows = sample_rows()
    assert run(write_sample_job(tmp_path, tiny_models.text_classifier, rows)) == 0
    got = read(tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models.text_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.text_classifier)
    for index, row in enumerate(rows):
        with torch.no_grad():
            probabilities = model(**tokenizer(row["text"], return_tensors="pt")).logits[0].softmax(-1)
        assert got["label"][index] == model.config.id2label[int(probabilities.argmax())]
        assert got["score"][index] == pytest.approx(float(probabilities.max()), abs=1e-5)


def reference_entities(text, tokenizer, model) -> list[tuple]:
    """A plain reference: label every token, then merge runs of one entity type (B- starts a new one)."""
    encoding = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = encoding.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        probabilities = model(**encoding).logits[0].softmax(-1)
    spans = []
    for (start, end), token in zip(offsets, probabilities, strict=True):
        label = model.config.id2label[int(token.argmax())]
        if start == end or label == "O":
            spans.append(None)
            continue
        tag, kind = label.split("-", 1)
        if spans and spans[-1] is not None and spans[-1][0] == kind and tag != "B":
            spans[-1][2] = end
            spans[-1][3].append(float(token.max()))
        else:
            spans.append([kind, start, end, [float(token.max())]])
    return [(kind, text[start:end], start, end, sum(s) / len(s)) for kind, start, end, s in filter(None, spans)]


def test_token_classification_matches_one_row_at_a_time(tmp_path, tiny_models):
    rows = sample_rows()
    assert run(write_sample_job(tmp_path, tiny_models.token_classifier, rows, task="token-classification")) == 0
    got = read(tmp_path / "out")
    model = AutoModelForTokenClassification.from_pretrained(tiny_models.token_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.token_classifier)
    found = 0
    for index, row in enumerate(rows):
        expected = reference_entities(row["text"], tokenizer, model)
        entities = list(got["entities"][index])
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [e[:4] for e in expected]
        for entity, reference in zip(entities, expected, strict=True):
            assert entity["score"] == pytest.approx(reference[4], abs=1e-5)
        found += len(entities)
    assert found > 0  # the tiny model's random weights do tag some tokens


def hand_settings(model, **settings) -> GenerationConfig:
    """The model's own generation config with `settings` laid over it, written here and never taken from batchrun,
    so a merging bug in batchrun cannot hide in the reference too."""
    config = copy.deepcopy(model.generation_config)
    config.update(**settings)
    return config


def reference_generation(model, tokenizer, prompts, settings) -> tuple[list[str], list[int]]:
    """generate() one prompt at a time, no padding anywhere: the texts and how many new tokens each got."""
    texts, counts = [], []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=settings)
        # a decoder-only model returns the prompt first; a seq2seq model its decoder start token
        new = output[0, inputs["input_ids"].shape[1]:] if not model.config.is_encoder_decoder else output[0, 1:]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        counts.append(len(new))
    return texts, counts


def test_summarization_greedy_batched_equals_one_row_at_a_time(tmp_path, tiny_models):
    rows = sample_rows()
    manifest = {"num_beams": 1, "do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6}
    job = write_sample_job(tmp_path, tiny_models.seq2seq, rows, task="summarization", model={"generation": manifest})
    assert run(job) == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models.seq2seq).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.seq2seq)
    task_params = dict(SUMMARIZATION_PARAMS["summarization"])
    prefix = task_params.pop("prefix")
    settings = hand_settings(model, **{**task_params, **manifest})  # the manifest's num_beams=1 over the task's 2
    assert settings.num_beams == 1 and prefix == "summarize: "
    expected, counts = reference_generation(model, tokenizer, [prefix + row["text"] for row in rows], settings)
    assert counts == [6] * len(rows)  # min_new_tokens = max_new_tokens = 6, not the task's max_length=40
    assert read(tmp_path / "out")["summary_text"].tolist() == [text.strip() for text in expected]


def test_text_generation_returns_only_new_text_and_matches_one_row_at_a_time(tmp_path, tiny_models):
    rows = sample_rows()
    generation = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    job = write_sample_job(tmp_path, tiny_models.causal_lm, rows, task="text-generation",
                           model={"generation": generation})
    assert run(job) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    assert tokenizer.pad_token_id is None  # GPT-2 style: batches are padded with EOS
    settings = hand_settings(model, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    expected, counts = reference_generation(model, tokenizer, [row["text"] for row in rows], settings)
    assert counts == [6] * len(rows)  # not batchrun's default of 256 new tokens
    got = read(tmp_path / "out")["generated_text"].tolist()
    assert got == expected
    assert not any(text.startswith(row["text"]) and row["text"] for text, row in zip(got, rows, strict=True))


def test_bad_rows_are_recorded_and_good_rows_unchanged(tmp_path, tiny_models):
    rows = sample_rows(12)
    bad = [dict(row) for row in rows]
    bad[3]["text"], bad[7]["text"] = None, ""
    assert run(write_sample_job(tmp_path, tiny_models.text_classifier, rows)) == 0
    clean = read(tmp_path / "out")
    (tmp_path / "bad").mkdir()
    assert run(write_sample_job(tmp_path / "bad", tiny_models.text_classifier, bad),
               "--set", "errors.max_error_rate=0.5") == 0
    got = read(tmp_path / "bad" / "out")
    assert got["error"][3] == "input column 'text' is null"
    assert pd.isna(got["label"][3]) and pd.isna(got["score"][3])
    assert pd.isna(got["error"][7]) and got["label"][7] in ("negative", "neutral", "positive")  # empty text is text
    good = [index for index in range(12) if index not in (3, 7)]
    pd.testing.assert_frame_equal(got.iloc[good].reset_index(drop=True), clean.iloc[good].reset_index(drop=True))


def test_a_column_that_is_not_text_fails_its_rows(tmp_path, tiny_models):
    rows = [{**row, "number": index} for index, row in enumerate(sample_rows(4))]
    job = write_sample_job(tmp_path, tiny_models.text_classifier, rows)
    assert run(job, "--set", "dataset.input_column=number", "--set", "errors.max_error_rate=1") == 0
    assert read(tmp_path / "out")["error"].tolist() == ["input column 'number' holds a number, not text"] * 4


def test_without_keep_columns_the_output_is_row_id_task_columns_and_error(tmp_path, tiny_models):
    job = write_sample_job(tmp_path, tiny_models.embedder, sample_rows(7), task="feature-extraction",
                           dataset={"keep_columns": None})
    assert run(job) == 0
    table = pads.dataset(tmp_path / "out").to_table()
    assert table.column_names == ["row_id", "embedding", "error"]
    assert table.column("row_id").to_pylist() == list(range(7))
