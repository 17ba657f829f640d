"""Loading good manifests: defaults, `${VAR}` templating, `--set` overrides, and the key table's derivatives."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline_core.manifest import load_job
from pipeline_core.manifest.schema import render_key_table, render_schema
from pipeline_core.manifest.spec import KEYS

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "task: text-classification\nmodel: {name: m}\ndataset: {path: csv, data_files: rows.csv}\n"


def write(tmp_path: Path, text: str, name: str = "nightly-eval.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_fill_every_key_in_table_order(tmp_path):
    job = load_job(write(tmp_path, MINIMAL), environ={})
    assert job.config == {
        "name": "nightly-eval",
        "task": "text-classification",
        "model": {"name": "m", "revision": None, "dtype": "auto", "device": "auto", "device_map": None,
                  "trust_remote_code": False, "generation": {}, "prompt": None, "chat_template": False,
                  "pooling": None, "normalize": None, "prompt_name": None, "sentence_transformers": True,
                  "engine": {"kind": "transformers", "command": None, "url": None, "args": [], "api": None,
                             "max_concurrency": 64, "request_timeout": 600, "retries": 6, "restarts": 2,
                             "startup_timeout": 900, "request": {}, "api_key": None, "headers": {}}},
        "dataset": {"path": "csv", "name": None, "data_files": "rows.csv", "options": {}, "split": "train",
                    "revision": None, "streaming": True, "input_column": "text", "image_column": "image",
                    "keep_columns": [], "storage_options": {}},
        "batching": {"max_batch_size": 64, "max_tokens": "auto", "max_length": None, "num_workers": "auto"},
        "output": {"path": "outputs/nightly-eval", "storage_options": {}, "rows_per_part": 4096,
                   "compression": "zstd"},
        "errors": {"on_error": "record", "max_error_rate": 0.0},
        "evaluate": {"reference_column": None, "metrics": None},
    }
    assert job.get("batching.max_tokens") == "auto"


def test_name_sets_the_default_output_path(tmp_path):
    job = load_job(write(tmp_path, "name: weekly\n" + MINIMAL), environ={})
    assert (job.get("name"), job.get("output.path")) == ("weekly", "outputs/weekly")


def test_empty_sections_and_generation_read_as_defaults(tmp_path):
    text = "task: summarization\nmodel:\n  name: m\n  generation:\ndataset: {path: json}\nbatching:\n"
    job = load_job(write(tmp_path, text), environ={})
    assert job.get("model.generation") == {}
    assert job.get("batching.max_batch_size") == 64


def test_environment_templating(tmp_path):
    text = """\
task: feature-extraction
model: {name: '${MODEL_DIR}/ckpt', revision: '${REV:-main}'}
dataset: {path: csv, data_files: '${DAY}.csv', streaming: '${STREAM}', keep_columns: ['${KEEP}']}
batching: {max_tokens: '${TOKENS}', max_length: '${MAXLEN:-512}'}
output: {path: 'runs/$${literal}/${DAY}'}
"""
    env = {"MODEL_DIR": "/models", "TOKENS": "8192", "DAY": "2026-11-29", "STREAM": "false", "KEEP": "id"}
    job = load_job(write(tmp_path, text), environ=env)
    assert job.get("model.name") == "/models/ckpt"
    assert job.get("model.revision") == "main"
    # a whole-value reference on a non-text key takes the YAML type; text keys stay text
    assert job.get("batching.max_tokens") == 8192
    assert job.get("batching.max_length") == 512
    assert job.get("dataset.streaming") is False
    assert job.get("dataset.data_files") == "2026-11-29.csv"
    assert job.get("dataset.keep_columns") == ["id"]
    assert job.get("output.path") == "runs/${literal}/2026-11-29"


def test_numeric_looking_text_stays_text(tmp_path):
    text = MINIMAL.replace("{name: m}", "{name: m, revision: '${REV}'}")
    job = load_job(write(tmp_path, text), environ={"REV": "1234"})
    assert job.get("model.revision") == "1234"


def test_overrides_apply_in_order_and_parse_yaml(tmp_path):
    overrides = [
        "batching.max_tokens=8192",
        "model.generation.num_beams=4",
        "model.generation={max_new_tokens: 16, num_beams: 2}",
        "model.generation.do_sample=false",
        "dataset.keep_columns=[id, title]",
        "model.device=cuda:1",
        "model.device=-1",
        "model.prompt=Summarize: {text}",
        "model.revision=007",
        "errors.max_error_rate=0.25",
    ]
    job = load_job(write(tmp_path, MINIMAL), overrides, environ={})
    assert job.get("batching.max_tokens") == 8192
    assert job.get("model.generation") == {"max_new_tokens": 16, "num_beams": 2, "do_sample": False}
    assert job.get("dataset.keep_columns") == ["id", "title"]
    assert job.get("model.device") == -1
    # text keys keep the text as typed, even where YAML would read a mapping or a number
    assert job.get("model.prompt") == "Summarize: {text}"
    assert job.get("model.revision") == "007"
    assert job.get("errors.max_error_rate") == 0.25


def test_override_may_use_the_environment(tmp_path):
    job = load_job(write(tmp_path, MINIMAL), ["output.path=/data/${RUN_ID}"], environ={"RUN_ID": "r7"})
    assert job.get("output.path") == "/data/r7"


def test_committed_schema_is_current():
    committed = (ROOT / "manifests" / "job.schema.json").read_text()
    regenerate = "python -m pipeline_core.manifest.schema > manifests/job.schema.json"
    assert committed == render_schema(), f"stale schema; regenerate with: {regenerate}"


def test_docs_key_reference_is_current():
    page = (ROOT / "docs" / "manifest.md").read_text()
    paste = "paste `python -m pipeline_core.manifest.schema --markdown` over the table in docs/manifest.md"
    assert render_key_table() in page, paste


def test_schema_names_every_key_with_its_default():
    schema = json.loads(render_schema())
    for key in KEYS:
        node = schema
        for part in key.path.split("."):
            node = node["properties"][part]
        assert node["description"] == key.help
        if not key.required and key.path not in ("name", "output.path"):
            assert node["default"] == key.default
    assert set(schema["required"]) == {"task", "model", "dataset"}


@pytest.mark.parametrize("job_file", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_jobs_validate_and_match_the_schema(job_file):
    load_job(job_file, environ={})
    jsonschema.validate(yaml.safe_load(job_file.read_text()), json.loads(render_schema()))


def test_schema_rejects_what_validation_rejects():
    schema = json.loads(render_schema())
    bad = yaml.safe_load(MINIMAL + "batching: {max_tokens: -5, max_token: 3}\n")
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    assert len(errors) == 2
