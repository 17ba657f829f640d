"""Embedding settings: what a feature-extraction job runs after the transformer, and where each setting came from.

A sentence-transformers checkpoint says in `modules.json` which modules follow the transformer (Pooling, Dense,
Normalize), and in their configs its trained sequence length, pooling mode and prompts. Ignoring them gives vectors
that differ from `SentenceTransformer.encode`, so every setting the job leaves unset comes from the checkpoint.
Only JSON files are read here, before any weights load: an unsupported module is refused before OUTPUT is touched.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field

import torch

from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.manifest import Job
from pipeline_core.manifest.spec import POOLING

# Older checkpoints flag each mode in its own key; the order is the concatenation order of sentence-transformers.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
TRANSFORMER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                       "sentence_camembert_config.json", "sentence_albert_config.json",
                       "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
# The module types batchrun runs itself, by class name (sentence_transformers.models.Dense and the newer
# sentence_transformers.base.modules.dense.Dense are the same module). Dropout does nothing at inference.
SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout")
FIX = ("set model.sentence_transformers: false to embed with the transformer alone (then model.pooling, "
       "model.normalize and batching.max_length say how), or run this checkpoint with sentence-transformers itself")


@dataclass(frozen=True)
class DenseLayer:
    """One Dense module of the checkpoint: its folder and config; its weights load with the model."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a torch.nn class path, e.g. torch.nn.modules.activation.Tanh
    residual: bool = False


@dataclass(frozen=True)
class EmbeddingSettings:
    """What turns the transformer's token vectors into the job's embedding. `sources` says where each came from."""

    pooling: tuple[str, ...] | None  # None: every real token's vector (model.pooling: none)
    normalize: bool
    max_length: int | None  # None: the model's own limit
    prompt: str = ""  # prepended to every input, as sentence-transformers' prompts are
    include_prompt: bool = True  # False: the prompt's tokens are left out of pooling
    lowercase: bool = False
    dense: tuple[DenseLayer, ...] = ()
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def pooling_name(self) -> str:
        """As the job writes it: `none`, one mode, or modes joined by `+`."""
        return "none" if self.pooling is None else "+".join(self.pooling)

    def identity(self) -> dict:
        """What the fingerprint records: the resolved values, so a run is told apart by what it computed."""
        values = {"model.pooling": self.pooling_name, "model.normalize": self.normalize}
        if self.sources.get("modules") is not None:  # only checkpoints that have modules: plain runs keep theirs
            values["embedding"] = {
                "max_length": self.max_length, "prompt": self.prompt, "include_prompt": self.include_prompt,
                "lowercase": self.lowercase,
                "dense": [[layer.path, layer.in_features, layer.out_features, layer.activation, layer.residual]
                          for layer in self.dense],
            }
        return values


def resolve_embedding(job: Job) -> EmbeddingSettings:
    """The job's keys where set, else the sentence-transformers checkpoint's, else plain mean pooling."""
    name, revision = job.get("model.name"), job.get("model.revision")
    checkpoint = read_checkpoint(name, revision) if job.get("model.sentence_transformers") else None
    if checkpoint is None:
        return _plain(job)
    return _from_checkpoint(job, checkpoint)


def _plain(job: Job) -> EmbeddingSettings:
    pooling, normalize, prompt_name = job.get("model.pooling"), job.get("model.normalize"), job.get("model.prompt_name")
    if prompt_name is not None:
        raise UsageError(f"model.prompt_name={prompt_name!r} needs a sentence-transformers checkpoint with prompts "
                         f"(config_sentence_transformers.json); {job.get('model.name')!r} has none"
                         + ("" if job.get("model.sentence_transformers") else
                            ", and model.sentence_transformers: false ignores them"))
    max_length = job.get("batching.max_length")
    plain = "default: no sentence-transformers modules" if job.get("model.sentence_transformers") else \
        "default: model.sentence_transformers is false"
    return EmbeddingSettings(
        pooling=_job_pooling(pooling) if pooling is not None else ("mean",),
        normalize=bool(normalize),
        max_length=max_length,
        sources={"pooling": _source(pooling, "model.pooling", plain),
                 "normalize": _source(normalize, "model.normalize", plain),
                 "max_length": _source(max_length, "batching.max_length", "the model's limit"),
                 "prompt": plain, "dense": plain},
    )


