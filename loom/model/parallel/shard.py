"""Which slice of a model one tensor-parallel rank holds (Megatron-style).

Column-parallel projections (q/k/v, gate/up) keep a rank's rows: its attention heads and its
slice of the MLP's intermediate units. Row-parallel projections (o, down) keep the matching
columns, so each rank's output is a partial sum that the ranks all-reduce. Everything else (the
embedding, the LM head, the norms) is whole on every rank.

Heads are split by key/value head, each taking its group of query heads (grouped-query attention
keeps its ratio on every rank). A count that does not divide evenly gives the later ranks one more:
rank 0 also schedules and samples. Intermediate units are split in whole quantization groups (256,
else 32) where the size allows, so packed weights split without unpacking."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from loom.config import ModelConfig
from loom.model.arch.base import CausalLM
from loom.model.layers import Linear
from loom.model.parallel.group import TensorGroup
from loom.model.quant.packed import PackedWeight

log = logging.getLogger(__name__)

ROW_PARALLEL = ("o_proj", "down_proj")  # their outputs are partial sums: all-reduced
_SPLIT_UNITS = (256, 32)  # the K-quant super-block, then the block of every other packed format
_PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(weight|bias)$")


def _split(n: int, world: int, rank: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world``: its ranges of key/value heads, query heads and intermediate units."""

    rank: int
    world: int
    head_dim: int
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    intermediate: tuple[int, int]

    @staticmethod
    def of(config: ModelConfig, rank: int, world: int) -> Shard:
        """ValueError when the model has fewer key/value heads than ranks."""
        if config.num_kv_heads < world:
            raise ValueError(f"tensor parallelism over {world} ranks needs at least {world} key/value heads; "
                             f"this model has {config.num_kv_heads}")
        lo, hi = _split(config.num_kv_heads, world, rank)
        group = config.num_heads // config.num_kv_heads
        unit = next((u for u in _SPLIT_UNITS if config.intermediate_size % u == 0 and config.intermediate_size >= u * world), 1)
        ilo, ihi = _split(config.intermediate_size // unit, world, rank)
        return Shard(rank, world, config.head_dim, (lo, hi), (lo * group, hi * group), (ilo * unit, ihi * unit))

    def config(self, config: ModelConfig) -> ModelConfig:
        """The model as this rank runs it: its heads and intermediate units."""
        return replace(config, num_heads=self.q_heads[1] - self.q_heads[0], num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                       intermediate_size=self.intermediate[1] - self.intermediate[0])

    def _ranges(self) -> dict[str, tuple[int, int]]:
        d = self.head_dim
        q = (self.q_heads[0] * d, self.q_heads[1] * d)
        kv = (self.kv_heads[0] * d, self.kv_heads[1] * d)
        return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": q,
                "gate_proj": self.intermediate, "up_proj": self.intermediate, "down_proj": self.intermediate}

    def weights(self, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]]
                ) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
        """This rank's part of each (Hugging Face name, tensor) of the whole model."""
        ranges = self._ranges()
        for name, tensor in weights:
            m = _PROJECTION.search(name)
            if m is None:
                yield name, tensor
                continue
            lo, hi = ranges[m.group(1)]
            if m.group(1) not in ROW_PARALLEL:
                yield name, tensor.rows(lo, hi) if isinstance(tensor, PackedWeight) else tensor[lo:hi]
            elif isinstance(tensor, PackedWeight):
                yield name, _packed_columns(name, tensor, lo, hi)
            else:
                yield name, tensor[:, lo:hi]


def _packed_columns(name: str, weight: PackedWeight, lo: int, hi: int) -> torch.Tensor | PackedWeight:
    """Columns ``lo:hi`` of a packed weight: still packed when they are whole groups, else dense."""
    try:
        return weight.columns(lo, hi)
    except ValueError as e:
        log.info("%s: this rank's columns stay dense (%s)", name, e)
        return weight.dequantize()[:, lo:hi]


class AllReduced(nn.Module):
    """A row-parallel projection whose partial output is summed over the ranks."""

    def __init__(self, inner: nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(self.inner(x))


def reduce_row_parallel(model: CausalLM, group: TensorGroup) -> None:
    """Wrap every row-parallel projection of a sharded ``model`` in :class:`AllReduced` over ``group``."""
    owners = [m for m in model.modules() if any(isinstance(getattr(m, n, None), Linear) for n in ROW_PARALLEL)]
    for m in owners:
        for n in ROW_PARALLEL:
            if isinstance(getattr(m, n, None), Linear):
                setattr(m, n, AllReduced(getattr(m, n), group.all_reduce))
    model.tensor_parallel = group


def unwrapped(layer: nn.Module) -> nn.Module:
    """The projection itself, without its all-reduce."""
    return layer.inner if isinstance(layer, AllReduced) else layer
