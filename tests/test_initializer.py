"""The staged initializer end to end on the tiny models: `batchrun plan` for every task, and each refusal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import jobs
from pipeline_core.cli import run_cli
from pipeline_core.errors import UsageError
from pipeline_core.initializer import initialize
from pipeline_core.initializer.compat import check_compatibility
from pipeline_core.initializer.components import Components
from pipeline_core.manifest import load_job

STAGES = ["components", "device_resolution", "placement", "generation_config", "processor_inference",
          "inference_state", "compatibility"]


def job_file(tmp_path: Path, task: str, model: Path, **model_keys) -> Path:
    """TASK.yaml: a job over `model` with `model_keys` beside its name, only to be planned or initialised."""
    return jobs.write_manifest(tmp_path / f"{task}.yaml", jobs.manifest(model, task=task, model=model_keys))


TASK_MODELS = [
    ("summarization", "seq2seq", "T5ForConditionalGeneration|BartForConditionalGeneration"),
    ("text-generation", "causal_lm", "GPT2LMHeadModel|LlamaForCausalLM"),
    ("text-classification", "text_classifier", "BertForSequenceClassification"),
    ("token-classification", "token_classifier", "BertForTokenClassification"),
    ("feature-extraction", "embedder", "BertModel"),
    ("image-classification", "image_classifier", "ViTForImageClassification"),
]


@pytest.mark.parametrize("task, fixture, model_classes", TASK_MODELS, ids=[t[0] for t in TASK_MODELS])
def test_plan_json_for_every_task(tmp_path, capsys, tiny_models, task, fixture, model_classes):
    path = job_file(tmp_path, task, getattr(tiny_models, fixture))
    started = time.perf_counter()
    assert run_cli(["plan", str(path), "--json"]) == 0
    wall = time.perf_counter() - started
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) >= {"task", "model_class", "tokenizer_class", "processor_class", "device", "dtype",
                         "hf_device_map", "generation_config", "input_prefix", "stages"}
    assert plan["task"] == task
    assert plan["model_class"] in model_classes.split("|")
    assert plan["device"] == "cpu" and plan["dtype"] == "float32" and plan["hf_device_map"] is None
    assert [stage["name"] for stage in plan["stages"]] == STAGES
    seconds = [stage["seconds"] for stage in plan["stages"]]
    assert all(type(second) is float and second >= 0 for second in seconds)
    assert seconds[0] > 0  # loading the weights from disk takes time
    assert sum(seconds) <= wall + 0.001  # the stages are timed within the plan command (rounded to 0.1 ms)
    if task == "image-classification":
        assert plan["tokenizer_class"] is None and plan["processor_class"].startswith("ViTImageProcessor")
    else:
        assert plan["tokenizer_class"] and plan["processor_class"] is None
    if task in ("summarization", "text-generation"):
        assert isinstance(plan["generation_config"], dict) and plan["generation_config"]
    else:
        assert plan["generation_config"] is None and plan["input_prefix"] is None


def test_plan_json_for_summarization_carries_prefix_and_merged_settings(tmp_path, capsys, tiny_models):
    path = job_file(tmp_path, "summarization", tiny_models.seq2seq, generation={"num_beams": 3})
    assert run_cli(["plan", str(path), "--json", "--set", "model.generation.max_new_tokens=7"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["input_prefix"] == "summarize: "
    assert plan["generation_config"]["num_beams"] == 3
    assert plan["generation_config"]["max_new_tokens"] == 7
    assert plan["generation_config"]["pad_token_id"] is not None


def test_plain_plan_is_a_short_summary(tmp_path, capsys, tiny_models):
    path = job_file(tmp_path, "text-classification", tiny_models.text_classifier)
    assert run_cli(["plan", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"plan for {path}"
    assert out[1].split() == ["task", "text-classification"]
    assert "device        cpu (float32)" in out[5]
    assert len(out) == 10


@pytest.mark.parametrize("device", ["auto", "0", "-1", "cpu"])
def test_cpu_machine_resolves_auto_zero_and_minus_one_to_cpu(tmp_path, capsys, tiny_models, device):
    path = job_file(tmp_path, "feature-extraction", tiny_models.embedder)
    assert run_cli(["plan", str(path), "--json", "--set", f"model.device={device}"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.device=cuda"], "CUDA is not available on this machine; available: cpu"),
        (["model.device=xpu"], "XPU is not available on this machine; available: cpu"),
        (["model.device=cuda:1"], "CUDA is not available"),
        (["model.device_map=auto", "model.device=cpu"], "conflicting device specifications"),
        (["model.generation.max_new_tokens=0"], "model.generation: `max_new_tokens` must be greater than 0"),
    ],
)
def test_plan_refusals_exit_2_with_the_reason(tmp_path, capsys, tiny_models, overrides, message):
    path = job_file(tmp_path, "summarization", tiny_models.seq2seq)
    args = ["plan", str(path)] + [arg for override in overrides for arg in ("--set", override)]
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


OFFLOADED = {"embeddings": "cpu", "encoder": "disk", "pooler": "cpu"}


def test_device_map_lets_accelerate_place_the_model(tmp_path, capsys, tiny_models):
    # a map over one device leaves no trace on the model (transformers 5 sets hf_device_map only when it dispatches
    # over several devices or the disk), so this map offloads the encoder to the disk, which a CPU machine can do
    path = job_file(tmp_path, "feature-extraction", tiny_models.embedder, device_map=OFFLOADED)
    assert run_cli(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["hf_device_map"] == OFFLOADED
    assert plan["device"] == "cpu"  # inputs go where the first module is
    pipeline = initialize(load_job(path))
    assert pipeline.model.hf_device_map == OFFLOADED
    assert {parameter.device.type for parameter in pipeline.model.encoder.parameters()} == {"meta"}  # on disk
    # the placed model still computes what the plain one does
    plain = AutoModel.from_pretrained(tiny_models.embedder).eval()
    inputs = pipeline.tokenizer(["the quick brown fox", "a cat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(pipeline.model(**inputs).last_hidden_state, plain(**inputs).last_hidden_state)


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}, None], ids=["auto", "mapping", "none"])
def test_device_map_is_passed_to_from_pretrained(tmp_path, capsys, tiny_models, monkeypatch, device_map):
    received = []
    load = AutoModel.from_pretrained

    def recording(*args, **kwargs):
        received.append(kwargs.get("device_map"))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", recording)
    model_keys = {"device_map": device_map} if device_map is not None else {}
    path = job_file(tmp_path, "feature-extraction", tiny_models.embedder, **model_keys)
    assert run_cli(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert received == [device_map]
    assert plan["device"] == "cpu"
    if device_map is None:
        assert plan["hf_device_map"] is None


def test_missing_model_directory_exits_2(tmp_path, capsys):
    path = job_file(tmp_path, "feature-extraction", tmp_path / "no-such-model")
    assert run_cli(["plan", str(path)]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_dtype_is_applied(tmp_path, tiny_models):
    job = load_job(job_file(tmp_path, "feature-extraction", tiny_models.embedder, dtype="bfloat16"))
    assert initialize(job).model.dtype == torch.bfloat16


def test_inference_state_is_eval_without_gradients(tmp_path, tiny_models):
    job = load_job(job_file(tmp_path, "text-classification", tiny_models.text_classifier))
    pipeline = initialize(job)
    assert not pipeline.model.training
    assert not any(module.training for module in pipeline.model.modules())
    assert not any(parameter.requires_grad for parameter in pipeline.model.parameters())
    inputs = pipeline.tokenizer(["a short test"], return_tensors="pt")
    assert not pipeline.model(**inputs).logits.requires_grad


def test_causal_lm_pipeline_pads_with_eos(tmp_path, tiny_models):
    pipeline = initialize(load_job(job_file(tmp_path, "text-generation", tiny_models.causal_lm)))
    assert pipeline.tokenizer.pad_token_id == pipeline.tokenizer.eos_token_id
    assert pipeline.generation_config.pad_token_id == pipeline.tokenizer.eos_token_id


def test_summarization_with_a_causal_lm_loads_a_causal_model(tmp_path, tiny_models):
    job = job_file(tmp_path, "summarization", tiny_models.causal_lm, prompt="Summarize: {text}")
    pipeline = initialize(load_job(job))
    assert not pipeline.model.config.is_encoder_decoder
    assert pipeline.generation_config is not None


# Compatibility checks, each on its own.

def components(model, tokenizer=None, image_processor=None, feature_extractor=None) -> Components:
    return Components(config=model.config, model=model, tokenizer=tokenizer, image_processor=image_processor,
                      feature_extractor=feature_extractor)


def test_vocabulary_larger_than_the_embeddings_is_refused(tiny_models):
    model = AutoModel.from_pretrained(tiny_models.embedder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    tokenizer.add_tokens([f"extra_token_{i}" for i in range(5)])
    with pytest.raises(UsageError, match=rf"tokenizer has {len(tokenizer)} tokens but the model's input embeddings"):
        check_compatibility("feature-extraction", components(model, tokenizer), None)


def test_image_size_mismatch_is_refused(tiny_models):
    model = AutoModel.from_pretrained(tiny_models.image_classifier)
    processor = AutoImageProcessor.from_pretrained(tiny_models.image_classifier)
    check_compatibility("image-classification", components(model, image_processor=processor), None)
    processor.size = {"height": 48, "width": 48}
    with pytest.raises(UsageError, match="makes 48x48 images but the model expects 32x32"):
        check_compatibility("image-classification", components(model, image_processor=processor), None)


def test_sampling_rate_mismatch_is_refused(tiny_models):
    model = AutoModel.from_pretrained(tiny_models.embedder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    model.config.sampling_rate = 16000
    extractor = type("Extractor", (), {"sampling_rate": 8000})()
    with pytest.raises(UsageError, match="reads audio at 8000 Hz but the model was trained at 16000 Hz"):
        check_compatibility("feature-extraction", components(model, tokenizer, feature_extractor=extractor), None)


def test_generative_task_needs_a_model_that_generates(tiny_models):
    model = AutoModel.from_pretrained(tiny_models.embedder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    config = GenerationConfig(eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(UsageError, match="cannot generate text, which summarization needs"):
        check_compatibility("summarization", components(model, tokenizer), config)


def test_tokenizer_needs_a_pad_token_and_generation_an_eos(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    with pytest.raises(UsageError) as caught:
        check_compatibility("text-generation", components(model, tokenizer), GenerationConfig())
    assert "no pad token" in str(caught.value) and "EOS token to stop on" in str(caught.value)


def test_missing_tokenizer_is_refused(tiny_models):
    model = AutoModel.from_pretrained(tiny_models.embedder)
    with pytest.raises(UsageError, match="feature-extraction needs a tokenizer"):
        check_compatibility("feature-extraction", components(model), None)