@dataclass
class Checkpoint:
    """The sentence-transformers files of a checkpoint, parsed."""

    modules: list[dict]
    files: dict[str, dict]  # file name (relative to the checkpoint) -> its JSON


def read_checkpoint(name: str, revision: str | None) -> Checkpoint | None:
    """modules.json and the configs it points to; None when the checkpoint is not a sentence-transformers one."""
    modules_path = checkpoint_file(name, revision, "modules.json")
    if modules_path is None:
        return None
    modules = _read_json(modules_path, "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                  for m in modules):
        raise UsageError(f"model.name={name!r}: {modules_path} is not a sentence-transformers modules.json (a list "
                         f"of {{type, path}}); {FIX}")
    files = {}
    for filename in (*TRANSFORMER_CONFIGS, "config_sentence_transformers.json"):
        path = checkpoint_file(name, revision, filename)
        if path is not None:
            files[filename] = _read_json(path, filename)
    for module in modules:
        if _kind(module) in ("Pooling", "Dense"):
            filename = f"{module.get('path') or ''}/config.json".lstrip("/")
            path = checkpoint_file(name, revision, filename)
            if path is None:
                raise UsageError(f"model.name={name!r}: modules.json names {module['type']} in "
                                 f"{module.get('path')!r}, but {filename} is missing; {FIX}")
            files[filename] = _read_json(path, filename)
    return Checkpoint(modules, files)


def checkpoint_file(name: str, revision: str | None, filename: str) -> str | None:
    """A file of a local model directory or a hub repository (through its cache); None when it has none."""
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        path = os.path.join(local, filename)
        return path if os.path.isfile(path) else None
    from transformers.utils import cached_file  # deferred: only hub models need it

    try:
        return cached_file(name, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)
    except OSError:  # no such repository: the model's own load says so, in its words
        return None


def _read_json(path: str, filename: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise BatchrunError(f"{path}: the checkpoint's {filename} cannot be read: {error}") from error


def _kind(module: dict) -> str | None:
    """The module's class name when it is one of sentence-transformers' own, else None."""
    kind = module["type"]
    return kind.rsplit(".", 1)[-1] if kind.startswith("sentence_transformers.") else None


def _from_checkpoint(job: Job, checkpoint: Checkpoint) -> EmbeddingSettings:
    name = job.get("model.name")
    transformer_file = next((f for f in TRANSFORMER_CONFIGS if f in checkpoint.files), None)
    transformer = checkpoint.files.get(transformer_file, {})
    _check_modules(name, checkpoint.modules, transformer)
    found = {"modules": "checkpoint modules.json", "max_length": "the model's limit"}
    modules = _after_transformer(name, checkpoint, found)
    prompt = _prompt(job, checkpoint.files.get("config_sentence_transformers.json") or {}, found)
    settings = {"pooling": modules["pooling"], "normalize": modules["normalize"],
                "max_length": transformer.get("max_seq_length")}
    if settings["max_length"] is not None:
        found["max_length"] = f"checkpoint {transformer_file}"
    for setting, key in (("pooling", "model.pooling"), ("normalize", "model.normalize"),
                         ("max_length", "batching.max_length")):
        value = job.get(key)
        if value is not None:  # keys set in the job win over the checkpoint
            settings[setting] = _job_pooling(value) if setting == "pooling" else value
            found[setting] = f"job {key}"
    dense = modules["dense"]
    if settings["pooling"] is None:
        dense = []  # sentence-transformers' Dense and Normalize work on the pooled vector, not on token vectors
        if job.get("model.normalize") is None:
            settings["normalize"], found["normalize"] = False, "default (model.pooling: none)"
    _check_dense_chain(name, settings["pooling"], dense, modules["dimension"], found)
    return EmbeddingSettings(
        pooling=settings["pooling"], normalize=settings["normalize"], max_length=settings["max_length"],
        prompt=prompt, include_prompt=modules["include_prompt"], lowercase=bool(transformer.get("do_lower_case")),
        dense=tuple(dense), sources=found,
    )


def _after_transformer(name: str, checkpoint: Checkpoint, found: dict) -> dict:
    """What the modules after the transformer do: pooling (mean where there is none), Dense layers, Normalize."""
    modules = {"pooling": ("mean",), "include_prompt": True, "dimension": None, "dense": [], "normalize": False}
    found.update(pooling="default: no Pooling module", normalize="checkpoint: no Normalize module")
    for module in checkpoint.modules[1:]:
        kind, folder = _kind(module), module.get("path") or ""
        config = checkpoint.files.get(f"{folder}/config.json".lstrip("/"), {})
        if kind == "Pooling":
            modules["pooling"] = checkpoint_pooling(name, folder, config)
            modules["include_prompt"] = bool(config.get("include_prompt", True))
            modules["dimension"] = config.get("embedding_dimension", config.get("word_embedding_dimension"))
            found["pooling"] = f"checkpoint {folder}/config.json"
        elif kind == "Dense":
            modules["dense"].append(dense_layer(name, folder, config))
        elif kind == "Normalize":
            modules["normalize"] = True
            found["normalize"] = "checkpoint modules.json (Normalize)"
    return modules


def _check_modules(name: str, modules: list[dict], transformer: dict) -> None:
    """Transformer first, at the checkpoint's root, then only modules batchrun runs itself."""
    first = modules[0] if modules else {}
    if not modules or _kind(first) != "Transformer":
        raise UsageError(f"model.name={name!r}: its modules.json starts with {first.get('type', 'nothing')!r}, "
                         f"not a Transformer; batchrun cannot run it; {FIX}")
    if (first.get("path") or "") != "":
        raise UsageError(f"model.name={name!r}: its transformer lives in the folder {first['path']!r}, not at the "
                         f"checkpoint's root; {FIX}")
    task = transformer.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise UsageError(f"model.name={name!r}: its sentence-transformers Transformer runs the model for "
                         f"{task!r}, not for its token vectors; {FIX}")
    for module in modules[1:]:
        kind = _kind(module)
        if kind not in SUPPORTED or kind == "Transformer":
            raise UsageError(
                f"model.name={name!r}: modules.json holds the module {module['type']!r} (folder "
                f"{module.get('path')!r}), which batchrun cannot run (it runs "
                f"{', '.join(SUPPORTED[1:])} after the transformer); {FIX}")
    kinds = [_kind(module) for module in modules[1:]]
    if "Pooling" in kinds and any(kind in ("Dense", "Normalize") for kind in kinds[:kinds.index("Pooling")]):
        raise UsageError(f"model.name={name!r}: modules.json runs Dense or Normalize on token vectors, before "
                         f"Pooling; batchrun cannot run that; {FIX}")
    if "Pooling" not in kinds and kinds:
        raise UsageError(f"model.name={name!r}: modules.json has {', '.join(kinds)} but no Pooling; {FIX}")


def checkpoint_pooling(name: str, folder: str, config: dict) -> tuple[str, ...]:
    """The pooling modes of a Pooling config, in either of its formats (pooling_mode, or one flag per mode)."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key))
        modes = modes or ("mean",)  # sentence-transformers' default when no flag is set
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [mode for mode in modes if mode not in POOLING]
    if unknown or not modes:
        raise UsageError(f"model.name={name!r}: {folder}/config.json asks for pooling {unknown or modes}, which "
                         f"batchrun does not know (it knows {', '.join(POOLING)}); {FIX}")
    return modes


def dense_layer(name: str, folder: str, config: dict) -> DenseLayer:
    where = f"model.name={name!r}: the Dense module in {folder!r}"
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # sentence-transformers' default
    if activation_class(activation) is None:
        raise UsageError(f"{where} uses the activation {activation!r}; batchrun runs only torch.nn activations; "
                         f"{FIX}")
    source = config.get("module_input_name", "sentence_embedding")
    if source != "sentence_embedding" or config.get("module_output_name", source) != source:
        raise UsageError(f"{where} reads or writes {source!r}, not the sentence embedding; {FIX}")
    try:
        return DenseLayer(folder, int(config["in_features"]), int(config["out_features"]),
                          bool(config.get("bias", True)), activation, bool(config.get("use_residual", False)))
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{where}: its config.json lacks a valid {error}") from error


def _check_dense_chain(name: str, pooling, dense: list[DenseLayer], dimension, found: dict) -> None:
    """Each Dense layer must take the width the one before it gives (an explicit model.pooling can change it)."""
    if not dense:
        return
    width = len(pooling) * dimension if isinstance(dimension, int) else dense[0].in_features
    if width != dense[0].in_features:
        raise UsageError(f"model.name={name!r}: pooling {'+'.join(pooling)} ({found['pooling']}) gives {width} "
                         f"values, but the Dense layer in {dense[0].path!r} takes {dense[0].in_features}; "
                         "leave model.pooling unset")
    for before, after in zip(dense, dense[1:], strict=False):
        if before.out_features != after.in_features:
            raise UsageError(f"model.name={name!r}: the Dense layer in {before.path!r} gives {before.out_features} "
                             f"values, but the one in {after.path!r} takes {after.in_features}")


def _prompt(job: Job, config: dict, found: dict) -> str:
    """The prompt prepended to every text: model.prompt_name's, else the checkpoint's default prompt, else none."""
    prompts = config.get("prompts") or {}
    prompt_name = job.get("model.prompt_name")
    if prompt_name is not None:
        if prompt_name not in prompts:
            names = ", ".join(sorted(prompts)) or "none"
            raise UsageError(f"model.prompt_name={prompt_name!r} is not one of the checkpoint's prompts "
                             f"(config_sentence_transformers.json has: {names})")
        found["prompt"] = f"job model.prompt_name={prompt_name!r}"
        return prompts[prompt_name] or ""
    default = config.get("default_prompt_name")
    if default is not None and prompts.get(default):
        found["prompt"] = f"checkpoint default_prompt_name={default!r}"
        return prompts[default]
    found["prompt"] = "the checkpoint has no default prompt"
    return ""


def _job_pooling(value: str) -> tuple[str, ...] | None:
    return None if value == "none" else (value,)


def _source(value, key: str, otherwise: str) -> str:
    return f"job {key}" if value is not None else otherwise


def activation_class(path) -> type | None:
    """The torch.nn module class a Dense config names (never code from elsewhere), or None."""
    if not isinstance(path, str):
        return None
    module_name, _, class_name = path.rpartition(".")
    if not module_name.startswith("torch.nn"):
        return None
    try:
        found = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, torch.nn.Module) else None


class Dense(torch.nn.Module):
    """sentence-transformers' Dense on the pooled vector: activation(linear(x)), plus x (or its projection) when
    the checkpoint asks for a residual. Parameter names match its weight files."""

    def __init__(self, layer: DenseLayer):
        super().__init__()
        self.linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        self.activation = activation_class(layer.activation)()
        self.use_residual = layer.residual
        if layer.residual and layer.in_features != layer.out_features:
            self.residual = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(vectors))
        if self.use_residual:
            out = out + (self.residual(vectors) if hasattr(self, "residual") else vectors)
        return out


def load_dense(name: str, revision: str | None, layers: tuple[DenseLayer, ...]) -> list[Dense]:
    """The checkpoint's Dense layers with their weights, in float32 (they run on the float32 pooled vector)."""
    loaded = []
    for layer in layers:
        dense = Dense(layer)
        state = _dense_weights(name, revision, layer.path)
        try:
            dense.load_state_dict(state)
        except RuntimeError as error:  # a checkpoint at odds with itself: no retry mends it
            raise UsageError(f"model.name={name!r}: the Dense weights in {layer.path!r} do not fit its "
                                f"config.json: {str(error).splitlines()[0]}") from error
        loaded.append(dense.float().eval().requires_grad_(False))
    return loaded


def _dense_weights(name: str, revision: str | None, folder: str) -> dict:
    safetensors = checkpoint_file(name, revision, f"{folder}/model.safetensors")
    if safetensors is not None:
        from safetensors.torch import load_file

        return load_file(safetensors)
    pickled = checkpoint_file(name, revision, f"{folder}/pytorch_model.bin")
    if pickled is not None:
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise BatchrunError(f"model.name={name!r}: the Dense module in {folder!r} has no model.safetensors "
                        "or pytorch_model.bin")


def lowercase_inputs(tokenizer) -> None:
    """do_lower_case of the checkpoint: a Lowercase step before the tokenizer's own normaliser, unless it has one,
    as sentence-transformers adds it."""
    from tokenizers import normalizers

    backend = tokenizer.backend_tokenizer
    current = backend.normalizer
    steps = list(current) if isinstance(current, normalizers.Sequence) else [current] if current is not None else []
    if not any(isinstance(step, normalizers.Lowercase) for step in steps):
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *steps])
