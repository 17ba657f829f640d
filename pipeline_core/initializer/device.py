"""Stage 2, device resolution: which single device the model's inputs go to.

Rules (see issue #3): a device_map plus an explicit device conflict; `auto` and a bare index N pick accelerator N
in the order MLU, MUSA, CUDA, NPU, HPU, XPU, MPS, else the CPU; -1 is the model's own device; a named device
must exist (never a silent fallback); under torch.distributed each rank uses its own device.
"""

from __future__ import annotations

import os

import torch
from transformers.utils import (
    is_torch_cuda_available,
    is_torch_hpu_available,
    is_torch_mlu_available,
    is_torch_mps_available,
    is_torch_musa_available,
    is_torch_npu_available,
    is_torch_xpu_available,
)

from pipeline_core.errors import UsageError

# Accelerator kinds in priority order, each with its availability check (tests replace the checks).
AVAILABILITY = {
    "mlu": is_torch_mlu_available,
    "musa": is_torch_musa_available,
    "cuda": is_torch_cuda_available,
    "npu": is_torch_npu_available,
    "hpu": is_torch_hpu_available,
    "xpu": is_torch_xpu_available,
    "mps": is_torch_mps_available,
}
PRIORITY = tuple(AVAILABILITY)


def available_accelerators() -> dict[str, int]:
    """{kind: device count} for every accelerator torch can use here, in priority order."""
    return {kind: device_count(kind) for kind, is_available in AVAILABILITY.items() if is_available()}


def device_count(kind: str) -> int:
    backend = getattr(torch, kind, None)
    count = getattr(backend, "device_count", None)
    return max(int(count()), 1) if callable(count) else 1


def describe_available(accelerators: dict[str, int]) -> str:
    names = [f"{kind}:{index}" for kind, count in accelerators.items() for index in range(count)]
    return ", ".join([*names, "cpu"])


def check_device_request(requested, device_map, accelerators: dict[str, int]) -> None:
    """Fail before any weights load: a device that does not exist, or a device plus a device_map."""
    if device_map is not None and requested != "auto":
        raise UsageError(
            f"conflicting device specifications: model.device_map={device_map!r} lets accelerate place the model, "
            f"and model.device={requested!r} would move it; keep one (set model.device: auto to use the map)"
        )
    if isinstance(requested, str) and requested not in ("auto", "cpu"):
        _named_device(requested, accelerators)


def resolve_device(
    requested,
    accelerators: dict[str, int],
    hf_device_map: dict | None = None,
    model_device: torch.device | None = None,
    local_rank: int | None = None,
) -> str:
    """The device inputs are sent to, as torch spells it ("cuda:1"). `local_rank` is set under torch.distributed.

    A string, not a torch.device: npu, mlu and musa exist as device types only once their torch plugin is imported.
    """
    first = next(iter(accelerators), None)
    if local_rank is not None:  # one device per rank: the launcher's choice wins
        return f"{first}:{local_rank}" if first else "cpu"
    if hf_device_map:
        check_device_request(requested, hf_device_map, accelerators)
        return _map_device(next(iter(hf_device_map.values())), first)
    if requested == -1:
        return str(model_device or "cpu")
    if requested == "auto":
        requested = 0
    if isinstance(requested, int):
        if first is None:
            return "cpu"
        if requested >= accelerators[first]:
            raise UsageError(
                f"model.device={requested} asks for {first}:{requested}, but this machine has "
                f"{describe_available(accelerators)}"
            )
        return f"{first}:{requested}"
    if requested == "cpu":
        return "cpu"
    return _named_device(requested, accelerators)


def _named_device(requested: str, accelerators: dict[str, int]) -> str:
    kind, _, index = requested.partition(":")
    if kind not in accelerators:
        raise UsageError(
            f"model.device={requested!r}, but {kind.upper()} is not available on this machine; "
            f"available: {describe_available(accelerators)}"
        )
    if index and int(index) >= accelerators[kind]:
        raise UsageError(
            f"model.device={requested!r}, but this machine has only {describe_available(accelerators)}"
        )
    return f"{kind}:{int(index or 0)}"


def _map_device(placement, first_accelerator: str | None) -> str:
    """accelerate writes GPU placements as bare indices; 'disk' offload computes on the CPU."""
    if isinstance(placement, int):
        return f"{first_accelerator or 'cuda'}:{placement}"
    if placement == "disk":
        return "cpu"
    return str(placement)


def distributed_local_rank() -> int | None:
    """This process's local rank under a launcher (torchrun and accelerate launch set WORLD_SIZE and LOCAL_RANK;
    batchrun needs no process group) or an initialised torch.distributed; else None."""
    local_rank = os.environ.get("LOCAL_RANK")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and local_rank is not None:
        return int(local_rank)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return int(local_rank) if local_rank is not None else torch.distributed.get_rank()
