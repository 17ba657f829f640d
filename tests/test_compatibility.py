"""Compatibility checks (the initializer's last stage), each on its own: what an image processor produces against
config.image_size, sampling rates, tokenizer against embeddings, pad and EOS tokens, and models that cannot generate.

Models are stand-ins holding a real config where only the config is read; the exact messages are asserted, since
users read them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import CLIPImageProcessor, ViTConfig, ViTImageProcessor

from pipeline_core.errors import UsageError
from pipeline_core.initializer.compat import check_compatibility, output_image_size
from pipeline_core.initializer.components import Components

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
