"""Every kind of bad job a user can write: exit 2, the key named, every problem at once, no traceback."""

from __future__ import annotations

import textwrap

import pytest

from pipeline_core.cli import run_cli

GOOD = """\
task: summarization
model:
  name: some/model
dataset:
  path: json
  data_files: data/articles.jsonl
"""

# (id, manifest text, extra CLI args, fragments every one of which the error must contain)
CASES = [
    ("yaml-syntax", "task: summarization\nmodel:\n  name: [unclosed\n", [], ["line 4", "invalid YAML"]),
    ("yaml-bad-indent", "task: summarization\n model: x\n", [], ["line 2", "invalid YAML"]),
    ("duplicate-key", GOOD + "task: text-generation\n", [], ["line 7", "duplicate key 'task'"]),
    ("not-a-mapping", "- task: summarization\n", [], ["must be a mapping of keys", "list"]),
    ("scalar-document", "just words\n", [], ["must be a mapping of keys"]),
    ("empty-file", "", [], ["is empty", "task, model.name and dataset.path"]),
    ("comments-only", "# nothing here\n", [], ["is empty"]),
    ("unknown-task", GOOD.replace("summarization", "sumarization"), [], ["task must be one of", "did you mean summarization?"]),
    ("missing-task", GOOD.replace("task: summarization\n", ""), [], ["task is required"]),
    ("missing-model-name", GOOD.replace("  name: some/model\n", "  dtype: auto\n"), [], ["model.name is required"]),
    ("missing-model-section", "task: summarization\ndataset: {path: json}\n", [], ["model.name is required"]),
    ("missing-dataset-path", GOOD.replace("  path: json\n", ""), [], ["dataset.path is required"]),
    ("section-not-mapping", GOOD + "batching: 64\n", [], ["batching must be a mapping", "64"]),
    ("unknown-top-key", GOOD + "tsk: x\n", [], ["tsk: unknown key", "did you mean task?"]),
    ("unknown-nested-key", GOOD + "batching: {max_token: 10}\n", [], ["batching.max_token", "did you mean batching.max_tokens?"]),
    ("key-in-wrong-section", GOOD.replace("  name: some/model\n", "  name: m\n  max_tokens: 5\n"), [],
     ["model.max_tokens", "did you mean batching.max_tokens?"]),
    ("wrong-type-int", GOOD + "batching: {max_tokens: lots}\n", [], ["batching.max_tokens must be auto or a positive integer", "'lots'"]),
    ("bool-is-not-int", GOOD + "batching: {max_batch_size: true}\n", [], ["batching.max_batch_size must be a positive integer"]),
    ("wrong-type-bool", GOOD.replace("  name: some/model\n", "  name: m\n  trust_remote_code: maybe\n"), [],
     ["model.trust_remote_code must be true or false, got 'maybe'"]),
    ("negative-number", GOOD + "batching: {max_tokens: -5}\n", [], ["batching.max_tokens must be auto or a positive integer, got -5"]),
    ("zero-rows-per-part", GOOD + "output: {rows_per_part: 0}\n", [], ["output.rows_per_part must be a positive integer, got 0"]),
    ("error-rate-above-one", GOOD + "errors: {max_error_rate: 1.5}\n", [], ["errors.max_error_rate must be a number from 0 to 1"]),
    ("negative-workers", GOOD + "batching: {num_workers: -1}\n", [], ["batching.num_workers must be auto or a non-negative integer, got -1"]),
    ("workers-word", GOOD + "batching: {num_workers: many}\n", [], ["batching.num_workers must be auto or a non-negative integer, got 'many'"]),
    ("bad-dtype", GOOD.replace("  name: some/model\n", "  name: m\n  dtype: fp16\n"), [], ["model.dtype must be one of auto, float32"]),
    ("bad-device", GOOD.replace("  name: some/model\n", "  name: m\n  device: gpu\n"), [], ["model.device must be", "'gpu'"]),
    ("device-below-minus-one", GOOD.replace("  name: some/model\n", "  name: m\n  device: -2\n"), [], ["model.device", "-2"]),
    ("bad-pooling", GOOD.replace("  name: some/model\n", "  name: m\n  pooling: median\n"), [], ["model.pooling must be null or one of mean, cls, max, mean_sqrt_len_tokens, weightedmean, lasttoken, none"]),
    ("bad-on-error", GOOD + "errors: {on_error: skip}\n", [], ["errors.on_error must be one of record, fail"]),
    ("bad-compression", GOOD + "output: {compression: zip}\n", [], ["output.compression must be one of"]),
    ("keep-columns-not-list", GOOD.replace("  path: json\n", "  path: json\n  keep_columns: id\n"), [],
     ["dataset.keep_columns must be a list of strings"]),
    ("keep-reserved-column", GOOD.replace("  path: json\n", "  path: json\n  keep_columns: [id, row_id]\n"), [],
     ["dataset.keep_columns holds 'row_id'"]),
    ("keep-task-column", GOOD.replace("  path: json\n", "  path: json\n  keep_columns: [summary_text]\n"), [],
     ["dataset.keep_columns holds 'summary_text'"]),
    ("bad-split", GOOD.replace("  path: json\n", "  path: json\n  split: 'train[:10'\n"), [], ["dataset.split must be"]),
    ("empty-model-name", GOOD.replace("some/model", "''"), [], ["model.name must be a non-empty string"]),
    ("unknown-generation-setting", GOOD.replace("  name: some/model\n", "  name: m\n  generation: {num_beam: 4}\n"), [],
     ["model.generation.num_beam", "did you mean model.generation.num_beams?"]),
    ("prompt-positional-field", GOOD.replace("  name: some/model\n", "  name: m\n  prompt: 'Summarize {}'\n"), [],
     ["model.prompt must name its columns"]),
    ("prompt-bad-braces", GOOD.replace("  name: some/model\n", "  name: m\n  prompt: 'Summarize {text'\n"), [],
     ["model.prompt is not a valid template"]),
    ("unset-env-var", GOOD.replace("some/model", "${BATCHRUN_TEST_UNSET_MODEL}"), [],
     ["model.name uses ${BATCHRUN_TEST_UNSET_MODEL}", "not set", "${BATCHRUN_TEST_UNSET_MODEL:-value}"]),
    ("malformed-env-reference", GOOD.replace("some/model", "${1BAD}"), [], ["model.name", "not a valid reference"]),
    ("set-without-equals", GOOD, ["--set", "batching.max_tokens"], ["--set 'batching.max_tokens' is not KEY=VALUE"]),
    ("set-unknown-key", GOOD, ["--set", "batching.max_token=8"], ["--set batching.max_token: unknown key",
                                                                  "did you mean batching.max_tokens?"]),
    ("set-bad-value", GOOD, ["--set", "batching.max_tokens=-1"], ["batching.max_tokens must be auto or a positive integer, got -1"]),
    ("set-bad-yaml", GOOD, ["--set", "model.generation={num_beams: 4"], ["--set model.generation", "not a valid YAML value"]),
    ("set-into-scalar", GOOD, ["--set", "task.sub=1"], ["--set task.sub: unknown key"]),
    ("set-below-non-mapping", GOOD.replace("  name: some/model\n", "  name: m\n  device_map: auto\n"),
     ["--set", "model.device_map.encoder=0"], ["--set model.device_map.encoder", "not a mapping"]),
    ("two-problems", GOOD + "batching: {max_tokens: -5}\ntsk: 1\n", [], ["2 problems", "batching.max_tokens", "tsk"]),
]


