"""Device resolution: priority order, explicit names, -1, device maps, distributed ranks, and each error.

Accelerator availability is faked by patching the backend checks the module calls.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline_core.errors import UsageError
from pipeline_core.initializer import device as device_stage
from pipeline_core.initializer.device import (
    PRIORITY,
    available_accelerators,
    check_device_request,
    resolve_device,
)


@pytest.fixture
def fake_accelerators(monkeypatch):
    """Make exactly the given accelerator kinds available, with the given device counts."""

    def install(**counts):
        for kind in PRIORITY:
            monkeypatch.setitem(device_stage.AVAILABILITY, kind, lambda kind=kind: kind in counts)
        monkeypatch.setattr(device_stage, "device_count", lambda kind: counts[kind])
        return available_accelerators()

    return install


def test_no_accelerator_means_cpu_for_auto_index_and_minus_one(fake_accelerators):
    found = fake_accelerators()
    assert found == {}
    for requested in ("auto", 0, 3, -1, "cpu"):
        assert resolve_device(requested, found) == "cpu"


def test_priority_order_mlu_musa_cuda_npu_hpu_xpu_mps(fake_accelerators):
    assert PRIORITY == ("mlu", "musa", "cuda", "npu", "hpu", "xpu", "mps")
    everything = dict.fromkeys(PRIORITY, 2)
    for position, kind in enumerate(PRIORITY):
        found = fake_accelerators(**{k: n for k, n in everything.items() if PRIORITY.index(k) >= position})
        assert next(iter(found)) == kind
        assert resolve_device("auto", found) == f"{kind}:0"
        assert resolve_device(1, found) == f"{kind}:1"


def test_cuda_before_xpu_and_mps(fake_accelerators):
    found = fake_accelerators(mps=1, xpu=1, cuda=4)
    assert list(found) == ["cuda", "xpu", "mps"]
    assert resolve_device("auto", found) == "cuda:0"
    assert resolve_device(3, found) == "cuda:3"
    assert resolve_device("xpu", found) == "xpu:0"
    assert resolve_device("mps", found) == "mps:0"


def test_index_past_the_last_device_is_an_error(fake_accelerators):
    found = fake_accelerators(cuda=2)
    with pytest.raises(UsageError, match=r"model.device=2 asks for cuda:2, but this machine has cuda:0, cuda:1, cpu"):
        resolve_device(2, found)
    with pytest.raises(UsageError, match=r"'cuda:5', but this machine has only cuda:0, cuda:1, cpu"):
        resolve_device("cuda:5", found)


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "xpu", "hpu", "npu", "mlu", "musa", "mps"])
def test_named_device_that_is_missing_fails_and_lists_what_exists(fake_accelerators, requested):
    found = fake_accelerators()
    kind = requested.split(":")[0].upper()
    with pytest.raises(UsageError, match=rf"{kind} is not available on this machine; available: cpu"):
        resolve_device(requested, found)
    with pytest.raises(UsageError, match="not available"):  # also before any weights load
        check_device_request(requested, None, found)


def test_named_device_never_falls_back(fake_accelerators):
    found = fake_accelerators(xpu=1)
    with pytest.raises(UsageError, match=r"CUDA is not available on this machine; available: xpu:0, cpu"):
        resolve_device("cuda", found)


def test_minus_one_is_the_models_own_device(fake_accelerators):
    found = fake_accelerators(cuda=1)
    assert resolve_device(-1, found, model_device=torch.device("cpu")) == "cpu"
    assert resolve_device(-1, found, model_device="cuda:0") == "cuda:0"
    assert resolve_device(-1, found) == "cpu"


@pytest.mark.parametrize("requested", ["cpu", "cuda", 0, -1])
def test_device_map_plus_explicit_device_conflicts(fake_accelerators, requested):
    found = fake_accelerators(cuda=2)
    with pytest.raises(UsageError, match="conflicting device specifications"):
        check_device_request(requested, "auto", found)
    with pytest.raises(UsageError, match="conflicting device specifications"):
        resolve_device(requested, found, hf_device_map={"encoder": 0, "decoder": 1})


def test_device_map_with_auto_uses_the_first_device_of_the_map(fake_accelerators):
    found = fake_accelerators(cuda=2)
    assert resolve_device("auto", found, hf_device_map={"embed": 1, "layers": 0}) == "cuda:1"
    assert resolve_device("auto", found, hf_device_map={"embed": "cpu", "layers": 0}) == "cpu"
    assert resolve_device("auto", found, hf_device_map={"": "disk"}) == "cpu"
    assert resolve_device("auto", fake_accelerators(), hf_device_map={"": torch.device("cpu")}) == "cpu"


def test_distributed_rank_wins(fake_accelerators):
    found = fake_accelerators(cuda=8)
    assert resolve_device("cuda:0", found, local_rank=3) == "cuda:3"
    assert resolve_device("auto", found, local_rank=5) == "cuda:5"
    assert resolve_device("auto", fake_accelerators(), local_rank=1) == "cpu"


def test_distributed_local_rank_reads_the_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert device_stage.distributed_local_rank() == 2
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert device_stage.distributed_local_rank() is None


def test_under_a_launcher_the_local_rank_needs_no_process_group(monkeypatch):
    # torchrun and accelerate launch set WORLD_SIZE and LOCAL_RANK; batchrun's ranks never form a process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert device_stage.distributed_local_rank() == 3
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process that happens to have LOCAL_RANK set
    assert device_stage.distributed_local_rank() is None



def test_index_equal_to_the_device_count_is_past_the_end(fake_accelerators):
    found = fake_accelerators(cuda=2)
    assert resolve_device("cuda:1", found) == "cuda:1"
    with pytest.raises(UsageError) as caught:
        resolve_device("cuda:2", found)
    assert str(caught.value) == "model.device='cuda:2', but this machine has only cuda:0, cuda:1, cpu"


def test_bare_indices_of_a_device_map_go_to_the_first_accelerator_else_cuda(fake_accelerators):
    # accelerate writes GPU placements as bare indices; with no accelerator seen, they are CUDA's
    assert resolve_device("auto", fake_accelerators(), hf_device_map={"": 1}) == "cuda:1"
    assert resolve_device("auto", fake_accelerators(xpu=2), hf_device_map={"": 1, "head": 0}) == "xpu:1"


def test_device_count_asks_the_backend_and_counts_at_least_one(monkeypatch):
    monkeypatch.setattr(torch, "fakeaccel", SimpleNamespace(device_count=lambda: 3), raising=False)
    assert device_stage.device_count("fakeaccel") == 3
    monkeypatch.setattr(torch, "fakeaccel", SimpleNamespace(device_count=lambda: 1))
    assert device_stage.device_count("fakeaccel") == 1
    # a kind that reports itself available counts one device even when its backend says none
    monkeypatch.setattr(torch, "fakeaccel", SimpleNamespace(device_count=lambda: 0))
    assert device_stage.device_count("fakeaccel") == 1


def test_device_count_is_one_where_the_backend_cannot_count(monkeypatch):
    monkeypatch.setattr(torch, "fakeaccel", SimpleNamespace(), raising=False)  # a backend without device_count
    assert device_stage.device_count("fakeaccel") == 1
    assert not hasattr(torch, "nosuchaccel")
    assert device_stage.device_count("nosuchaccel") == 1  # no backend module at all


def test_available_accelerators_counts_each_available_kind_in_priority_order(monkeypatch):
    for kind in PRIORITY:
        monkeypatch.setitem(device_stage.AVAILABILITY, kind, lambda kind=kind: kind in ("xpu", "cuda"))
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(device_count=lambda: 2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert list(available_accelerators().items()) == [("cuda", 4), ("xpu", 2)]


def test_distributed_rank_without_local_rank_is_the_global_rank(monkeypatch):
    # a bare init_process_group sets no LOCAL_RANK: the process group's rank stands in for it
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert device_stage.distributed_local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_stage.distributed_local_rank() == 1
