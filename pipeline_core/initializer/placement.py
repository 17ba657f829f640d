"""Stage 3, placement: move the model to its device, after checking that it fits there.

Before moving to an accelerator, the model's size in
its dtype is compared with the device's free memory, so a too-large model fails with both numbers and a hint
instead of an out-of-memory crash half-way through the copy.
"""

from __future__ import annotations

import torch

from pipeline_core.errors import UsageError

GIB = 1024**3


def model_bytes(model) -> int:
    """Bytes of parameters and buffers, in the dtype they are loaded in."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator, or None where the backend cannot say."""
    backend = getattr(torch, device.type, None)
    mem_get_info = getattr(backend, "mem_get_info", None)
    if mem_get_info is None:
        return None
    free, _total = mem_get_info(device)
    return int(free)


def check_fits(needed: int, free: int | None, device: torch.device, dtype: torch.dtype) -> None:
    if free is None or needed <= free:
        return
    hint = "set model.dtype: bfloat16 or float16" if dtype == torch.float32 else "use a smaller model"
    raise UsageError(
        f"the model needs {needed / GIB:.2f} GiB in {str(dtype).removeprefix('torch.')} but {device} has "
        f"{free / GIB:.2f} GiB free; {hint}, or set model.device_map: auto to spread it over devices"
    )


def place_model(model, device: torch.device) -> None:
    """Move a model that accelerate did not place (the caller skips models loaded with a device_map)."""
    if device.type != "cpu":
        check_fits(model_bytes(model), free_memory(device), device, next(model.parameters()).dtype)
    model.to(device)
