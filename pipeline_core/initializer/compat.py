"""Compatibility checks, run before any row is read: each failure is one message naming the part and the fix.

A mismatch found here would otherwise surface hours into a run as an index error on row 3,000,000.
"""

from __future__ import annotations

from pipeline_core.errors import UsageError

TEXT_TASKS = ("summarization", "text-generation", "text-classification", "token-classification", "feature-extraction")


def check_compatibility(task: str, components, generation_config) -> None:
    problems = []
    model = components.model
    if task in TEXT_TASKS:
        problems += _check_tokenizer(task, components.tokenizer, model, generation_config)
    if task == "image-classification":
        problems += _check_image_processor(components.image_processor, model.config)
    if components.feature_extractor is not None:
        problems += _check_sampling_rate(components.feature_extractor, model.config)
    if problems:
        raise UsageError("the model and its preprocessing do not fit together:\n" + "\n".join(
            f"  - {problem}" for problem in problems))


def _check_tokenizer(task, tokenizer, model, generation_config) -> list[str]:
    if tokenizer is None:
        return [
            f"{task} needs a tokenizer, and none was found beside the model (tokenizer.json, tokenizer_config.json)"
        ]
    problems = []
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but the model's input embeddings have {rows} rows; "
            "token ids past the end would crash the model: use the tokenizer trained with this model"
        )
    if generation_config is not None:
        if not model.can_generate():
            name = type(model).__name__
            problems.append(f"{name} cannot generate text, which {task} needs; choose a generative model")
        if generation_config.eos_token_id is None:
            problems.append("neither the model's generation config nor the tokenizer has an EOS token to stop on")
    if tokenizer.pad_token_id is None:
        problems.append(
            "the tokenizer has no pad token, which batching needs; use a tokenizer that defines one"
        )
    return problems


def _check_image_processor(image_processor, config) -> list[str]:
    if image_processor is None:
        return ["image-classification needs an image processor, and none was found beside the model"]
    expected = getattr(config, "image_size", None)
    produced = output_image_size(image_processor)
    if expected is None or produced is None:
        return []
    expected = tuple(expected) if isinstance(expected, (list, tuple)) else (expected, expected)
    if produced != expected:
        return [
            f"the image processor makes {produced[0]}x{produced[1]} images but the model expects "
            f"{expected[0]}x{expected[1]} (config.image_size); use the image processor saved with this model"
        ]
    return []


def output_image_size(image_processor) -> tuple[int, int] | None:
    """(height, width) of the pixel_values an image processor produces, when its settings fix it."""
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    size = dict(size) if size is not None and not isinstance(size, int) else size
    if isinstance(size, int):
        return (size, size)
    if size and "height" in size and "width" in size:
        return (size["height"], size["width"])
    return None  # shortest_edge and friends: the size depends on each image


def _check_sampling_rate(feature_extractor, config) -> list[str]:
    produced = getattr(feature_extractor, "sampling_rate", None)
    expected = getattr(config, "sampling_rate", None)
    if produced is not None and expected is not None and produced != expected:
        return [
            f"the feature extractor reads audio at {produced} Hz but the model was trained at {expected} Hz "
            "(config.sampling_rate); use the feature extractor saved with this model"
        ]
    return []
