"""Stage 4: generation settings merged model < task defaults < task_specific_params < manifest, and isolated."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from tiny_models import SUMMARIZATION_PARAMS
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig

import jobs
from pipeline_core.cli import run_cli
from pipeline_core.errors import UsageError
from pipeline_core.initializer.generation import (
    TASK_DEFAULTS,
    align_special_tokens,
    generation_settings,
    isolate_generation_config,
)


def stand_in_model(generation: dict, task_params: dict | None = None):
    return SimpleNamespace(
        generation_config=GenerationConfig(**generation),
        config=SimpleNamespace(task_specific_params=task_params),
    )


def test_each_layer_overrides_the_one_below():
    model = stand_in_model(
        {"num_beams": 1, "length_penalty": 0.5, "no_repeat_ngram_size": 2, "early_stopping": False},
        {"summarization": {"prefix": "summarize: ", "num_beams": 2, "no_repeat_ngram_size": 3, "max_new_tokens": 60}},
    )
    config, prefix = isolate_generation_config(model, "summarization", {"num_beams": 4})
    assert prefix == "summarize: "
    assert config.num_beams == 4  # manifest over task_specific_params
    assert config.no_repeat_ngram_size == 3  # task_specific_params over the model
    assert config.max_new_tokens == 60  # task_specific_params over batchrun's task default
    assert config.length_penalty == 0.5  # the model's, untouched by later layers
    assert config.early_stopping is False


def test_task_default_applies_only_where_the_model_leaves_the_length_unset():
    config, _ = isolate_generation_config(stand_in_model({}), "text-generation", {})
    assert config.max_new_tokens == TASK_DEFAULTS["text-generation"]["max_new_tokens"]
    tuned, _ = isolate_generation_config(stand_in_model({"max_length": 142}), "summarization", {})
    assert (tuned.max_length, tuned.max_new_tokens) == (142, None)


def test_task_params_of_another_task_are_ignored():
    model = stand_in_model({}, {"translation_en_to_de": {"prefix": "translate: ", "num_beams": 9}})
    config, prefix = isolate_generation_config(model, "summarization", {})
    assert prefix is None and config.num_beams is None


def test_non_generation_keys_of_task_params_are_skipped_and_logged(caplog):
    model = stand_in_model({}, {"summarization": {"prefix": "s: ", "min_length": 5, "bad_idea": 1}})
    with caplog.at_level(logging.INFO, logger="batchrun"):
        config, _ = isolate_generation_config(model, "summarization", {})
    assert config.min_length == 5
    assert "ignoring bad_idea" in caplog.text


def test_invalid_manifest_setting_names_the_key():
    with pytest.raises(UsageError, match=r"model.generation: .*max_new_tokens.* must be greater than 0"):
        isolate_generation_config(stand_in_model({}), "summarization", {"max_new_tokens": 0})


def test_incoherent_flags_are_left_to_generate_as_transformers_does():
    # many hub checkpoints ship temperature without do_sample; generate() only warns, so batchrun does too
    config, _ = isolate_generation_config(stand_in_model({"temperature": 0.7}), "text-generation", {})
    assert config.temperature == 0.7
    config, _ = isolate_generation_config(stand_in_model({}), "text-generation", {"top_k": 5})
    assert config.top_k == 5


def test_two_pipelines_over_one_model_keep_separate_settings(tiny_models):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models.seq2seq)
    before = model.generation_config.to_dict()
    first, _ = isolate_generation_config(model, "summarization", {"num_beams": 3, "max_new_tokens": 5})
    second, _ = isolate_generation_config(model, "summarization", {"num_beams": 1})
    first.max_new_tokens = 99
    assert (first.num_beams, second.num_beams) == (3, 1)
    assert second.max_new_tokens != 99
    assert model.generation_config.to_dict() == before
    assert first is not model.generation_config and second is not model.generation_config


def test_seq2seq_fixture_prefix_and_lengths(tiny_models):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models.seq2seq)
    config, prefix = isolate_generation_config(model, "summarization", {"num_beams": 1})
    params = model.config.task_specific_params["summarization"]
    assert prefix == params["prefix"]
    assert config.max_length == params["max_length"] and config.num_beams == 1


def test_causal_lm_without_pad_token_pads_with_eos(tiny_models, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    assert tokenizer.pad_token is None
    before = model.generation_config.to_dict()
    config, _ = isolate_generation_config(model, "text-generation", {})
    assert config.pad_token_id is None  # the fixture's model sets none, so align_special_tokens must choose one
    with caplog.at_level(logging.INFO, logger="batchrun"):
        align_special_tokens(config, tokenizer, is_causal=True)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert config.pad_token_id == tokenizer.eos_token_id
    assert "padding with its EOS token" in caplog.text
    # the pipeline's copy got the pad token; the model's own settings did not
    assert config is not model.generation_config
    assert model.generation_config.to_dict() == before
    assert model.generation_config.pad_token_id is None


def test_config_without_pad_takes_the_tokenizers(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.seq2seq)
    config = GenerationConfig()
    align_special_tokens(config, tokenizer, is_causal=False)
    assert config.pad_token_id == tokenizer.pad_token_id is not None
    assert config.eos_token_id == tokenizer.eos_token_id


def test_config_pad_token_wins_over_the_tokenizers(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.seq2seq)
    config = GenerationConfig(pad_token_id=7)
    align_special_tokens(config, tokenizer, is_causal=False)
    assert config.pad_token_id == 7


def test_plan_shows_only_settings_that_differ_from_generate_defaults():
    assert generation_settings(None) is None
    assert generation_settings(GenerationConfig(num_beams=4, max_new_tokens=9)) == {"num_beams": 4, "max_new_tokens": 9}


# The merge order as a real run shows it, against settings written here from the fixture's known facts.


@pytest.mark.parametrize(
    "manifest, new_tokens",
    [({}, SUMMARIZATION_PARAMS["summarization"]["max_length"] - 1), ({"max_new_tokens": 5}, 5)],
    ids=["task_params_over_the_model", "manifest_over_task_params"],
)
def test_summarization_run_follows_the_merge_order(tmp_path, tiny_models, manifest, new_tokens):
    rows = ["the quick brown fox", "a cat sleeps in the warm sun", "london"]
    data = jobs.write_rows(tmp_path / "rows.jsonl", [{"text": text} for text in rows])
    job = jobs.write_manifest(tmp_path / "job.yaml", jobs.manifest(
        tiny_models.seq2seq, task="summarization", model={"generation": manifest},
        dataset={"path": "json", "data_files": data}, batching={"max_batch_size": 2, "num_workers": 0},
        output={"path": tmp_path / "out"}))
    assert run_cli(["run", str(job), "--no-progress"]) == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models.seq2seq).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.seq2seq)
    assert model.generation_config.max_length == 20  # the model's own limit, which task_specific_params overrides
    task_params = dict(SUMMARIZATION_PARAMS["summarization"])  # max_length=40, num_beams=2
    prefix = task_params.pop("prefix")
    settings = copy.deepcopy(model.generation_config)
    settings.update(**{**task_params, **manifest})
    expected = []
    for text in rows:
        inputs = tokenizer(prefix + text, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=settings)[0]
        assert len(output) == 1 + new_tokens  # the decoder start token, then new tokens up to the winning limit
        expected.append(tokenizer.decode(output, skip_special_tokens=True).strip())
    assert pd.read_parquet(tmp_path / "out")["summary_text"].tolist() == expected
