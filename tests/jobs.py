"""Small jobs for the end-to-end tests: rows of common words, a job file over them, and running it in process or as
the command.

Every word is one token of the tiny models' WordPiece vocabulary (tests/tiny_models.py), so a row of n words is
n + 2 tokens with [CLS] and [SEP].
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline_core.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over the lazy dog while people walk through london".split()


def rows(count: int, seed: int = 1) -> list[dict]:
    """Rows {id, text} of 1 to 40 words, the same for a seed on every run."""
    generator = random.Random(seed)
    return [{"id": f"r{i:04d}", "text": " ".join(generator.choices(WORDS, k=generator.randint(1, 40)))}
            for i in range(count)]


def write_job(directory: Path, model: Path, data: list[dict], task: str = "text-classification",
              rows_per_part: int = 4, extra: str = "", workers: int = 0) -> Path:
    """`directory`/job.yaml over `data` written as JSON lines beside it, writing to `directory`/out; `extra` is
    more of the model section. Every row may fail (max_error_rate 1), so a run's exit code says only how it ended."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    job = directory / "job.yaml"
    job.write_text(
        f"task: {task}\nmodel:\n  name: '{model}'\n{extra}"
        f"dataset: {{path: json, data_files: '{directory / 'rows.jsonl'}', keep_columns: [id]}}\n"
        f"batching: {{max_tokens: 256, max_batch_size: 8, num_workers: {workers}}}\n"
        f"output: {{path: '{directory / 'out'}', rows_per_part: {rows_per_part}}}\n"
        "errors: {max_error_rate: 1.0}\n"
    )
    return job


def copy_job(reference_job: Path, directory: Path) -> Path:
    """The reference job and its rows in `directory`, writing to directory/out."""
    directory.mkdir()
    job = directory / "job.yaml"
    job.write_text(reference_job.read_text().replace(str(reference_job.parent), str(directory)))
    (directory / "rows.jsonl").write_text((reference_job.parent / "rows.jsonl").read_text())
    return job


def run(job: Path, *args: str) -> int:
    return run_cli(["run", str(job), "--no-progress", *args])


def start(job: Path, *args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`python -m pipeline_core run JOB.yaml`, the leader of its own process group (its DataLoader workers join it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline_core", "run", str(job), "--no-progress", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
    )


def output(job: Path) -> pd.DataFrame:
    return pd.read_parquet(job.parent / "out")
