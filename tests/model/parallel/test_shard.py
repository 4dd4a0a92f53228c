"""loom.model.parallel.shard: which rows and columns each rank keeps, packed weights cut without
unpacking, and models that cannot be split refused."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.model.parallel.shard import Shard
from loom.model.quant.formats import FORMATS
from loom.model.quant.packed import PackedWeight


def _config(heads: int = 9, kv_heads: int = 3, intermediate: int = 1536) -> ModelConfig:
    return ModelConfig("llama", vocab_size=100, hidden_size=576, num_layers=2, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=64, intermediate_size=intermediate)


def test_shards_cover_the_model_once_and_keep_the_query_group() -> None:
    c = _config()
    shards = [Shard.of(c, r, 2) for r in range(2)]
    assert [s.kv_heads for s in shards] == [(0, 1), (1, 3)]  # the odd head goes to the later rank
    assert [s.q_heads for s in shards] == [(0, 3), (3, 9)]
    assert [s.intermediate for s in shards] == [(0, 768), (768, 1536)]
    local = shards[1].config(c)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.head_dim) == (6, 2, 768, 64)


def test_intermediate_splits_in_whole_quantization_groups() -> None:
    # 4864 = 19 x 256: K-quant super-blocks stay whole, so the ranks get 9 and 10 of them.
    shards = [Shard.of(_config(14, 2, 4864), r, 2) for r in range(2)]
    assert [s.intermediate for s in shards] == [(0, 2304), (2304, 4864)]
    assert [s.intermediate for s in (Shard.of(_config(4, 2, 96), r, 2) for r in range(2))] == [(0, 32), (32, 96)]


def test_more_ranks_than_key_value_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 4 key/value heads; this model has 3"):
        Shard.of(_config(), 0, 4)


def test_weights_keep_rows_of_column_parallel_and_columns_of_row_parallel_projections() -> None:
    c = _config(4, 2, 128)
    shard = Shard.of(c, 1, 2)
    p = "model.layers.0."
    full = {
        p + "self_attn.q_proj.weight": torch.randn(256, 576), p + "self_attn.q_proj.bias": torch.randn(256),
        p + "self_attn.k_proj.weight": torch.randn(128, 576), p + "self_attn.o_proj.weight": torch.randn(576, 256),
        p + "mlp.up_proj.weight": torch.randn(128, 576), p + "mlp.down_proj.weight": torch.randn(576, 128),
        p + "input_layernorm.weight": torch.randn(576), "model.embed_tokens.weight": torch.randn(100, 576),
    }
    got = dict(shard.weights(full.items()))
    assert torch.equal(got[p + "self_attn.q_proj.weight"], full[p + "self_attn.q_proj.weight"][128:])
    assert torch.equal(got[p + "self_attn.q_proj.bias"], full[p + "self_attn.q_proj.bias"][128:])
    assert torch.equal(got[p + "self_attn.k_proj.weight"], full[p + "self_attn.k_proj.weight"][64:])
    assert torch.equal(got[p + "self_attn.o_proj.weight"], full[p + "self_attn.o_proj.weight"][:, 128:])
    assert torch.equal(got[p + "mlp.up_proj.weight"], full[p + "mlp.up_proj.weight"][64:])
    assert torch.equal(got[p + "mlp.down_proj.weight"], full[p + "mlp.down_proj.weight"][:, 64:])
    for name in (p + "input_layernorm.weight", "model.embed_tokens.weight"):
        assert got[name] is full[name]


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q5_1", "q8_0"])
def test_packed_rows_and_columns_are_the_dense_slices(fmt: str) -> None:
    w = PackedWeight.quantize(torch.randn(48, 256), FORMATS[fmt])
    dense = w.dequantize()
    assert torch.equal(w.rows(16, 40).dequantize(), dense[16:40])
    assert torch.equal(w.columns(64, 192).dequantize(), dense[:, 64:192])
    x = torch.randn(3, 256)
    split = w.columns(0, 96).matmul(x[:, :96].contiguous()) + w.columns(96, 256).matmul(x[:, 96:].contiguous())
    torch.testing.assert_close(split, w.matmul(x), rtol=1e-4, atol=1e-4)  # activations quantize per block either way


def test_packed_columns_off_a_group_boundary_stay_dense() -> None:
    w = PackedWeight.quantize(torch.randn(8, 128), FORMATS["q4_1"])
    with pytest.raises(ValueError, match="not whole groups of 32"):
        w.columns(16, 128)
    shard = Shard(1, 2, 16, (1, 2), (1, 2), (16, 128))  # intermediate units cut mid-block
    ((_, got),) = shard.weights([("model.layers.0.mlp.down_proj.weight", w)])
    assert isinstance(got, torch.Tensor) and torch.equal(got, w.dequantize()[:, 16:128])
