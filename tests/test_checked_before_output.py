"""Everything a job can know before its first part is checked before OUTPUT is touched (issue 28): the model's files,
the task's model class, the device, the chat template and the length limit, by `plan` and by `run` (also as a shard),
each an exit 2 naming the key and the fix, with no weights loaded. And a start that committed no part never blocks the
next start of the fixed job: a `_batchrun.json` with no part under it, and no live process, is not a run to protect.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from output_files import write_record

from jobs import edit_job, rows, run, write_job
from pipeline_core.cli import run_cli
from pipeline_core.engines import in_process
from pipeline_core.errors import UsageError
from pipeline_core.output.run_dir import RunDir
from pipeline_core.output.store import LocalStore


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any weights would load: the checks under test must come first."""
    monkeypatch.setattr(in_process, "initialize", lambda *args: pytest.fail("the model was loaded"))


def plan(job: Path) -> int:
    return run_cli(["plan", str(job)])


def assert_refused_before_output(job: Path, capsys, *words: str, shard: bool = True) -> str:
    """plan and run (and a shard's run) exit 2 naming `words`, and OUTPUT was never created."""
    assert plan(job) == 2
    assert run(job) == 2
    if shard:
        assert run(job, "--num-shards", "2", "--shard-index", "1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    assert not (job.parent / "out").exists()
    return err


def template_free_copy(model: Path, directory: Path) -> Path:
    """The tiny GPT-2 with its chat template removed (a base checkpoint)."""
    copy = shutil.copytree(model, directory)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def test_a_chat_template_the_tokenizer_lacks_exits_2_before_output(tmp_path, tiny_models, capsys, no_weights):
    model = template_free_copy(tiny_models.causal_lm, tmp_path / "base-model")
    job = write_job(tmp_path, model, rows(6), task="text-generation", model={"chat_template": True})
    assert_refused_before_output(job, capsys, f"model.chat_template is true, but the tokenizer of '{model}' has no "
                                              "chat template", "set model.chat_template: false")


def test_max_length_above_the_models_positions_exits_2_before_output(tmp_path, tiny_models, capsys, no_weights):
    job = write_job(tmp_path, tiny_models.embedder, rows(6), task="feature-extraction")
    edit_job(job, batching={"max_length": 100000})
    assert run_cli(["validate", str(job)]) == 0  # the manifest alone cannot know the model's limit
    assert_refused_before_output(job, capsys, "batching.max_length=100000 is above the model's input limit of 512 "
                                              "tokens", "set it to 512 or less, or null")


def test_max_length_at_the_models_limit_runs(tmp_path, tiny_models):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(3))
    edit_job(job, batching={"max_tokens": 2048, "max_length": 512})
    assert run(job) == 0


def test_a_decoder_needs_room_for_its_new_tokens_within_its_positions(tmp_path, tiny_models, capsys, no_weights):
    job = write_job(tmp_path, tiny_models.causal_lm, rows(3), task="text-generation",
                    model={"generation": {"max_new_tokens": 24}})
    edit_job(job, batching={"max_length": 500})
    assert_refused_before_output(job, capsys, "batching.max_length=500 leaves no room for the 24 new tokens",
                                 "set it to 488 or less", shard=False)


@pytest.mark.parametrize("name", ["typo", "no-weights", "cut-short", "missing-shard"])
def test_a_model_directory_that_cannot_load_exits_2_before_output(tmp_path, tiny_models, capsys, no_weights, name):
    model = tmp_path / "model"
    if name != "typo":
        shutil.copytree(tiny_models.text_classifier, model)
        weights = model / "model.safetensors"
    if name == "no-weights":
        weights.unlink()
        expected = "holds no weights (none of model.safetensors, model.safetensors.index.json"
    elif name == "cut-short":
        os.truncate(weights, weights.stat().st_size - 100)
        expected = f"model.safetensors is cut short: {weights.stat().st_size} bytes where its tensors need"
    elif name == "missing-shard":
        weights.rename(model / "model-00001-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        expected = "model-00002-of-00002.safetensors is missing; copy or download the model again"
    else:
        expected = "no such directory"
    job = write_job(tmp_path, model, rows(3))
    assert_refused_before_output(job, capsys, f"model.name='{model}'", expected)


def test_the_fixed_model_path_runs_without_fresh(tmp_path, tiny_models):
    job = write_job(tmp_path, tiny_models.text_classifier.parent / "text_clasifier", rows(3))
    assert run(job) == 2
    edit_job(job, model={"name": tiny_models.text_classifier.parent / "text_classifier"})
    assert run(job) == 0


def test_a_checkpoint_the_tasks_model_class_cannot_load_exits_2_before_output(tmp_path, tiny_models, capsys,
                                                                              no_weights):
    job = write_job(tmp_path, tiny_models.image_classifier, rows(3))  # a ViT for text-classification
    assert_refused_before_output(job, capsys, "is a 'vit' checkpoint, which AutoModelForSequenceClassification "
                                              "cannot load for text-classification")


def test_a_device_that_is_not_there_exits_2_before_output(tmp_path, tiny_models, capsys, no_weights):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(3), model={"device": "cuda:3"})
    assert_refused_before_output(job, capsys, "cuda:3")


