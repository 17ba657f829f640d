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


def test_placement_asks_the_target_device_and_names_it_and_the_dtype(monkeypatch):
    asked = []
    monkeypatch.setattr(placement, "free_memory", lambda device: asked.append(device) or GIB // 4)
    # 0.50 GiB of bfloat16 weights, on the meta device so that the test allocates nothing
    model = torch.nn.Linear(1024 * 256, 1024, bias=False, device="meta", dtype=torch.bfloat16)
    with pytest.raises(UsageError) as caught:
        place_model(model, torch.device("xpu", 1))
    assert asked == [torch.device("xpu", 1)]
    assert str(caught.value).startswith("the model needs 0.50 GiB in bfloat16 but xpu:1 has 0.25 GiB free; "
                                        "use a smaller model,")


def test_placement_moves_the_model_to_its_device():
    # the meta device stands in for an accelerator: torch has no backend module for it, so no room check
    model = torch.nn.Linear(2, 2)
    place_model(model, torch.device("meta"))
    assert model.weight.device.type == "meta" and model.bias.device.type == "meta"


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


def test_a_model_exactly_as_large_as_the_free_memory_fits():
    check_fits(int(12 * GIB), int(12 * GIB), torch.device("cuda", 0), torch.float32)
    with pytest.raises(UsageError):
        check_fits(int(12 * GIB) + 1, int(12 * GIB), torch.device("cuda", 0), torch.float32)


def test_the_hint_depends_on_the_dtype():
    with pytest.raises(UsageError) as caught:
        check_fits(int(3 * GIB), int(1 * GIB), torch.device("cuda", 1), torch.float32)
    assert str(caught.value) == (
        "the model needs 3.00 GiB in float32 but cuda:1 has 1.00 GiB free; set model.dtype: bfloat16 or float16, "
        "or set model.device_map: auto to spread it over devices"
    )
    with pytest.raises(UsageError) as caught:  # already in half precision: only a smaller model helps
        check_fits(int(1.5 * GIB), int(0.25 * GIB), torch.device("xpu", 0), torch.bfloat16)
    assert str(caught.value) == (
        "the model needs 1.50 GiB in bfloat16 but xpu:0 has 0.25 GiB free; use a smaller model, "
        "or set model.device_map: auto to spread it over devices"
    )


def test_free_memory_is_the_free_half_of_the_backends_mem_get_info(monkeypatch):
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return (float(5 * GIB + device.index), 80 * GIB)  # free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    free = placement.free_memory(torch.device("cuda", 1))
    assert free == 5 * GIB + 1 and isinstance(free, int)
    assert asked == [torch.device("cuda", 1)]


def test_free_memory_is_unknown_where_the_backend_cannot_say(monkeypatch):
    monkeypatch.delattr(torch.cuda, "mem_get_info")
    assert placement.free_memory(torch.device("cuda", 0)) is None
    assert not hasattr(torch, "meta")  # a device type without a backend module
    assert placement.free_memory(torch.device("meta")) is None
