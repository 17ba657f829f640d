"""Compatibility checks (the initializer's last stage), each on its own: what an image processor produces against
config.image_size, sampling rates, tokenizer against embeddings, pad and EOS tokens, and models that cannot generate.
Then what feeds them: special-token alignment, generation settings, loading the components (and what each loading
failure says), and the staged initializer's device choice and checks on the tiny models.

Models are stand-ins holding a real config where only the config is read; the exact messages are asserted, since
users read them.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    CLIPImageProcessor,
    GenerationConfig,
    ViTConfig,
    ViTImageProcessor,
)

import jobs
import pipeline_core.initializer as initializer_stage
import pipeline_core.initializer.preview as preview_stage
from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.initializer import components as components_stage
from pipeline_core.initializer import initialize, plan_summary
from pipeline_core.initializer.compat import check_compatibility, output_image_size
from pipeline_core.initializer.components import Components, _first_line, _load, model_class_for
from pipeline_core.initializer.generation import align_special_tokens, isolate_generation_config
from pipeline_core.manifest import load_job

HEADER = "the model and its preprocessing do not fit together:\n"


def refusal(task: str, parts: Components, generation_config=None) -> str:
    with pytest.raises(UsageError) as caught:
        check_compatibility(task, parts, generation_config)
    message = str(caught.value)
    assert message.startswith(HEADER)
    return message.removeprefix(HEADER)


def vision(config, image_processor) -> Components:
    return Components(config=config, model=SimpleNamespace(config=config), image_processor=image_processor)


# What an image processor produces.

def test_output_size_of_height_and_width_settings():
    assert output_image_size(ViTImageProcessor(size={"height": 24, "width": 40})) == (24, 40)
    assert output_image_size(SimpleNamespace(size={"height": 24, "width": 40})) == (24, 40)


def test_output_size_of_an_int_size_is_square():
    assert output_image_size(SimpleNamespace(size=32)) == (32, 32)
    assert output_image_size(SimpleNamespace(size=32, do_center_crop=False)) == (32, 32)


def test_center_crop_decides_the_output_size():
    clip = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 24, "width": 28})
    assert clip.do_center_crop
    assert output_image_size(clip) == (24, 28)
    assert output_image_size(SimpleNamespace(size={"height": 32, "width": 32}, do_center_crop=True, crop_size=16)) == (
        16, 16)


def test_crop_size_counts_only_when_center_crop_is_on():
    assert output_image_size(SimpleNamespace(size=32, do_center_crop=False, crop_size={"height": 8, "width": 8})) == (
        32, 32)
    assert output_image_size(SimpleNamespace(size=32, crop_size={"height": 8, "width": 8})) == (32, 32)
    # center crop on without a crop size: the resize decides
    assert output_image_size(SimpleNamespace(size=32, do_center_crop=True)) == (32, 32)
    assert output_image_size(SimpleNamespace(size=32, do_center_crop=True, crop_size=None)) == (32, 32)


def test_output_size_is_unknown_when_it_depends_on_each_image():
    clip = CLIPImageProcessor(size={"shortest_edge": 40}, do_center_crop=False)
    assert output_image_size(clip) is None
    assert output_image_size(SimpleNamespace(size={"shortest_edge": 40})) is None
    assert output_image_size(SimpleNamespace(size={"width": 40})) is None
    assert output_image_size(SimpleNamespace(size={"height": 40})) is None
    assert output_image_size(SimpleNamespace(size={})) is None
    assert output_image_size(SimpleNamespace(size=None)) is None
    assert output_image_size(SimpleNamespace()) is None  # no size setting at all


# Image processor against config.image_size.

def test_matching_sizes_pass():
    config = ViTConfig(image_size=32)
    check_compatibility("image-classification", vision(config, ViTImageProcessor(size={"height": 32, "width": 32})),
                        None)
    clip = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    check_compatibility("image-classification", vision(config, clip), None)


def test_a_non_square_image_size_is_height_then_width():
    processor = SimpleNamespace(size={"height": 24, "width": 40})
    check_compatibility("image-classification", vision(SimpleNamespace(image_size=[24, 40]), processor), None)
    check_compatibility("image-classification", vision(SimpleNamespace(image_size=(24, 40)), processor), None)
    assert refusal("image-classification", vision(SimpleNamespace(image_size=(40, 24)), processor)) == (
        "  - the image processor makes 24x40 images but the model expects 40x24 (config.image_size); "
        "use the image processor saved with this model"
    )


def test_size_mismatch_message_gives_height_by_width_of_both():
    processor = SimpleNamespace(size={"height": 48, "width": 40})
    assert refusal("image-classification", vision(ViTConfig(image_size=32), processor)) == (
        "  - the image processor makes 48x40 images but the model expects 32x32 (config.image_size); "
        "use the image processor saved with this model"
    )


def test_center_crop_mismatch_is_refused():
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24})
    assert "makes 24x24 images but the model expects 32x32" in refusal(
        "image-classification", vision(ViTConfig(image_size=32), clip))


def test_unknown_sizes_are_not_checked():
    # the size follows each image, or the config does not say: nothing to compare
    per_image = CLIPImageProcessor(size={"shortest_edge": 48}, do_center_crop=False)
    check_compatibility("image-classification", vision(ViTConfig(image_size=32), per_image), None)
    fixed = SimpleNamespace(size={"height": 48, "width": 48})
    check_compatibility("image-classification", vision(SimpleNamespace(), fixed), None)
    check_compatibility("image-classification", vision(SimpleNamespace(image_size=None), fixed), None)


def test_missing_image_processor_is_refused():
    assert refusal("image-classification", vision(ViTConfig(image_size=32), None)) == (
        "  - image-classification needs an image processor, and none was found beside the model"
    )


# Sampling rates: checked whenever there is a feature extractor, whatever the task.

AUDIO_TASK = "audio-classification"  # a task with no tokenizer or image processor check: only the rates are compared


def audio(config_sampling_rate, extractor) -> Components:
    config = SimpleNamespace() if config_sampling_rate is None else SimpleNamespace(sampling_rate=config_sampling_rate)
    return Components(config=config, model=SimpleNamespace(config=config), feature_extractor=extractor)


def test_sampling_rate_mismatch_message():
    assert refusal(AUDIO_TASK, audio(16000, SimpleNamespace(sampling_rate=8000))) == (
        "  - the feature extractor reads audio at 8000 Hz but the model was trained at 16000 Hz "
        "(config.sampling_rate); use the feature extractor saved with this model"
    )


def test_equal_or_unknown_sampling_rates_pass():
    check_compatibility(AUDIO_TASK, audio(16000, SimpleNamespace(sampling_rate=16000)), None)
    check_compatibility(AUDIO_TASK, audio(None, SimpleNamespace(sampling_rate=16000)), None)
    check_compatibility(AUDIO_TASK, audio(16000, SimpleNamespace()), None)
    check_compatibility(AUDIO_TASK, audio(16000, SimpleNamespace(sampling_rate=None)), None)


def test_an_image_processor_serving_as_feature_extractor_has_no_sampling_rate_to_check():
    config = ViTConfig(image_size=32)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    parts = vision(config, processor)
    parts.feature_extractor = processor
    check_compatibility("image-classification", parts, None)


# Tokenizer against the model, and the tokens generation and batching need.

@pytest.fixture(scope="module")
def embedder(tiny_models):
    return AutoModel.from_pretrained(tiny_models.embedder)


def text(model, tokenizer) -> Components:
    return Components(config=model.config, model=model, tokenizer=tokenizer)


def test_vocabulary_larger_than_the_embeddings_message(tiny_models, embedder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    rows = embedder.get_input_embeddings().num_embeddings
    check_compatibility("feature-extraction", text(embedder, tokenizer), None)  # len(tokenizer) == rows fits
    assert len(tokenizer) == rows
    tokenizer.add_tokens(["one_token_too_many"])
    assert refusal("feature-extraction", text(embedder, tokenizer)) == (
        f"  - the tokenizer has {rows + 1} tokens but the model's input embeddings have {rows} rows; "
        "token ids past the end would crash the model: use the tokenizer trained with this model"
    )


def test_embeddings_that_do_not_say_their_size_are_not_measured(tiny_models, embedder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    tokenizer.add_tokens(["extra"])
    model = SimpleNamespace(config=embedder.config, get_input_embeddings=lambda: torch.nn.Identity())
    check_compatibility("feature-extraction", text(model, tokenizer), None)


def test_missing_tokenizer_message(embedder):
    assert refusal("token-classification", text(embedder, None)) == (
        "  - token-classification needs a tokenizer, and none was found beside the model (tokenizer.json, "
        "tokenizer_config.json)"
    )


def test_model_that_cannot_generate_message(tiny_models, embedder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    config = GenerationConfig(eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    assert refusal("summarization", text(embedder, tokenizer), config) == (
        "  - BertModel cannot generate text, which summarization needs; choose a generative model"
    )


def test_missing_eos_and_pad_messages(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    assert tokenizer.pad_token_id is None
    assert refusal("text-generation", text(model, tokenizer), GenerationConfig()) == (
        "  - neither the model's generation config nor the tokenizer has an EOS token to stop on\n"
        "  - the tokenizer has no pad token, which batching needs; use a tokenizer that defines one"
    )
    # outside generation, only the pad token is needed
    assert refusal("text-classification", text(model, tokenizer)) == (
        "  - the tokenizer has no pad token, which batching needs; use a tokenizer that defines one"
    )


def test_every_problem_is_reported_at_once(tiny_models, embedder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)  # no pad token, and more tokens than rows
    model = SimpleNamespace(config=SimpleNamespace(sampling_rate=16000),
                            get_input_embeddings=embedder.get_input_embeddings)
    parts = text(model, tokenizer)
    parts.feature_extractor = SimpleNamespace(sampling_rate=8000)
    problems = refusal("feature-extraction", parts).splitlines()
    assert len(problems) == 3
    rows = embedder.get_input_embeddings().num_embeddings
    assert problems[0].startswith(f"  - the tokenizer has {len(tokenizer)} tokens but the model's input embeddings "
                                  f"have {rows} rows")
    assert problems[1].startswith("  - the tokenizer has no pad token")
    assert problems[2].startswith("  - the feature extractor reads audio at 8000 Hz")


# Special tokens: generation and batching get a pad and an EOS token where the model and tokenizer allow it.

def test_the_generation_configs_own_eos_wins_over_the_tokenizers(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.seq2seq)
    config = GenerationConfig(eos_token_id=5, pad_token_id=6)
    align_special_tokens(config, tokenizer, is_causal=False)
    assert (config.eos_token_id, config.pad_token_id) == (5, 6)
    # and neither overwrites the tokenizer's own pad token
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)


def test_an_encoder_decoder_tokenizer_keeps_its_pad_token(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.seq2seq)
    config = GenerationConfig()
    align_special_tokens(config, tokenizer, is_causal=False)
    assert (tokenizer.pad_token, config.pad_token_id, config.eos_token_id) == ("<pad>", 0, 1)


def test_only_causal_models_pad_with_eos(tiny_models, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    config = GenerationConfig()
    with caplog.at_level(logging.INFO, logger="batchrun"):
        align_special_tokens(config, tokenizer, is_causal=False)
    assert tokenizer.pad_token is None and config.pad_token_id is None
    assert config.eos_token_id == tokenizer.eos_token_id == 0
    assert caplog.records == []
    with caplog.at_level(logging.INFO, logger="batchrun"):
        align_special_tokens(config, tokenizer, is_causal=True)
    assert (tokenizer.pad_token, tokenizer.pad_token_id, config.pad_token_id) == ("<|endoftext|>", 0, 0)
    assert [record.getMessage() for record in caplog.records] == [
        "the tokenizer has no pad token; padding with its EOS token '<|endoftext|>'"
    ]


def test_a_tokenizer_without_pad_takes_the_generation_configs(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    config = GenerationConfig(pad_token_id=3)
    align_special_tokens(config, tokenizer, is_causal=False)
    assert tokenizer.pad_token_id == 3 and config.pad_token_id == 3


# Generation settings: the pipeline's own copy, merged from the model's.

def generative_stand_in(generation_config, task_params=None):
    return SimpleNamespace(generation_config=generation_config,
                           config=SimpleNamespace(task_specific_params=task_params))


def test_a_model_without_generation_config_gets_a_fresh_one_with_the_task_default():
    config, prefix = isolate_generation_config(generative_stand_in(None), "summarization", {"num_beams": 2})
    assert isinstance(config, GenerationConfig) and prefix is None
    assert (config.max_new_tokens, config.num_beams) == (256, 2)


def test_the_copy_shares_no_list_with_the_models_config():
    own = GenerationConfig(suppress_tokens=[5, 6], max_new_tokens=9)
    config, _ = isolate_generation_config(generative_stand_in(own), "text-generation", {})
    config.suppress_tokens.append(7)
    assert own.suppress_tokens == [5, 6]


def test_ignored_task_params_are_logged_by_name(caplog):
    model = generative_stand_in(GenerationConfig(), {"summarization": {"prefix": "s: ", "zeta": 1, "alpha": 2}})
    with caplog.at_level(logging.INFO, logger="batchrun"):
        isolate_generation_config(model, "summarization", {})
    assert [record.getMessage() for record in caplog.records] == [
        "task_specific_params['summarization']: ignoring alpha, zeta (not generate() settings)"
    ]



# Loading the components, and what each model.name failure says.

def test_first_line_of_a_loading_error():
    assert _first_line(OSError("Can't load the config.\nMake sure the path is right.")) == "Can't load the config."
    assert _first_line(OSError("\n  only line  \n")) == "only line"
    assert _first_line(OSError()) == "OSError"  # nothing to say but its kind
    assert _first_line(FileNotFoundError("   ")) == "FileNotFoundError"


def failing(error: Exception):
    def load():
        raise error
    return load


def test_a_value_error_while_loading_is_a_usage_error_naming_the_model():
    with pytest.raises(UsageError) as caught:
        _load("model", "org/model", failing(ValueError("Unrecognized configuration class")))
    assert str(caught.value) == (
        "model.name='org/model' cannot be loaded as this task's model: Unrecognized configuration class")


@pytest.mark.parametrize("name", ["./missing-model", "/missing-model", "~/missing-model", "~missing-model",
                                  "models/org/missing-model"])
def test_a_missing_local_directory_is_a_usage_error(name):
    with pytest.raises(UsageError) as caught:
        _load("model", name, failing(OSError("Incorrect path_or_model_id")))
    assert str(caught.value) == f"model.name={name!r}: no such directory"


@pytest.mark.parametrize("name", ["org/model", "model"])
def test_a_hub_id_that_cannot_be_loaded_is_a_failure_with_the_first_line(name):
    # offline, or not on the hub: a scheduler may retry, so not a usage error
    with pytest.raises(BatchrunError) as caught:
        _load("model", name, failing(OSError("We couldn't connect to the hub.\nCheck your connection.")))
    assert type(caught.value) is BatchrunError
    assert str(caught.value) == f"model.name={name!r} could not be loaded: We couldn't connect to the hub."


def test_an_existing_directory_that_cannot_be_loaded_is_a_failure_not_a_missing_directory(tmp_path):
    name = str(tmp_path)
    with pytest.raises(BatchrunError) as caught:
        _load("model", name, failing(OSError("no file named config.json\nin the directory")))
    assert type(caught.value) is BatchrunError
    assert str(caught.value) == f"model.name={name!r} could not be loaded: no file named config.json"


def job(tmp_path, task: str, model, **model_keys):
    """A job over `model` with `model_keys` beside its name, only to be initialised."""
    return load_job(jobs.write_manifest(tmp_path / "job.yaml", jobs.manifest(model, task=task, model=model_keys)))


def test_a_config_of_an_unknown_architecture_is_refused_naming_the_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UsageError) as caught:
        initialize(job(tmp_path, "feature-extraction", model))
    assert str(caught.value).startswith(
        f"model.name={str(model)!r} cannot be loaded as this task's model: The checkpoint you are trying to load has "
        "model type `no-such-architecture`")


def test_a_model_the_tasks_auto_class_does_not_map_is_refused_naming_the_model(tmp_path, tiny_models):
    with pytest.raises(UsageError) as caught:
        initialize(job(tmp_path, "text-classification", tiny_models.image_classifier))
    assert str(caught.value) == (  # from the config alone, before any weights load (initializer/preview.py)
        f"model.name={str(tiny_models.image_classifier)!r} is a 'vit' checkpoint, which "
        "AutoModelForSequenceClassification cannot load for text-classification: choose a model made for "
        "text-classification")


def test_a_config_that_does_not_say_follows_the_decoder_only_path():
    assert model_class_for("summarization", SimpleNamespace()) is AutoModelForCausalLM
    assert model_class_for("text-generation", SimpleNamespace(is_encoder_decoder=True)) is AutoModelForSeq2SeqLM


def record_loads(monkeypatch, calls: list, *names):
    """Record the from_pretrained calls batchrun makes through the named Auto classes, then load as usual.

    The classes are replaced where components.py looks them up (its AutoConfig, its `transformers` module), so
    transformers' own inner calls are not recorded.
    """
    for name in names:
        module = components_stage if name == "AutoConfig" else components_stage.transformers
        load = getattr(module, name).from_pretrained

        def recording(model_name, _name=name, _load=load, **kwargs):
            calls.append((_name, model_name, kwargs))
            return _load(model_name, **kwargs)

        monkeypatch.setattr(module, name, SimpleNamespace(from_pretrained=recording))


def test_the_manifests_model_settings_reach_every_loader(tmp_path, monkeypatch, tiny_models):
    calls = []
    record_loads(monkeypatch, calls, "AutoConfig", "AutoModel", "AutoTokenizer", "AutoProcessor")
    name = str(tiny_models.embedder)
    pipeline = initialize(job(tmp_path, "feature-extraction", name, revision="main", dtype="float32",
                              device_map="sequential"))
    common = {"revision": "main", "trust_remote_code": False}
    assert calls == [
        # read once each, before any weights, to check the job against them (initializer/preview.py)
        ("AutoConfig", name, common),
        ("AutoTokenizer", name, common),  # found: no processor is looked for
        # the config already read picks the model class, and the model is built from that same config
        ("AutoModel", name, {"config": pipeline.components.config, "dtype": torch.float32, "device_map": "sequential",
                             **common}),
    ]
    assert pipeline.components.config.model_type == "bert"


def test_an_image_processor_is_loaded_with_the_same_settings(tmp_path, monkeypatch, tiny_models):
    calls = []
    record_loads(monkeypatch, calls, "AutoImageProcessor", "AutoTokenizer", "AutoProcessor")
    name = str(tiny_models.image_classifier)
    initialize(job(tmp_path, "image-classification", name, revision="v1"))
    assert calls == [("AutoImageProcessor", name, {"revision": "v1", "trust_remote_code": False})]


def test_without_a_tokenizer_the_processor_supplies_one(tmp_path, monkeypatch, tiny_models):
    # multimodal repositories ship one processor that holds the tokenizer
    name = str(tiny_models.text_classifier)
    tokenizer = AutoTokenizer.from_pretrained(name)
    processor = SimpleNamespace(tokenizer=tokenizer)
    loads = []
    monkeypatch.setattr(components_stage.transformers, "AutoTokenizer",
                        SimpleNamespace(from_pretrained=failing(OSError("no tokenizer files"))))

    def load_processor(name, **kwargs):
        loads.append((name, kwargs))
        return processor

    monkeypatch.setattr(components_stage.transformers, "AutoProcessor", SimpleNamespace(from_pretrained=load_processor))
    pipeline = initialize(job(tmp_path, "text-classification", name))
    assert pipeline.components.processor is processor and pipeline.tokenizer is tokenizer
    assert loads == [(name, {"revision": None, "trust_remote_code": False})]


# The staged initializer around these checks: where the model goes, and which checks run.

@pytest.fixture
def machine(monkeypatch):
    """Stand in for the machine: its accelerators, this process's distributed rank, and placement (recorded,
    since no accelerator is here to move to); `after_loading` changes the loaded components as a test needs."""
    placed = []

    def install(accelerators: dict, local_rank=None, after_loading=None):
        for stage_module in (initializer_stage, preview_stage):  # the preview checks a named device before OUTPUT
            monkeypatch.setattr(stage_module, "available_accelerators", lambda: dict(accelerators))
        monkeypatch.setattr(initializer_stage, "distributed_local_rank", lambda: local_rank)
        monkeypatch.setattr(initializer_stage, "place_model", lambda model, device: placed.append(device))
        if after_loading is not None:
            load = initializer_stage.load_components
            monkeypatch.setattr(initializer_stage, "load_components",
                                lambda job, preview=None: after_loading(load(job, preview)))
        return placed

    return install


def test_an_explicit_device_with_a_device_map_is_refused_before_loading(tmp_path):
    missing = tmp_path / "not-downloaded-yet"
    with pytest.raises(UsageError, match="conflicting device specifications"):
        initialize(job(tmp_path, "feature-extraction", missing, device="cpu", device_map="auto"))


def test_the_pipeline_goes_to_the_first_accelerator_and_is_placed_there(tmp_path, tiny_models, machine):
    placed = machine({"cuda": 2})
    pipeline = initialize(job(tmp_path, "feature-extraction", tiny_models.embedder))
    assert pipeline.device == torch.device("cuda", 0) and placed == [torch.device("cuda", 0)]


def test_a_model_placed_by_accelerate_stays_where_it_was_put(tmp_path, tiny_models, machine):
    # on one device accelerate leaves no hf_device_map: the model's own device is the map
    placed = machine({"cuda": 2})
    pipeline = initialize(job(tmp_path, "feature-extraction", tiny_models.embedder, device_map="auto"))
    assert not hasattr(pipeline.model, "hf_device_map")
    assert pipeline.device == torch.device("cpu") and placed == []


def test_a_spread_model_takes_inputs_on_the_device_of_its_first_module(tmp_path, tiny_models, machine):
    spread = {"embeddings": 1, "encoder": 0, "pooler": 0}

    def as_accelerate_spreads_it(parts):
        parts.model.hf_device_map = spread
        return parts

    placed = machine({"cuda": 2}, after_loading=as_accelerate_spreads_it)
    pipeline = initialize(job(tmp_path, "feature-extraction", tiny_models.embedder, device_map="auto"))
    assert pipeline.device == torch.device("cuda", 1) and placed == []
    assert plan_summary(pipeline)["hf_device_map"] == spread


def test_each_distributed_rank_takes_its_own_device(tmp_path, tiny_models, machine):
    placed = machine({"cuda": 4}, local_rank=3)
    pipeline = initialize(job(tmp_path, "feature-extraction", tiny_models.embedder))
    assert pipeline.device == torch.device("cuda", 3) and placed == [torch.device("cuda", 3)]


def test_minus_one_keeps_the_model_on_the_device_it_was_loaded_on(tmp_path, tiny_models, machine):
    def loaded_elsewhere(parts):
        parts.model.to("meta")  # the meta device stands in for a device other than the CPU
        return parts

    placed = machine({}, after_loading=loaded_elsewhere)
    pipeline = initialize(job(tmp_path, "feature-extraction", tiny_models.embedder, device=-1))
    assert pipeline.device == torch.device("meta") and placed == [torch.device("meta")]


def without_pad_token(parts):
    parts.tokenizer.pad_token = None
    return parts


def test_an_encoder_decoder_tokenizer_without_pad_takes_the_generation_configs_not_eos(tmp_path, tiny_models, machine):
    machine({}, after_loading=without_pad_token)
    pipeline = initialize(job(tmp_path, "summarization", tiny_models.seq2seq))
    assert pipeline.generation_config.pad_token_id == 0 and pipeline.generation_config.eos_token_id == 1
    assert (pipeline.tokenizer.pad_token, pipeline.tokenizer.pad_token_id) == ("<pad>", 0)


def test_the_compatibility_checks_run_for_the_jobs_task(tmp_path, tiny_models, machine):
    machine({}, after_loading=without_pad_token)
    with pytest.raises(UsageError) as caught:
        initialize(job(tmp_path, "text-classification", tiny_models.text_classifier))
    assert str(caught.value) == HEADER + (
        "  - the tokenizer has no pad token, which batching needs; use a tokenizer that defines one")


def test_the_compatibility_checks_see_the_pipelines_generation_config(tmp_path, tiny_models, machine):
    def without_eos(parts):
        parts.tokenizer.eos_token = None
        parts.model.generation_config.eos_token_id = None
        return parts

    machine({}, after_loading=without_eos)
    with pytest.raises(UsageError) as caught:
        initialize(job(tmp_path, "summarization", tiny_models.seq2seq))
    assert str(caught.value) == HEADER + (
        "  - neither the model's generation config nor the tokenizer has an EOS token to stop on")


def test_plan_summary_names_the_tokenizer_class_and_rounds_stage_times(tmp_path, tiny_models):
    pipeline = initialize(job(tmp_path, "text-classification", tiny_models.text_classifier))
    pipeline.stages = [("components", 1.23456789), ("placement", 0.00004)]
    summary = plan_summary(pipeline)
    assert summary["tokenizer_class"] == type(pipeline.tokenizer).__name__ != "NoneType"
    assert summary["stages"] == [{"name": "components", "seconds": 1.2346}, {"name": "placement", "seconds": 0.0}]
