"""Stage 1, components: the model class that fits the task, its weights, and the preprocessing it needs.

Built on the Auto classes, not `transformers.pipeline()`, which transformers 5 no longer offers for summarization.
Remote code stays off unless the manifest turns it on; `dtype: auto` keeps the checkpoint's precision.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AutoConfig

from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.manifest import Job

IMAGE_TASKS = ("image-classification",)
# Tokenizers without a real limit report model_max_length as a huge sentinel (int(1e30)).
_NO_LIMIT = 1_000_000


def model_input_limit(tokenizer, model_config) -> int | None:
    """The longest input the model accepts: the tokenizer's limit, else the position embeddings'."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _NO_LIMIT:
        return int(limit)
    positions = getattr(model_config, "max_position_embeddings", None)
    return int(positions) if positions else None


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Components:
    config: Any
    model: Any
    tokenizer: Any = None
    feature_extractor: Any = None
    image_processor: Any = None
    processor: Any = None


def model_class_for(task: str, config) -> type:
    """The Auto class for a task; summarization and generation follow the architecture."""
    if task in ("summarization", "text-generation"):
        seq2seq = getattr(config, "is_encoder_decoder", False)
        return transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    return {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
        "feature-extraction": transformers.AutoModel,
        "image-classification": transformers.AutoModelForImageClassification,
    }[task]


def _common(job: Job) -> dict:
    return {"revision": job.get("model.revision"), "trust_remote_code": job.get("model.trust_remote_code")}


def load_config(job: Job):
    name = job.get("model.name")
    return _load("model", name, lambda: AutoConfig.from_pretrained(name, **_common(job)))


def load_tokenizer(job: Job):
    """The checkpoint's tokenizer, or None when it has none of its own (a processor may hold one)."""
    name = job.get("model.name")
    return _optional(lambda: transformers.AutoTokenizer.from_pretrained(name, **_common(job)))


def load_components(job: Job, preview=None) -> Components:
    """`preview`: the config and tokenizer the preview stage loaded already (initializer/preview.py)."""
    name = job.get("model.name")
    if job.get("task") in IMAGE_TASKS:
        require_pillow(job.get("task"))  # before the weights load
    common = _common(job)
    config = preview.config if preview is not None else load_config(job)
    model_class = model_class_for(job.get("task"), config)
    dtype = job.get("model.dtype")
    model = _load(
        "model",
        name,
        lambda: model_class.from_pretrained(
            name,
            config=config,
            dtype="auto" if dtype == "auto" else DTYPES[dtype],
            device_map=job.get("model.device_map"),
            **common,
        ),
    )
    parts = Components(config=config, model=model)
    if job.get("task") in IMAGE_TASKS:
        parts.image_processor = _optional(lambda: transformers.AutoImageProcessor.from_pretrained(name, **common))
    else:
        parts.tokenizer = preview.tokenizer if preview is not None else load_tokenizer(job)
    if parts.tokenizer is None and parts.image_processor is None:
        # multimodal repositories ship one processor instead; stage 5 takes its parts
        parts.processor = _optional(lambda: transformers.AutoProcessor.from_pretrained(name, **common))
    return parts


def require_pillow(task: str) -> None:
    """Exit 2 naming the extra: without Pillow the image processor would not load, and no image could be read."""
    if importlib.util.find_spec("PIL") is None:
        raise UsageError(f"{task} reads images with Pillow, which is not installed: pip install \"batchrun[images]\"")


def _load(what: str, name: str, load):
    """Run a from_pretrained call, turning its failures into messages that name model.name."""
    try:
        return load()
    except ValueError as error:  # e.g. an architecture the Auto class does not map, remote code refused
        raise UsageError(f"model.name={name!r} cannot be loaded as this task's {what}: {error}") from error
    except OSError as error:
        looks_local = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
        if looks_local and not os.path.exists(os.path.expanduser(name)):
            raise UsageError(f"model.name={name!r}: no such directory") from error
        raise BatchrunError(f"model.name={name!r} could not be loaded: {_first_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - a damaged weights file (SafetensorError), out of memory: named
        raise BatchrunError(f"model.name={name!r} could not be loaded: {type(error).__name__}: "
                            f"{_first_line(error)}") from error


def _optional(load):
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
