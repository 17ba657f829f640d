"""Tasks: small objects with encode (in workers), collate, forward (on the device), decode, and their columns.

`build_task` picks the task of the job and wires it to the initialized pipeline; there is no registry.
"""

from __future__ import annotations

from pipeline_core.errors import NotImplementedYet
from pipeline_core.initializer import InferencePipeline
from pipeline_core.initializer.components import model_input_limit
from pipeline_core.initializer.generation import GENERATIVE_TASKS as GENERATIVE
from pipeline_core.manifest import Job
from pipeline_core.tasks.classification import TextClassificationTask
from pipeline_core.tasks.feature_extraction import FeatureExtractionTask, prompt_length
from pipeline_core.tasks.generation import GenerationTask
from pipeline_core.tasks.image_classification import ImageClassificationTask, ImageEncoder
from pipeline_core.tasks.text import TextEncoder
from pipeline_core.tasks.token_classification import TokenClassificationTask


def build_task(job: Job, pipeline: InferencePipeline, should_stop=lambda: False):
    task = job.get("task")
    model = pipeline.model
    if task == "image-classification":
        encoder = ImageEncoder(pipeline.components.image_processor, job.get("dataset.image_column"), model.dtype)
        return ImageClassificationTask(encoder, model.config)
    # CUDA kernels prefer shapes in multiples of 8; elsewhere padding is pure waste
    pad_multiple = 8 if pipeline.device.type == "cuda" else 1
    embedding = pipeline.embedding
    decoder_generation = task in GENERATIVE and not model.config.is_encoder_decoder
    encoder = TextEncoder(
        pipeline.tokenizer,
        job.get("dataset.input_column"),
        # feature-extraction: the job's batching.max_length, else the checkpoint's trained length
        max_length=(embedding.max_length if embedding else job.get("batching.max_length")) or input_limit(pipeline),
        prefix=embedding.prompt if embedding else pipeline.input_prefix,
        prompt=job.get("model.prompt"),
        chat_template=job.get("model.chat_template"),
        offsets=task == "token-classification",
        left_padding=decoder_generation,
        pad_multiple=pad_multiple,
        keep_template=decoder_generation,
    )
    if task in GENERATIVE:
        column = "summary_text" if task == "summarization" else "generated_text"
        return GenerationTask(encoder, pipeline.generation_config, column, decoder_generation, should_stop)
    if task == "text-classification":
        return TextClassificationTask(encoder, model.config)
    if task == "token-classification":
        return TokenClassificationTask(encoder, model.config)
    if task == "feature-extraction":
        excluded = prompt_length(pipeline.tokenizer, embedding.prompt)
        return FeatureExtractionTask(encoder, embedding, pipeline.dense, excluded)
    raise NotImplementedYet(f"task {task!r} is planned but `batchrun run` cannot run it yet")


def input_limit(pipeline: InferencePipeline) -> int | None:
    """The model's input limit; a decoder-only model must also fit the new tokens in its positions."""
    limit = model_input_limit(pipeline.tokenizer, pipeline.model.config)
    settings = pipeline.generation_config
    if limit and settings is not None and not pipeline.model.config.is_encoder_decoder and settings.max_new_tokens:
        return max(limit - settings.max_new_tokens, 1)
    return limit
