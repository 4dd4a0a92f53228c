"""iter_weights over single-file and sharded safetensors checkpoints, and sharded GGUF conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loom.model import gguf_convert
from loom.model.files import resolve_model
from loom.model.weights import iter_weights
from tests.tiny_models import write_gguf_from_hf


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(2, 2, generator=g).half(),
    }


def test_single_file_keeps_stored_dtypes(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    got = dict(iter_weights(tmp_path))
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({"a.weight": tensors["a.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in ("b.weight", "c.weight")}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
        "c.weight": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = dict(iter_weights(tmp_path))
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda d: None, "no model.safetensors"),
        (lambda d: (d / "model.safetensors.index.json").write_text("{"), "malformed safetensors index"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "gone.safetensors"}}'),
            "shards listed but missing",
        ),
        (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "unreadable safetensors file"),
    ],
    ids=["empty", "bad-index", "missing-shard", "garbage"],
)
def test_bad_checkpoints_raise_value_error(setup, problem: str, tmp_path: Path) -> None:
    setup(tmp_path)
    with pytest.raises(ValueError, match=problem) as info:
        list(iter_weights(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_large_conversions_are_sharded(tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SHARD_BYTES the converter writes shards plus an index, which iter_weights and transformers read."""
    import transformers
    hf_dir = tiny_model("qwen2")
    monkeypatch.setattr(gguf_convert, "SHARD_BYTES", 8 << 20)  # the two 12.6 MB embedding matrices split it
    out = resolve_model(write_gguf_from_hf(hf_dir, tmp_path / "m.gguf"), cache_dir=tmp_path / "cache")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and not (out / "model.safetensors").exists()
    original = dict(iter_weights(hf_dir))
    got = dict(iter_weights(out))
    assert got.keys() == original.keys() == index["weight_map"].keys()
    assert all(torch.equal(got[k], w) for k, w in original.items())
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
