"""The device module: resolving devices and dtypes, measuring free memory for the KV cache."""

from __future__ import annotations

import pytest
import torch

from loom.model.device import free_memory_bytes, kv_cache_budget, resolve_device, resolve_dtype
from loom.sampling import SamplingParams, position_generator, sample_seed


def test_auto_resolves_to_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_or_missing_devices_are_rejected_clearly():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' requested but torch sees no GPU"):
            resolve_device("cuda")


def test_dtype_auto_follows_the_cpu_and_names_are_checked():
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_kv_budget_is_free_memory_less_the_headroom():
    cpu = torch.device("cpu")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    free = free_memory_bytes(cpu)
    assert abs(free - available) < available // 10
    budget = kv_cache_budget(cpu)
    assert 0 < budget <= free - (1 << 30) and budget <= 0.76 * free


def test_seeded_generators_live_on_the_device():
    seed = sample_seed(SamplingParams(seed=3), 0)
    assert seed is not None and position_generator(seed, 5, resolve_device("auto")).device == resolve_device("auto")
