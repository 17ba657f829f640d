"""The staged initializer: load the inference pipeline once, stage by stage, each stage named and timed.

components -> device resolution -> placement -> isolated generation config -> processor inference ->
inference state, then compatibility checks. `batchrun run` and `batchrun plan` share `initialize`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline_core.initializer.compat import check_compatibility
from pipeline_core.initializer.components import Components, load_components, model_input_limit
from pipeline_core.initializer.device import (
    available_accelerators,
    distributed_local_rank,
    resolve_device,
)
from pipeline_core.initializer.embedding import EmbeddingSettings, load_dense, lowercase_inputs, resolve_embedding
from pipeline_core.initializer.generation import (
    GENERATIVE_TASKS,
    align_special_tokens,
    generation_settings,
    isolate_generation_config,
)
from pipeline_core.initializer.placement import place_model
from pipeline_core.initializer.preview import ModelPreview, check_chat_template, check_max_length, preview_model
from pipeline_core.initializer.processors import infer_processor_parts
from pipeline_core.manifest import Job

log = logging.getLogger("batchrun")


@dataclass
class InferencePipeline:
    """Everything a task needs to run rows: the placed model, its preprocessing and its settings."""

    task: str
    components: Components
    device: torch.device
    generation_config: Any = None  # GenerationConfig for generative tasks
    input_prefix: str | None = None
    stages: list[tuple[str, float]] = field(default_factory=list)
    embedding: EmbeddingSettings | None = None  # feature-extraction: pooling, Dense layers, normalisation
    dense: list = field(default_factory=list)  # the checkpoint's Dense layers, placed on `device`

    @property
    def model(self):
        return self.components.model

    @property
    def tokenizer(self):
        return self.components.tokenizer


@contextmanager
def stage(name: str, stages: list):
    started = time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    stages.append((name, seconds))
    log.info("stage %-20s %.2fs", name, seconds, extra={"event": "stage", "stage": name, "seconds": round(seconds, 4)})


def initialize(job: Job, embedding: EmbeddingSettings | None = None,
               preview: ModelPreview | None = None) -> InferencePipeline:
    """`embedding`: the feature-extraction settings when the caller resolved them already (for the fingerprint);
    `preview`: the checkpoint's config and tokenizer when the caller checked them already (before OUTPUT)."""
    task, stages = job.get("task"), []
    if task == "feature-extraction" and embedding is None:
        embedding = resolve_embedding(job)  # before the weights: an unsupported module is refused at once
    if preview is None:
        preview = preview_model(job)  # the template, the length limit, the model's files: exit 2 before weights
    accelerators = available_accelerators()
    with stage("components", stages):
        components = load_components(job, preview)
    model = components.model
    # accelerate records hf_device_map only when it spreads a model; on one device the map is implicit
    placed_by_accelerate = job.get("model.device_map") is not None
    device_map = getattr(model, "hf_device_map", None) or ({"": model.device} if placed_by_accelerate else None)
    with stage("device_resolution", stages):
        device = torch.device(resolve_device(
            job.get("model.device"),
            accelerators,
            hf_device_map=device_map,
            model_device=model.device,
            # a model spread by accelerate stays where the map put it; one placed whole goes to this rank's device
            local_rank=None if placed_by_accelerate else distributed_local_rank(),
        ))
    with stage("placement", stages):
        if not placed_by_accelerate:
            place_model(model, device)
        dense = [layer.to(device) for layer in load_dense(job.get("model.name"), job.get("model.revision"),
                                                          embedding.dense)] if embedding else []
    with stage("generation_config", stages):
        generation_config, prefix = None, None
        if task in GENERATIVE_TASKS:
            generation_config, prefix = isolate_generation_config(model, task, job.get("model.generation"))
    with stage("processor_inference", stages):
        infer_processor_parts(components)
        if embedding is not None and embedding.lowercase and components.tokenizer is not None:
            lowercase_inputs(components.tokenizer)
        if generation_config is not None and components.tokenizer is not None:
            is_causal = not getattr(model.config, "is_encoder_decoder", False)
            align_special_tokens(generation_config, components.tokenizer, is_causal)
    with stage("inference_state", stages):
        set_inference_state(model)
    with stage("compatibility", stages):
        check_compatibility(task, components, generation_config)
        if preview.tokenizer is None and components.tokenizer is not None:  # a processor's: not previewed
            check_chat_template(job, components.tokenizer)
            check_max_length(job, components.tokenizer, components.config)
    return InferencePipeline(task, components, device, generation_config, prefix, stages, embedding, dense)


def set_inference_state(model) -> None:
    """eval() for dropout and norms; no parameter asks for gradients, so no forward pass can build a graph."""
    model.eval()
    model.requires_grad_(False)


def plan_summary(pipeline: InferencePipeline) -> dict:
    """The object `batchrun plan --json` prints (keys fixed by the contract)."""
    parts = pipeline.components
    return {
        "task": pipeline.task,
        "model_class": type(parts.model).__name__,
        "tokenizer_class": type(parts.tokenizer).__name__ if parts.tokenizer is not None else None,
        "processor_class": _processor_class(parts),
        "device": str(pipeline.device),
        "dtype": str(parts.model.dtype).removeprefix("torch."),
        "hf_device_map": getattr(parts.model, "hf_device_map", None),
        "generation_config": generation_settings(pipeline.generation_config),
        "input_prefix": pipeline.input_prefix,
        "embedding": embedding_summary(pipeline),
        "stages": [{"name": name, "seconds": round(seconds, 4)} for name, seconds in pipeline.stages],
    }


def embedding_summary(pipeline: InferencePipeline) -> dict | None:
    """feature-extraction: each resolved setting with where it came from (the job, the checkpoint or a default)."""
    settings = pipeline.embedding
    if settings is None:
        return None
    max_length = settings.max_length
    if max_length is None:
        max_length = model_input_limit(pipeline.tokenizer, pipeline.model.config)
    values = {
        "pooling": settings.pooling_name,
        "normalize": settings.normalize,
        "max_length": max_length,
        "prompt": settings.prompt or None,
        "dense": [f"{layer.path}: {layer.in_features}->{layer.out_features} {layer.activation.rsplit('.', 1)[-1]}"
                  for layer in settings.dense],
    }
    if settings.prompt:
        values["include_prompt"] = settings.include_prompt
    sources = settings.sources
    return {name: {"value": value, "source": sources.get(name, sources.get("modules", "default"))}
            for name, value in values.items()}


def _processor_class(parts: Components) -> str | None:
    for processor in (parts.processor, parts.image_processor, parts.feature_extractor):
        if processor is not None:
            return type(processor).__name__
    return None