@pytest.mark.parametrize("text, args, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_manifest_exits_2_naming_the_key(tmp_path, capsys, monkeypatch, text, args, fragments):
    monkeypatch.delenv("BATCHRUN_TEST_UNSET_MODEL", raising=False)
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert run_cli(["validate", str(job), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith(f"error: {job}")
    for fragment in fragments:
        assert fragment in err


def test_good_manifest_is_ok(tmp_path, capsys):
    job = tmp_path / "good.yaml"
    job.write_text(GOOD)
    assert run_cli(["validate", str(job)]) == 0
    assert capsys.readouterr().out.startswith(f"{job}: ok (summarization with some/model")


@pytest.mark.parametrize(
    "name, body, fragment",
    [
        ("missing.yaml", None, "job file not found"),
        ("adir", "DIR", "is a directory"),
        ("latin1.yaml", b"task: r\xe9sum\xe9\n", "is not UTF-8"),
    ],
)
def test_unreadable_job_file(tmp_path, capsys, name, body, fragment):
    path = tmp_path / name
    if body == "DIR":
        path.mkdir()
    elif body is not None:
        path.write_bytes(body)
    assert run_cli(["validate", str(path)]) == 2
    assert fragment in capsys.readouterr().err


def test_every_problem_of_every_file_is_printed(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text(textwrap.dedent("""\
        task: summarisation
        model: {name: m, dtype: half}
        dataset: {path: json}
        batching: {max_tokens: 0, max_batch_size: 0}
        errors: {max_error_rate: -1}
    """))
    assert run_cli(["validate", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: ok" in out
    assert f"error: {bad}: 5 problems" in err
    for key in ("task", "model.dtype", "batching.max_tokens", "batching.max_batch_size", "errors.max_error_rate"):
        assert f"  - {key} must be" in err


@pytest.mark.parametrize("command", [["run"], ["plan"]])
def test_run_and_plan_refuse_a_bad_manifest_with_2(tmp_path, capsys, command):
    job = tmp_path / "job.yaml"
    job.write_text(GOOD + "batching: {max_tokens: -5}\n")
    assert run_cli([*command, str(job)]) == 2
    assert "batching.max_tokens must be auto or a positive integer, got -5" in capsys.readouterr().err
