"""loom.config: engine options declared once on the dataclass fields, flat options mapped onto the
nested configs, and bad values rejected when a config is built."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import loom.config
from loom.config import GIB, CacheConfig, EngineConfig, ModelConfig, RopeScaling, SchedulerConfig, SpeculativeConfig, engine_options
from loom.engine import engine_config

LLM_KEYWORDS = {
    "dtype", "quantization", "device", "attention_backend", "num_threads", "tensor_parallel_size", "max_model_len", "block_size",
    "num_blocks", "kv_cache_bytes",
    "kv_cache_dtype", "kv_cache_layers", "kv_residual_tokens", "kv_quant_group", "swap_space", "swap_dtype",
    "preemption_mode", "session_ttl", "session_ttl_max", "swap_blocks_per_step",
    "enable_prefix_caching", "max_num_batched_tokens", "max_num_seqs", "policy", "policy_config", "tenant_weights", "max_waiting", "seed",
    "speculative", "speculative_k", "speculative_max_k", "speculative_model", "speculative_config",
}  # fmt: skip


def test_config_module_imports_nothing_from_loom() -> None:
    tree = ast.parse(Path(loom.config.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "loom"], imported


def test_engine_options_cover_every_field_once() -> None:
    opts = engine_options()
    assert [o.name for o in opts][0] == "model"
    assert {o.name for o in opts} == LLM_KEYWORDS | {"model"}
    assert len({o.name for o in opts}) == len(opts)
    for o in opts:
        cls = {None: EngineConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
               "speculation": SpeculativeConfig}[o.section]
        f = next(f for f in dataclasses.fields(cls) if f.name == o.name)
        assert o.default == f.default and o.metadata["help"], o.name
    assert not hasattr(EngineConfig, "with_")


def test_from_options_maps_flat_names_onto_the_nested_configs() -> None:
    cfg = EngineConfig.from_options(
        "m.gguf", dtype="float32", device="cpu", num_threads=2, max_model_len=100, seed=7, block_size=4,
        num_blocks=9, kv_cache_bytes=GIB, enable_prefix_caching=False, max_num_batched_tokens=32,
        max_num_seqs=3, policy="fcfs", max_waiting=5,
    )  # fmt: skip
    assert cfg == EngineConfig(
        model="m.gguf", dtype="float32", device="cpu", num_threads=2, max_model_len=100, seed=7,
        cache=CacheConfig(block_size=4, kv_cache_bytes=GIB, num_blocks=9, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=3, policy="fcfs", max_waiting=5),
    )  # fmt: skip
    # None means "the default", as the CLI passes options it was not given.
    assert EngineConfig.from_options(None, block_size=None, dtype=None) == EngineConfig()
    assert EngineConfig().device == "auto"
    assert (EngineConfig().cache.kv_cache_bytes, EngineConfig().cache.num_blocks) == (None, None)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(wat=1), r"unknown engine option\(s\): wat"),
        (dict(block_size=0), r"block_size \(--block-size\) must be >= 1, got 0"),
        (dict(block_size=2.5), r"block_size \(--block-size\) must be an integer"),
        (dict(num_blocks=-1), r"num_blocks \(--num-blocks\) must be >= 1"),
        (dict(kv_cache_bytes=0), r"kv_cache_bytes \(--kv-cache-memory\) must be > 0"),
        (dict(max_num_batched_tokens=0), r"max_num_batched_tokens \(--max-num-batched-tokens\) must be >= 1"),
        (dict(max_num_seqs=0), r"max_num_seqs \(--max-num-seqs\) must be >= 1"),
        (dict(max_waiting=0), r"max_waiting \(--max-waiting\) must be >= 1"),
        (dict(num_threads=0), r"num_threads \(--threads\) must be >= 1"),
        (dict(max_model_len=0), r"max_model_len \(--max-model-len\) must be >= 1"),
        (dict(dtype="fp8"), r"dtype \(--dtype\) must be one of auto, bfloat16, float32; got 'fp8'"),
        (dict(device="tpu"), r"device \(--device\) must be one of auto, cpu, cuda; got 'tpu'"),
        (dict(enable_prefix_caching="no"), r"enable_prefix_caching .* must be a bool"),
    ],
)
def test_bad_values_are_rejected_when_the_config_is_built(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_options(None, **options)


def test_engine_config_checks_the_policy_and_its_options() -> None:
    from loom.scheduler import POLICIES

    assert engine_config(policy=next(iter(POLICIES))).scheduler.policy in POLICIES
    with pytest.raises(ValueError, match=r"policy \(--policy\) must be one of fcfs, priority, vtc, lpm, dlpm, slo, sjf; got 'lifo'"):
        engine_config(policy="lifo")
    with pytest.raises(ValueError, match="unknown option 'quantum' for the vtc policy"):
        engine_config(policy="vtc", policy_config='{"quantum": 3}')


def test_model_config_is_a_plain_frozen_dataclass() -> None:
    cfg = ModelConfig("llama", 10, 8, 1, 2, 1, 4, 16)
    assert cfg.rope_scaling == RopeScaling() and (cfg.q_size, cfg.kv_size) == (8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3  # type: ignore[misc]
    assert not hasattr(ModelConfig, "from_hf_dir") and not hasattr(ModelConfig, "from_hf_dict")
