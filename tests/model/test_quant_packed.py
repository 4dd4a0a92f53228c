"""loom.model.quant: every GGUF block format read into the packed layout dequantizes exactly as
``gguf.quants.dequantize`` does (up to the fp16 storage of K-quant scales), the native kernel
matches the PyTorch path to int8-activation tolerance, and the round-to-nearest quantizer is
as accurate as its bit width allows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from loom.model.kernels import native_ops
from loom.model.quant.formats import FORMATS
from loom.model.quant.gguf_blocks import READERS, read_codes, read_packed
from loom.model.quant.packed import PackedWeight

N, K = 48, 512  # K a multiple of 256 for the K-quants


def _raw_blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    """Valid raw blocks of a [N, K] tensor: quantized by gguf where it can, else random bytes with
    finite fp16 scales."""
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        return quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (N * K // block, size), dtype=np.uint8)
    d = lambda: rng.uniform(0.001, 0.02, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype in (T.Q4_K, T.Q5_K):
        raw[:, 0:2], raw[:, 2:4] = d(), d()
    else:  # Q6_K: d last
        raw[:, 208:210] = d()
    return raw.reshape(N, -1)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("qtype", list(READERS), ids=lambda t: t.name)
def test_gguf_blocks_dequantize_like_gguf(qtype: T, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not native:
        monkeypatch.setattr("loom.model.quant.packed._native", lambda: None)
    raw = _raw_blocks(qtype, np.random.default_rng(0))
    fmt, (codes, scale, mins) = read_codes(raw, qtype, N, K)
    packed = PackedWeight.from_codes(fmt, codes, scale, mins)
    ref = torch.from_numpy(dequantize(raw, qtype).reshape(N, K))
    got = packed.dequantize()
    assert torch.equal(packed.dequantize(torch.bfloat16), got.to(torch.bfloat16))
    assert torch.equal(read_packed(raw, qtype, N, K).dequantize(), got)  # the sliced path of legacy formats
    # Q4_0/Q4_1/Q5_x/Q8_0 scales are fp16 in the file: exact. K-quant scales (d * sc) are rounded to fp16.
    tol = 0 if fmt.name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0") else 2e-3 * float(ref.abs().max())
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)
    assert torch.equal(packed.codes(), torch.as_tensor(codes).to(torch.int16))


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantize_round_trip_error_fits_the_bit_width(name: str) -> None:
    fmt = FORMATS[name]
    w = torch.randn(N, K)
    packed = PackedWeight.quantize(w, fmt)
    assert packed.shape == (N, K)
    err = (packed.dequantize() - w).abs()
    # Round to nearest: at most half a step of the group's scale (plus fp16 rounding of the scale),
    # except that symmetric 4-6-bit formats map the signed extreme to -offset (as GGUF's Q4_0 does)
    # and may clip the other end of the group by up to one step.
    step = packed.scale.float().abs().repeat_interleave(packed.group, dim=1)
    bound = step if fmt.symmetric and fmt.bits < 8 else 0.5 * step
    assert bool((err <= bound * 1.01 + 1e-3).all()), float((err - bound).max())
    rel = float(err.pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert rel < {4: 0.13, 5: 0.07, 6: 0.035, 8: 0.01}[fmt.bits]


def test_packed_rows_stack_and_select() -> None:
    fmt = FORMATS["q5_1"]
    a, b = PackedWeight.quantize(torch.randn(8, 64), fmt), PackedWeight.quantize(torch.randn(4, 64), fmt)
    both = PackedWeight.cat([a, b])
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    rows = torch.tensor([9, 0, 3])
    torch.testing.assert_close(both.embedding(rows, torch.float32), both.dequantize()[rows])
    with pytest.raises(ValueError, match="one format"):
        PackedWeight.cat([a, PackedWeight.quantize(torch.randn(4, 64), FORMATS["q4_0"])])


def test_quantize_rejects_columns_outside_whole_blocks() -> None:
    with pytest.raises(ValueError, match="columns"):
        PackedWeight.quantize(torch.randn(4, 48), FORMATS["q4_0"])


WIDE_INT8_FORMATS = ("q4_0", "q4_1", "q4_k", "q8_0")  # up to 9 rows on the int8 path, other formats 4
needs_kernel = pytest.mark.skipif(
    native_ops() is None or not native_ops().has_quant_matmul(), reason="native quantized kernel not built (needs AVX2)"
)


@needs_kernel
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q6_k", "int8", "int4_g128"])
@pytest.mark.parametrize("m", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_matches_dequantized_matmul(name: str, m: int, dtype: torch.dtype) -> None:
    _check_kernel(name, m, dtype, N, K)


@needs_kernel
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_1", "q8_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("m", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_on_rows_of_partial_tiles(name: str, m: int, dtype: torch.dtype) -> None:
    """18 blocks per row (the default model's K = 576) and 50 rows: the kernels' block chunks and
    row tiles (8 rows for one activation row in 512-bit registers, else 4) all have a remainder.
    9 rows: the most that 4- and 8-bit codes in groups of 32 keep in registers (one weight row at a
    time), AMX tiles or the row buffer for the other formats."""
    _check_kernel(name, m, dtype, 50, 576)


@needs_kernel
@pytest.mark.parametrize("name", ["q4_1", "q8_0", "q6_k"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_bf16_results_are_the_fp32_results_rounded(name: str, m: int) -> None:
    """Up to 4 rows, a bf16 product is stored eight columns at a time: it must equal the fp32
    product of the same rows (plus bias) rounded to bf16, bit for bit, also in the 5 columns past
    the last eight (N = 53)."""
    torch.manual_seed(m)
    packed = PackedWeight.quantize(torch.randn(53, 576) * 0.05, FORMATS[name])
    x = torch.randn(m, 576).bfloat16()
    bias = torch.randn(53).bfloat16()

    def product(rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return native_ops().quant_matmul(rows, packed.qs, packed.qh, packed.scale, packed.min, packed.fmt.bits,
                                         packed.group, float(packed.fmt.offset), b)

    assert torch.equal(product(x, bias), product(x.float(), bias.float()).bfloat16())
    bias[3] = float("nan")  # stays NaN (0x7FC0, as c10 rounds it), not a finite value or -0
    got = product(x, bias)
    assert got[:, 3].isnan().all() and not got[:, 4:].isnan().any()


@needs_kernel
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_k", "q8_0"])
@pytest.mark.parametrize("k", [544, 608])
@pytest.mark.parametrize("m", [1, 4, 6])
def test_native_kernel_on_rows_of_partial_block_groups(name: str, k: int, m: int) -> None:
    """17 and 19 blocks per row: where AVX512-VNNI takes 4-bit codes four blocks and 8-bit codes two
    blocks at a time, the last load holds 1 or 3 blocks (an odd one for 8-bit codes)."""
    _check_kernel(name, m, torch.bfloat16, 40, k)


@needs_kernel
@pytest.mark.parametrize(("name", "k"), [  # 8-block chunks with and without a remainder (q6_k: 16-groups)
    *((name, k) for name in ("q4_0", "q4_1", "q5_1", "q8_0", "q4_k", "q6_k") for k in (576, 960, 1024)),
    *((name, k) for name in ("q4_1", "q8_0") for k in (544, 608)),  # partial 4-block (2-block) groups
    ("int4_g128", 1024),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_rows_equal_one_row_products(name: str, k: int, dtype: torch.dtype) -> None:
    """Each row's result is bit for bit what the one-row path gives it, up to 4 rows (9 for 4- and
    8-bit codes in groups of 32): a step that verifies draft tokens (or decodes a few requests)
    computes what one-token steps compute."""
    torch.manual_seed(k)
    packed = PackedWeight.quantize(torch.randn(40, k) * 0.05, FORMATS[name])
    rows = 9 if name in WIDE_INT8_FORMATS else 4
    x = torch.randn(rows, k).to(dtype)

    def product(rows: torch.Tensor) -> torch.Tensor:
        return native_ops().quant_matmul(rows, packed.qs, packed.qh, packed.scale, packed.min, packed.fmt.bits,
                                         packed.group, float(packed.fmt.offset), None)

    single = torch.cat([product(x[i : i + 1]) for i in range(rows)])
    for m in range(2, rows + 1):
        assert torch.equal(product(x[:m]), single[:m]), m


def _check_kernel(name: str, m: int, dtype: torch.dtype, n: int, k: int) -> None:
    torch.manual_seed(m)
    packed = PackedWeight.quantize(torch.randn(n, k) * 0.05, FORMATS[name])
    x = torch.randn(m, k).to(dtype)
    x[:, 5] *= 20  # an outlier channel: per-block activation scales keep the other blocks precise
    bias = torch.randn(n).to(dtype)
    got = native_ops().quant_matmul(x, packed.qs, packed.qh, packed.scale, packed.min, packed.fmt.bits,
                                    packed.group, float(packed.fmt.offset), bias)
    ref = x.float() @ packed.dequantize().T + bias.float()
    assert got.dtype == dtype and got.shape == (m, n)
    # int8 activations: each block loses at most half a step of its 1/127 scale.
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert float(err) < (0.02 if dtype == torch.bfloat16 else 0.01)


needs_amx = pytest.mark.skipif(
    native_ops() is None or not native_ops().has_amx_matmul(), reason="no AMX-BF16 on this CPU (or not granted by the OS)"
)


@needs_amx
@pytest.mark.parametrize(("name", "m"), [
    (name, m) for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "int8")
    for m in (5, 10, 17, 64, 130) if m > 9 or name not in WIDE_INT8_FORMATS
])
def test_amx_kernel_equals_the_bf16_product_of_the_dequantized_weight(name: str, m: int) -> None:
    """bf16 rows on AMX: the weight is dequantized to bf16 in tiles, so the result is the dense bf16
    product's (fp32 sums) up to the bf16 rounding of the output, for 50 rows (a partial 16-row tile),
    K = 576 (18 blocks) and 1 to 9 activation tiles (a partial last pass of 4). Fewer rows take the
    int8 path (checked in _check_kernel): up to 4, or 9 for WIDE_INT8_FORMATS."""
    torch.manual_seed(m)
    packed = PackedWeight.quantize(torch.randn(50, 576) * 0.05, FORMATS[name])
    x = torch.randn(m, 576).bfloat16()
    bias = torch.randn(50).bfloat16()
    got = native_ops().quant_matmul(x, packed.qs, packed.qh, packed.scale, packed.min, packed.fmt.bits,
                                    packed.group, float(packed.fmt.offset), bias)
    ref = x.float() @ packed.dequantize(torch.bfloat16).float().T + bias.float()
    torch.testing.assert_close(got.float(), ref, atol=1e-3 * float(ref.abs().max()), rtol=2**-8)


@needs_kernel
def test_matmul_uses_the_kernel_and_falls_back_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    packed = PackedWeight.quantize(torch.randn(N, K), FORMATS["q4_k"])
    x = torch.randn(2, K)
    native = packed.matmul(x)
    monkeypatch.setattr("loom.model.quant.packed._native", lambda: None)
    fallback = packed.matmul(x)
    torch.testing.assert_close(fallback, x @ packed.dequantize().T)
    assert float((native - fallback).abs().max() / fallback.abs().max()) < 0.01
