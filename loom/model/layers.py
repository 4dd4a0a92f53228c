"""Building blocks shared by the architectures: norms, rotary application, fused projections
(the rotary tables are in :mod:`loom.model.rope`)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loom.model.kernels import native_ops
from loom.model.quant.packed import PackedWeight


def _native(x: torch.Tensor) -> ModuleType | None:
    """The fused CPU kernels when ``x`` is on the CPU and they could be built."""
    return native_ops() if x.is_cpu else None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``offset=1`` is Gemma's convention (scale by ``1 + w``)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim), requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := _native(x)) is not None and x.dim() == 2 and x.stride(-1) == 1:
            return ops.rms_norm(x, self.weight, self.eps, self.offset)
        return self._reference(x)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); the native path updates ``residual`` in place."""
        if (ops := _native(x)) is not None and x.is_contiguous() and residual.is_contiguous():
            return ops.add_rms_norm(x, residual, self.weight, self.eps, self.offset), residual
        residual = residual + x
        return self._reference(residual), residual

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32 before casting back
            return (xf * (self.offset + self.weight.float())).to(dtype)
        return self.weight * xf.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D/2]. Rotates ``x`` in place when the native kernel
    applies (and returns it), else returns a new tensor."""
    if (ops := _native(x)) is not None and x.stride(-1) == 1 and x.stride(1) == x.shape[2]:
        ops.rotary_(x, cos.squeeze(1), sin.squeeze(1))
        return x
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


SMALL_BATCH_ROWS = 8  # up to this many rows, the native bf16 kernel beats oneDNN's GEMM (kMaxM in gemv.cpp)


@functools.cache
def _small_batch_linear() -> Callable[..., torch.Tensor] | None:
    """The native small-batch bf16 linear, if the kernels were built with AVX512-BF16."""
    ops = native_ops()
    return ops.linear_small_batch if ops is not None and ops.has_linear_small_batch() else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b). Decode at small batch is a weight-bandwidth-bound matrix-vector product,
    where the native kernel streams bf16 weights ~3x faster than oneDNN's GEMM."""
    if (
        x.dtype == torch.bfloat16
        and x.dim() == 2
        and x.shape[0] <= SMALL_BATCH_ROWS
        and x.shape[1] % 32 == 0
        and x.is_cpu
        and (kernel := _small_batch_linear()) is not None
    ):
        return kernel(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b), with W in the compute dtype or kept quantized (:meth:`set_packed`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.packed: list[PackedWeight] = []  # row segments of W, in order, one per run of one format

    def set_packed(self, parts: list[PackedWeight]) -> None:
        """Keep W quantized: ``parts`` stacked by rows replace the dense weight."""
        if self.weight is None:
            raise ValueError("this layer's weight is packed already")
        rows = sum(p.shape[0] for p in parts)
        if (rows, parts[0].shape[1]) != tuple(self.weight.shape):
            raise ValueError(f"packed weight of {rows} rows does not replace {tuple(self.weight.shape)}")
        runs = [list(run) for _, run in itertools.groupby(parts, key=lambda p: p.fmt)]  # adjacent parts of one format
        self.packed = [PackedWeight.cat(run) for run in runs]
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return linear(x, self.weight, self.bias)
        if len(self.packed) == 1:
            return self.packed[0].matmul(x, self.bias)
        y = torch.cat([p.matmul(x) for p in self.packed], dim=-1)
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    """Token embedding table, allocated without a random init (weights always come from a file);
    it may be kept quantized, and it serves as the LM head of tied models (:meth:`as_linear`)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.packed: PackedWeight | None = None
        self.dtype = self.weight.dtype

    def set_packed(self, packed: PackedWeight) -> None:
        if self.weight is None:
            raise ValueError("this table is packed already")
        if packed.shape != tuple(self.weight.shape):
            raise ValueError(f"packed table {packed.shape} does not replace {tuple(self.weight.shape)}")
        self.packed, self.weight = packed, None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.embedding(ids, self.dtype)
        return F.embedding(ids, self.weight)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T: the tied LM head."""
        return self.packed.matmul(x) if self.packed is not None else linear(x, self.weight)


_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1}


class GatedActivation(nn.Module):
    """act(gate) * up over a fused [T, 2I] gate|up projection."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(_ACTIVATIONS)})")
        self.code = _ACTIVATIONS[name]

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if (ops := _native(gate_up)) is not None and gate_up.is_contiguous():
            return ops.act_and_mul(gate_up, self.code)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) if self.code == 0 else F.gelu(gate, approximate="tanh")
        return act * up