# --- a start that committed no part is not a run to protect -----------------------------------------------------------

def broken_first_line(job: Path) -> None:
    """The job's input with its first line cut: the run starts, writes OUTPUT's record, and fails on part 0."""
    data = job.parent / "rows.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0][:-1], *lines[1:]]) + "\n")


def test_a_start_that_failed_before_its_first_part_never_blocks_the_fixed_job(tmp_path, tiny_models, caplog):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(6))
    good = (tmp_path / "rows.jsonl").read_text()
    broken_first_line(job)
    assert run(job) in (1, 2)
    out = tmp_path / "out"
    assert (out / "_batchrun.json").exists() and not list(out.glob("part-*"))  # OUTPUT was touched, nothing committed
    (tmp_path / "rows.jsonl").write_text(good)  # the fix changes the input's identity: another job now
    assert run(job) == 0
    assert "holds the start of another job" in caplog.text and "that committed no part; it is replaced" in caplog.text
    assert pd.read_parquet(out)["row_id"].tolist() == list(range(6))


def started_other_job(tmp_path: Path, tiny_models) -> Path:
    """OUTPUT holding the start of a job with another prompt, no part committed; the job under test in `job.yaml`."""
    other = write_job(tmp_path / "other", tiny_models.text_classifier, rows(6), model={"prompt": "About {text}"})
    broken_first_line(other)
    edit_job(other, output={"path": tmp_path / "out"})
    assert run(other) in (1, 2)
    return write_job(tmp_path, tiny_models.text_classifier, rows(6))


def test_a_start_of_another_job_with_a_live_process_is_still_refused(tmp_path, tiny_models, capsys):
    job = started_other_job(tmp_path, tiny_models)
    write_record(tmp_path / "out", "elsewhere-1", heartbeat_age=0.0)  # a process at work on another node
    assert run(job) == 2
    assert "holds a run of a different job" in capsys.readouterr().err
    assert (tmp_path / "out" / "_batchrun.json").exists()


def test_a_finished_run_of_another_job_with_no_parts_is_still_refused(tmp_path, tiny_models, capsys):
    job = started_other_job(tmp_path, tiny_models)
    (tmp_path / "out" / "_SUCCESS").write_bytes(b"")  # a finished run of an empty split: a run, whatever its size
    assert run(job) == 2
    assert "holds a run of a different job" in capsys.readouterr().err


def test_a_start_taken_over_by_another_job_at_the_same_moment_stops_before_loading(tmp_path, tiny_models):
    """Two jobs starting together on an abandoned OUTPUT: the one whose record came second finds OUTPUT's
    `_batchrun.json` is no longer its own once its process record is live, and stops with exit 2."""
    job = started_other_job(tmp_path, tiny_models)
    store = LocalStore(tmp_path / "out")
    recorded = json.loads((tmp_path / "out" / "_batchrun.json").read_text())["identity"]
    mine = dict(recorded, **{"model.prompt": None})
    with pytest.raises(UsageError, match="was taken by another job starting at the same moment"):
        RunDir(store).check_still_ours(mine)
    RunDir(store).check_still_ours(recorded)  # its own start: nothing to say
    assert run(job) == 0  # and the job itself, alone, replaces the abandoned start
