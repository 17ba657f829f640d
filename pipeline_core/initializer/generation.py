"""Stage 4, generation settings: an isolated GenerationConfig per pipeline, merged in a fixed order.

model's generation config < batchrun's task defaults < config.task_specific_params[task] < manifest model.generation.
transformers >= 5.20 no longer isolates or applies task_specific_params itself, so batchrun does; the model's own
generation_config is never touched, so two pipelines over one model keep separate settings.
"""

from __future__ import annotations

import copy
import logging

from transformers import GenerationConfig

from pipeline_core.errors import UsageError

log = logging.getLogger("batchrun")

GENERATIVE_TASKS = ("summarization", "text-generation")
# Applied only where the model leaves the length unset: a checkpoint's tuned lengths (bart-large-cnn's
# max_length=142) must survive, but without any limit generate() would stop at its global 20 tokens.
TASK_DEFAULTS = {
    "summarization": {"max_new_tokens": 256},
    "text-generation": {"max_new_tokens": 256},
}


def isolate_generation_config(model, task: str, manifest_settings: dict) -> tuple[GenerationConfig, str | None]:
    """The merged settings for this pipeline and the input prefix from task_specific_params."""
    return merge_generation_config(model.generation_config, model.config, task, manifest_settings)


def preview_generation_config(job, model_config) -> GenerationConfig:
    """The settings isolate_generation_config will give, before the weights load: from the checkpoint's
    generation_config.json, else from its config, as from_pretrained makes the model's."""
    name, revision = job.get("model.name"), job.get("model.revision")
    try:
        base = GenerationConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError):
        base = GenerationConfig.from_model_config(model_config)
    return merge_generation_config(base, model_config, job.get("task"), job.get("model.generation"))[0]


def merge_generation_config(base: GenerationConfig | None, model_config, task: str,
                            manifest_settings: dict) -> tuple[GenerationConfig, str | None]:
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    if config.max_length is None and config.max_new_tokens is None:
        config.update(**TASK_DEFAULTS[task])
    task_params = dict((getattr(model_config, "task_specific_params", None) or {}).get(task) or {})
    prefix = task_params.pop("prefix", None) or None
    unused = config.update(**task_params)
    if unused:
        log.info("task_specific_params[%r]: ignoring %s (not generate() settings)", task, ", ".join(sorted(unused)))
    try:
        config.update(**manifest_settings)
        # hard errors raise; incoherent flags (temperature without do_sample) are only logged, as generate() does,
        # since many checkpoints ship such flags in their own generation_config.json
        config.validate(user_set_attributes=set(manifest_settings))
    except ValueError as error:
        raise UsageError(f"model.generation: {error}") from error
    return config, prefix


def align_special_tokens(config: GenerationConfig, tokenizer, is_causal: bool) -> None:
    """Give generation and batching a pad token: the config's, else the tokenizer's, else (causal LMs) EOS."""
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None and is_causal and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("the tokenizer has no pad token; padding with its EOS token %r", tokenizer.eos_token)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token_id is None and config.pad_token_id is not None:
        tokenizer.pad_token_id = config.pad_token_id


def generation_settings(config: GenerationConfig | None) -> dict | None:
    """What `plan` prints: the settings that differ from generate()'s own defaults."""
    if config is None:
        return None
    settings = config.to_diff_dict()
    settings.pop("transformers_version", None)
    return settings
