"""Small jobs for the end-to-end tests: rows of common words, a job manifest over them, and running it in process or as
the command.

Every word is one token of the tiny models' WordPiece vocabulary (tests/tiny_models.py), so a row of n words is
n + 2 tokens with [CLS] and [SEP].

A manifest is built here as a dict and written with `yaml.safe_dump`, never as YAML text: `manifest` is any job,
`job_manifest` the suite's usual one over `rows.jsonl` in a directory, `merged` lays changes over either (None
removes a key), `write_manifest` writes one, `edit_job` changes one already written. Only tests of the YAML itself
(bad manifests, `${VAR}` templating) write manifest text by hand.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline_core.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over the lazy dog while people walk through london".split()
SECTIONS = ("name", "task", "model", "dataset", "batching", "output", "errors", "evaluate")  # the key table's order
PLAN_ONLY_DATASET = {"path": "json", "data_files": "x.jsonl"}  # enough for a job that is only planned or initialised


def rows(count: int, seed: int = 1) -> list[dict]:
    """Rows {id, text} of 1 to 40 words, the same for a seed on every run."""
    generator = random.Random(seed)
    return [{"id": f"r{i:04d}", "text": " ".join(generator.choices(WORDS, k=generator.randint(1, 40)))}
            for i in range(count)]


SAMPLE_WORDS = ("the quick brown fox jumps over the lazy dog while a cat sleeps in the warm sun and "
                "people walk through the old city of london near the river on a quiet morning").split()


def sample_rows(count: int = 23) -> list[dict]:
    """Rows {id, text} of varied length (1 to ~60 words, every fourth one 1 to 5), the same on every run: the rows
    of the one-row-at-a-time references of test_run.py and of the run tests beside them."""
    generator = np.random.default_rng(0)
    sampled = []
    for index in range(count):
        length = int(generator.integers(1, 60)) if index % 4 else int(generator.integers(1, 6))
        words = [SAMPLE_WORDS[int(i)] for i in generator.integers(0, len(SAMPLE_WORDS), length)]
        sampled.append({"id": f"r{index:03d}", "text": " ".join(words)})
    return sampled


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` laid over it, mappings merged key by key; a change to None removes the key."""
    result = dict(base)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def plain(value):
    """`value` as YAML writes it back unchanged: paths as strings, tuples as lists."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def in_order(job: dict) -> dict:
    """The sections in the key table's order (pipeline_core/manifest/spec.py), any other key after them."""
    rank = {section: index for index, section in enumerate(SECTIONS)}
    return {key: job[key] for key in sorted(job, key=lambda key: rank.get(key, len(SECTIONS)))}


def manifest(checkpoint: str | Path | None = None, /, task: str = "text-classification", **sections) -> dict:
    """A job: `checkpoint` is the model's name, merged with the `model` section if one is given too; the dataset is
    PLAN_ONLY_DATASET unless given; any other section (batching, output, errors, evaluate, name) as given. A
    section given as None is left out."""
    model = sections.pop("model", None) or {}
    job = {"task": task, "model": merged({"name": checkpoint}, model) if checkpoint is not None else model,
           "dataset": PLAN_ONLY_DATASET, **sections}
    return plain(in_order({key: value for key, value in job.items() if value is not None}))


def job_manifest(directory: Path, checkpoint: str | Path, /, task: str = "text-classification", **changes) -> dict:
    """The suite's usual job: `directory`/rows.jsonl keeping only `id`, batches of at most 256 tokens and 8 rows in
    the main process, parts of 4 rows in `directory`/out, every row allowed to fail (max_error_rate 1), so a run's
    exit code says only how it ended. `changes` are merged over it (None removes a key or a whole section)."""
    usual = manifest(
        checkpoint, task=task,
        dataset={"path": "json", "data_files": directory / "rows.jsonl", "keep_columns": ["id"]},
        batching={"max_tokens": 256, "max_batch_size": 8, "num_workers": 0},
        output={"path": directory / "out", "rows_per_part": 4},
        errors={"max_error_rate": 1.0},
    )
    return in_order(merged(usual, plain(changes)))


def write_manifest(path: Path, job: dict) -> Path:
    """`job` as YAML in `path`, its keys in the order given."""
    path.write_text(yaml.safe_dump(plain(job), sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")
    return path


def read_manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def edit_job(job: Path, /, **changes) -> Path:
    """The manifest in `job` with `changes` merged over it (None removes a key), written back."""
    return write_manifest(job, in_order(merged(read_manifest(job), plain(changes))))


def write_rows(path: Path, data: list[dict]) -> Path:
    """`data` as JSON lines in `path`."""
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return path


def write_job(directory: Path, checkpoint: str | Path, data: list[dict], /, task: str = "text-classification",
              rows_per_part: int = 4, workers: int = 0, **changes) -> Path:
    """`directory`/job.yaml: job_manifest over `data` written as JSON lines beside it, in parts of `rows_per_part`
    with `workers` DataLoader workers; `changes` as for job_manifest, such as model={"pooling": "mean"}."""
    directory.mkdir(parents=True, exist_ok=True)
    write_rows(directory / "rows.jsonl", data)
    job = job_manifest(directory, checkpoint, task=task, batching={"num_workers": workers},
                       output={"rows_per_part": rows_per_part})
    return write_manifest(directory / "job.yaml", in_order(merged(job, plain(changes))))


def write_sample_job(directory: Path, checkpoint: str | Path, data: list[dict], /,
                     task: str = "text-classification", rows_per_part: int = 5, **changes) -> Path:
    """write_job as the tests over sample_rows write it: batches of at most 200 tokens and 4 rows, parts of 5 rows,
    and no errors section, so a single failed row makes the run exit 3 (errors.max_error_rate defaults to 0)."""
    job = write_job(directory, checkpoint, data, task=task, rows_per_part=rows_per_part,
                    batching={"max_tokens": 200, "max_batch_size": 4}, errors=None)
    return edit_job(job, **changes)


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
