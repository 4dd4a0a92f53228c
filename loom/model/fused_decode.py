"""A decode step through a Llama-family decoder stack in one native call (``kernels/decoder_stack.cpp``).

At the default model's size (30 layers, hidden 576) the Python between the kernels of the
module-by-module forward (views, norms, rotary, cache write, attention, four projections per layer)
cost as much as the kernels. The fused stack calls the same kernels from C++, so its output equals
the module-by-module forward's. It applies when the step holds decode rows only, the attention
backend is the native CPU one over a plain cache in the compute dtype, an int8 cache or a KIVI cache
its kernel serves, and every
projection runs its native path (packed weights up to ``NATIVE_MATMUL_MAX_ROWS`` rows, or dense
ones); any other step runs the modules. A tensor-parallel rank runs it too when its group sums
through shared memory: the stack then sums the o and down outputs over the ranks itself.
``LOOM_DISABLE_FUSED_DECODE=1`` turns it off (to measure one against the other)."""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from loom.model.attention import StepAttention
from loom.model.attention.cpu import CPUAttention
from loom.model.kernels import native_ops
from loom.model.kv_cache import Int8KVCache, KiviKVCache, KVCache
from loom.model.layers import Linear
from loom.model.parallel.shard import unwrapped
from loom.model.quant.packed import NATIVE_MATMUL_MAX_ROWS

if TYPE_CHECKING:
    from loom.model.arch.llama import LlamaForCausalLM


def _projections(model: LlamaForCausalLM) -> list[Linear]:
    return [unwrapped(lin) for layer in model.layers
            for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def _projection(ops: ModuleType, layer: Linear) -> Any:
    if layer.packed:
        return ops.Projection([p._kernel_args for p in layer.packed], None, layer.bias)
    return ops.Projection([], layer.weight, layer.bias)


class FusedDecoder:
    """The native stack of one model, bound to one KV cache."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, ops: ModuleType) -> None:
        c = model.config
        self.kv = kv
        self.kivi_layers = ([list(kv.layer_tensors(i)) for i in range(kv.spec.num_layers)]
                            if isinstance(kv, KiviKVCache) else [])
        self.packed = any(lin.packed for lin in _projections(model))
        self.stack = ops.DecoderStack(c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps,
                                      model.layers[0].mlp.act.code, c.head_dim**-0.5, model.norm.weight)
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                 *(_projection(ops, unwrapped(p))
                                   for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)))
        self.group = model.tensor_parallel
        if self.group is not None:
            self.stack.set_tensor_parallel(*self.group.shared_memory_args())
        self.num_all_reduces = 2 * len(model.layers)

    def applies(self, x: torch.Tensor, attention: StepAttention) -> bool:
        meta = attention.meta
        return (not meta.prefills and meta.num_decode_rows == x.shape[0] > 0
                and (not self.packed or x.shape[0] <= NATIVE_MATMUL_MAX_ROWS))

    def __call__(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], attention: StepAttention) -> torch.Tensor:
        meta = attention.meta
        cos, sin = cos_sin
        kv = self.kv
        # A tensor-parallel rank's all-reduces take their turn in the group's sequence.
        seq = self.group.reserve(self.num_all_reduces) if self.group is not None else 0
        if isinstance(kv, KiviKVCache):
            w = meta.residual
            assert w is not None
            out = self.stack.forward_kivi(x, cos.squeeze(1), sin.squeeze(1), self.kivi_layers,
                                          [w.seal_blocks, *w.seal_from_residual, *w.seal_from_step, *w.open_rows],
                                          meta.decode_block_tables, meta.decode_context_lens, meta.decode_slots,
                                          kv.spec.bits, kv.spec.residual_tokens, seq)
        else:
            out = self.stack.forward(x, cos.squeeze(1), sin.squeeze(1), kv.keys, kv.values, kv.key_scales,
                                     kv.value_scales, meta.decode_block_tables, meta.decode_context_lens,
                                     meta.slot_blocks, meta.slot_offsets, seq)
        if self.group is not None:
            self.group.add_all_reduce_seconds(self.stack.take_all_reduce_seconds())
        return out


def fused_decoder(model: LlamaForCausalLM, built: FusedDecoder | None, x: torch.Tensor,
                  attention: StepAttention) -> FusedDecoder | None:
    """The model's fused stack (``built`` when it is bound to this step's cache, else a new one) if
    this step can run on it, else None."""
    backend = attention.backend
    group = model.tensor_parallel
    if (os.environ.get("LOOM_DISABLE_FUSED_DECODE") == "1" or (group is not None and not group.shares_memory)
            or not isinstance(backend, CPUAttention)
            or type(backend.kv) not in (KVCache, Int8KVCache, KiviKVCache) or x.dtype not in (torch.float32, torch.bfloat16)
            or not (backend.kv.spec.quantized or backend.kv.dtype == x.dtype)
            or (isinstance(backend.kv, KiviKVCache) and not backend.serves_kivi_natively)):
        return None
    if built is None or built.kv is not backend.kv:
        ops = native_ops()
        if ops is None or (not ops.has_quant_matmul() and any(lin.packed for lin in _projections(model))):
            return None
        built = FusedDecoder(model, backend.kv, ops)
    return built if built.applies(x, attention) else None
