"""Before OUTPUT is touched and before any weights load: what the job can know of its model from the checkpoint's
small files (its config, its tokenizer, its generation settings), checked so that a job that cannot work exits 2 in
seconds and leaves nothing behind.

A model directory that does not exist, holds no weights or weights cut short, a checkpoint the task's model class
cannot load, a device that is not there, `model.chat_template: true` with a tokenizer that has no template, and a
`batching.max_length` the model's positions cannot hold would otherwise fail only after OUTPUT is written, or fail
every long row one by one. The config and tokenizer loaded here are handed on to the
initializer, which does not load them again.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from pipeline_core.errors import UsageError
from pipeline_core.initializer.components import (
    IMAGE_TASKS,
    load_config,
    load_tokenizer,
    model_class_for,
    model_input_limit,
)
from pipeline_core.initializer.device import available_accelerators, check_device_request
from pipeline_core.initializer.generation import GENERATIVE_TASKS, preview_generation_config
from pipeline_core.manifest import Job

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


@dataclass
class ModelPreview:
    """The checkpoint's config and tokenizer (None for image tasks, or where only a processor holds one)."""

    config: Any
    tokenizer: Any = None


def preview_model(job: Job) -> ModelPreview:
    """The model's config and tokenizer, loaded and checked against the job: exit 2 naming the key and the fix."""
    check_device_request(job.get("model.device"), job.get("model.device_map"), available_accelerators())
    config = load_config(job)
    check_model_class(job, config)
    check_weights(job.get("model.name"))
    if job.get("task") in IMAGE_TASKS:
        return ModelPreview(config)
    tokenizer = load_tokenizer(job)
    if tokenizer is not None:  # none: a multimodal repository's processor holds it (checked once it loads)
        check_chat_template(job, tokenizer)
        check_max_length(job, tokenizer, config)
    return ModelPreview(config, tokenizer)


def check_model_class(job: Job, config) -> None:
    """The task's Auto class must map the checkpoint's config (or the checkpoint ship its own, and be trusted)."""
    name, task = job.get("model.name"), job.get("task")
    auto = model_class_for(task, config)
    try:
        if type(config) in auto._model_mapping:  # the Auto class's own table, as from_pretrained reads it
            return
    except AttributeError:  # an Auto class without its table: from_pretrained is left to judge
        return
    if auto.__name__ in (getattr(config, "auto_map", None) or {}):
        if job.get("model.trust_remote_code"):
            return
        raise UsageError(f"model.name={name!r} ships its own {auto.__name__} code: set model.trust_remote_code: true "
                         "to run it (only for code you trust)")
    raise UsageError(f"model.name={name!r} is a {getattr(config, 'model_type', type(config).__name__)!r} checkpoint, "
                     f"which {auto.__name__} cannot load for {task}: choose a model made for {task}")


def check_weights(name: str) -> None:
    """A local model directory must hold its weights whole: every shard its index names, and each safetensors file
    as long as its header says (an interrupted copy or download is cut short). Only headers are read."""
    if not os.path.isdir(name):
        return  # a hub id is transformers' to fetch and name
    found = [file for file in WEIGHT_FILES if os.path.isfile(os.path.join(name, file))]
    if not found:
        raise UsageError(f"model.name={name!r} holds no weights (none of {', '.join(WEIGHT_FILES)}); its files are "
                         f"{', '.join(sorted(os.listdir(name))) or 'none'}: point model.name at the directory "
                         "save_pretrained wrote")
    for file in _weight_files(name, found[0]):
        path = os.path.join(name, file)
        problem = "is missing" if not os.path.isfile(path) else _damage(path) if file.endswith(".safetensors") else None
        if problem:
            raise UsageError(f"model.name={name!r}: {file} {problem}; copy or download the model again")


def _weight_files(name: str, found: str) -> list[str]:
    """The weights files: the one found, or the shards its index names."""
    if not found.endswith(".index.json"):
        return [found]
    try:
        with open(os.path.join(name, found), encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"model.name={name!r}: {found} cannot be read ({type(error).__name__}: {error}); copy or "
                         "download the model again") from error


def _damage(path: str) -> str | None:
    """What is wrong with a safetensors file, from its header alone: 8 bytes giving the header's length, the JSON
    header, whose tensors' offsets say how long the file must be."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if length is None or length > size - 8:
            return f"is cut short or not a safetensors file ({size} bytes)"
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "has a header that cannot be read"
    if 8 + length + end > size:
        return f"is cut short: {size} bytes where its tensors need {8 + length + end}"
    return None


def check_chat_template(job: Job, tokenizer) -> None:
    if job.get("model.chat_template") and not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            f"model.chat_template is true, but the tokenizer of {job.get('model.name')!r} "
            "has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja beside it): "
            "set model.chat_template: false and write the turns into model.prompt, or use a chat (instruction-tuned) "
            "checkpoint whose tokenizer has a template")


def check_max_length(job: Job, tokenizer, config) -> None:
    """batching.max_length within the model's input limit; a decoder-only generator's new tokens must fit too."""
    max_length, limit = job.get("batching.max_length"), model_input_limit(tokenizer, config)
    if max_length is None or limit is None:
        return
    where = "(the tokenizer's model_max_length, else config.max_position_embeddings)"
    if max_length > limit:
        raise UsageError(f"batching.max_length={max_length} is above the model's input limit of {limit} tokens "
                         f"{where}: set it to {limit} or less, or null for the model's limit")
    task = job.get("task")
    if task not in GENERATIVE_TASKS or getattr(config, "is_encoder_decoder", False):
        return
    new_tokens = preview_generation_config(job, config).max_new_tokens or 0
    if max_length + new_tokens > limit:
        raise UsageError(f"batching.max_length={max_length} leaves no room for the {new_tokens} new tokens "
                         f"(max_new_tokens) within the model's limit of {limit} tokens {where}: set it to "
                         f"{max(limit - new_tokens, 1)} or less, or null for the model's limit less the new tokens")
