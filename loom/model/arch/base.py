"""What every architecture module provides, and the weight-loading helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from loom.config import ModelConfig
from loom.model.attention import StepAttention
from loom.model.layers import Embedding, Linear
from loom.model.quant.formats import QuantFormat
from loom.model.quant.packed import PackedWeight

if TYPE_CHECKING:
    from loom.model.parallel.group import TensorGroup

class CausalLM(nn.Module, ABC):
    """A decoder-only LM over the paged KV cache.

    ``forward`` takes the flat batch of this step's tokens and the step's attention (the backend
    bound to the step's metadata; layer ``i`` calls it with ``i``) and returns the final hidden states;
    ``compute_logits`` turns the selected rows (only the rows that sample) into logits."""

    embed_tokens: nn.Module
    lm_head: nn.Module | None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # One rank's shard: its group, over which the row-parallel outputs are all-reduced (loom.model.parallel).
        self.tensor_parallel: TensorGroup | None = None

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: StepAttention) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the given hidden rows in the model's dtype (the head is the embedding when
        tied). The sampler and the logprobs work on an fp32 copy; a greedy row needs only the
        argmax, which the bf16 logits give as they are (their fp32 copy holds the same values),
        and at 64 rows the copy cost about 1 ms a step."""
        head = self.embed_tokens.as_linear if self.lm_head is None else self.lm_head
        return head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take (Hugging Face name, tensor) pairs; every parameter must be covered."""
        load_hf_weights(self, weights)


# HF projection -> (our fused projection, index of its slice). Fusing q/k/v and gate/up turns
# three (two) small matmuls into one, which matters at decode batch sizes.
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def load_hf_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]]) -> None:
    """Load Hugging Face-named weights into ``model``, fusing q/k/v and gate/up.

    A :class:`PackedWeight` stays packed when every part of its target is packed (a fused projection
    may mix formats); otherwise it is dequantized into the dense weight.
    Raises ValueError naming any unexpected, mis-shaped or missing weight."""
    c = model.config
    sizes = {"qkv_proj": [c.q_size, c.kv_size, c.kv_size], "gate_up_proj": [c.intermediate_size] * 2}
    params = dict(model.named_parameters())
    expected: set[tuple[str, int | None]] = set()
    for pname in params:
        kind = pname.rsplit(".", 2)[-2]
        expected |= {(pname, i) for i in range(len(sizes[kind]))} if kind in sizes else {(pname, None)}
    loaded: set[tuple[str, int | None]] = set()
    packed: dict[str, dict[int | None, PackedWeight]] = {}
    for name, tensor in weights:
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue  # derived buffers; tied heads that some checkpoints store anyway
        target, index = name.removeprefix("model."), None
        m = _LAYER.match(name)
        if m and m.group(2) in _FUSED:
            fused, index = _FUSED[m.group(2)]
            target = f"layers.{m.group(1)}.{fused}.{m.group(3)}"
        if target not in params:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        dst = params[target]
        if index is not None:
            part = sizes[target.rsplit(".", 2)[-2]]
            dst = dst[sum(part[:index]) : sum(part[: index + 1])]
        if dst.shape != tensor.shape:
            raise ValueError(f"weight {name!r}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dst.shape)}")
        if isinstance(tensor, PackedWeight):
            packed.setdefault(target, {})[index] = tensor
        else:
            dst.copy_(tensor)
        loaded.add((target, index))
    missing = sorted(f"{n}" if i is None else f"{n}[{i}]" for n, i in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    for target, parts in packed.items():
        _place_packed(model, target, parts, sizes, params[target])


def _place_packed(model: CausalLM, target: str, parts: dict[int | None, PackedWeight], sizes: dict[str, list[int]],
                  dense: torch.Tensor) -> None:
    module = model.get_submodule(target.rsplit(".", 1)[0])
    count = len(sizes.get(target.rsplit(".", 2)[-2], [None]))
    device = dense.device
    if isinstance(module, (Linear, Embedding)) and len(parts) == count:
        ordered = [parts[i].to(device) for i in sorted(parts, key=lambda i: -1 if i is None else i)]
        module.set_packed(ordered if isinstance(module, Linear) else ordered[0])
        return
    offset = 0  # some parts dense, or not a matrix layer: dequantize into the dense weight
    for i, size in enumerate(sizes.get(target.rsplit(".", 2)[-2], [dense.shape[0]])):
        key = None if count == 1 else i
        if key in parts:
            dense[offset : offset + size].copy_(parts[key].dequantize())
        offset += size


def quantize_model(model: CausalLM, fmt: QuantFormat) -> None:
    """Quantize every dense matrix layer (projections, embedding, head) whose width fits ``fmt``'s
    groups; a layer that does not fit stays dense."""
    for module in model.modules():
        if isinstance(module, (Linear, Embedding)) and module.weight is not None:
            if fmt.fits(module.weight.shape[1]):
                packed = PackedWeight.quantize(module.weight, fmt)
                module.set_packed([packed] if isinstance(module, Linear) else packed)
