"""The fused CPU kernels against the PyTorch reference ops they replace (bf16 and fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.model.kernels import native_ops
from loom.model.layers import GatedActivation, RMSNorm, apply_rotary

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def require_kernels():
    assert native_ops() is not None, "the native kernels failed to build"


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    # Summation order differs (fp32 sum of squares); bf16 results may differ by one rounding step.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    return torch.allclose(a.float(), b.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_fused_add(dtype, offset):
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6, offset=offset).to(dtype)
    norm.weight.copy_(torch.randn(64))
    x, res = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype)
    assert close(norm(x), norm._reference(x), dtype)
    expected_res = res + x
    out, new_res = norm.add_forward(x, res.clone())
    assert torch.equal(new_res, expected_res)
    assert close(out, norm._reference(expected_res), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the AVX-512 path (16 lanes per half)
def test_rotary_in_place_on_strided_rows(dtype, head_dim):
    torch.manual_seed(0)
    d = head_dim
    qkv = torch.randn(7, 3 * 4 * d).to(dtype)
    cos, sin = torch.randn(7, 1, d // 2).to(dtype), torch.randn(7, 1, d // 2).to(dtype)
    view = qkv[:, : 2 * 4 * d].view(7, 8, d)
    x1, x2 = view.chunk(2, dim=-1)
    expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    rest = qkv[:, 2 * 4 * d :].clone()
    out = apply_rotary(view, cos, sin)
    assert out.data_ptr() == view.data_ptr()  # in place
    if dtype == torch.bfloat16:  # every product rounded as the reference rounds it
        assert torch.equal(out, expected)
    else:
        assert close(out, expected, dtype)
    assert torch.equal(qkv[:, 2 * 4 * d :], rest)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation(dtype, name):
    torch.manual_seed(0)
    gate_up = torch.randn(6, 2 * 40).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) if name == "silu" else F.gelu(gate, approximate="tanh")
    assert close(GatedActivation(name)(gate_up), act * up, dtype)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="relu2"):
        GatedActivation("relu2")


def cpu_has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in next(line for line in f if line.startswith("flags")).split()


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_linear_matches_matmul(rows, bias):
    from loom.model.layers import linear

    torch.manual_seed(0)
    w = torch.randn(100, 96).to(torch.bfloat16)  # 100 rows: not a multiple of the 16-row tile
    b = torch.randn(100).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 96).to(torch.bfloat16)
    # The native kernel exists exactly where the CPU has AVX512-BF16; elsewhere linear() falls back.
    assert native_ops().has_linear_small_batch() == cpu_has_avx512_bf16()
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert torch.allclose(linear(x, w, b).float(), ref, atol=0.05, rtol=1e-2)
