"""Placement's room check, and processor inference (stages 3 and 5), on stand-in objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import ViTImageProcessor

from pipeline_core.errors import UsageError
from pipeline_core.initializer import placement
from pipeline_core.initializer.components import Components
from pipeline_core.initializer.placement import GIB, check_fits, model_bytes, place_model
from pipeline_core.initializer.processors import infer_processor_parts


def test_model_bytes_counts_parameters_and_buffers_in_their_dtype():
    model = torch.nn.BatchNorm1d(10)  # 20 parameters, 21 buffer elements (mean, var, count)
    assert model_bytes(model) == 20 * 4 + 10 * 4 + 10 * 4 + 8
    assert model_bytes(model.to(torch.bfloat16)) == 20 * 2 + 10 * 2 + 10 * 2 + 8


def test_too_large_for_the_device_fails_with_both_numbers_and_a_hint():
    with pytest.raises(UsageError) as caught:
        check_fits(int(30 * GIB), int(12 * GIB), torch.device("cuda", 0), torch.float32)
    message = str(caught.value)
    assert "needs 30.00 GiB in float32 but cuda:0 has 12.00 GiB free" in message
    assert "model.dtype: bfloat16" in message and "model.device_map: auto" in message


def test_fits_or_unknown_free_memory_passes():
    check_fits(int(11 * GIB), int(12 * GIB), torch.device("cuda", 0), torch.bfloat16)
    check_fits(int(99 * GIB), None, torch.device("mps", 0), torch.float32)


def test_placement_checks_room_before_moving_to_an_accelerator(monkeypatch):
    model = torch.nn.Linear(1024, 1024)  # 4 MiB in float32
    monkeypatch.setattr(placement, "free_memory", lambda device: 1024)
    with pytest.raises(UsageError, match="has 0.00 GiB free"):
        place_model(model, torch.device("cuda", 0))


def test_placement_on_cpu_moves_without_a_check(monkeypatch):
    monkeypatch.setattr(placement, "free_memory", lambda device: pytest.fail("no room check on the CPU"))
    model = torch.nn.Linear(2, 2)
    place_model(model, torch.device("cpu"))
    assert model.weight.device.type == "cpu"


def test_processor_parts_fill_what_is_missing():
    tokenizer, extractor, images = object(), object(), object()
    processor = SimpleNamespace(tokenizer=tokenizer, feature_extractor=extractor, image_processor=images)
    parts = Components(config=None, model=None, processor=processor)
    infer_processor_parts(parts)
    assert (parts.tokenizer, parts.feature_extractor, parts.image_processor) == (tokenizer, extractor, images)


def test_processor_does_not_replace_what_was_loaded():
    own = object()
    parts = Components(config=None, model=None, tokenizer=own, processor=SimpleNamespace(tokenizer=object()))
    infer_processor_parts(parts)
    assert parts.tokenizer is own and parts.image_processor is None


def test_a_feature_extractor_that_is_an_image_processor_serves_as_one():
    vision = ViTImageProcessor(size={"height": 32, "width": 32})
    parts = Components(config=None, model=None, processor=SimpleNamespace(feature_extractor=vision))
    infer_processor_parts(parts)
    assert parts.image_processor is vision


def test_an_audio_feature_extractor_is_not_an_image_processor():
    parts = Components(config=None, model=None, feature_extractor=SimpleNamespace(sampling_rate=16000))
    infer_processor_parts(parts)
    assert parts.image_processor is None
