"""The KV cache object: exact bytes per block, write / gather / copy_block, lazily zeroed storage, and the
formats of ``--kv-cache-dtype`` (a plain cache in another dtype than the compute dtype, int8, KIVI int4/int2
with its residual)."""

from __future__ import annotations

import re

import pytest
import torch

from loom.model.kv_cache import (
    Int8KVCache,
    KVCache,
    KVCacheSpec,
    SequenceWrite,
    make_kv_cache,
    pack_codes,
    quantize_asym,
    quantize_int8,
    unpack_codes,
)


def test_bytes_per_block_is_exact_for_each_dtype():
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    assert spec.bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert spec.bytes_per_block == 16 * spec.bytes_per_token
    fp32 = KVCacheSpec(30, 3, 64, 16, torch.float32)
    assert fp32.bytes_per_block == 2 * spec.bytes_per_block
    assert spec.num_blocks_for(10 * spec.bytes_per_block + 1) == 10
    with pytest.raises(ValueError, match="holds no block"):
        spec.num_blocks_for(spec.bytes_per_block - 1)


def test_write_gather_and_copy_block():
    kv = KVCache(KVCacheSpec(2, 2, 8, 4, torch.float32), 6, torch.device("cpu"))
    assert all(float(c.abs().sum()) == 0 for c in kv.keys + kv.values)  # starts zeroed
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    blocks, pos = torch.tensor([3, 1]), torch.arange(6)
    kv.write(1, k, v, blocks[pos // 4], pos % 4)
    gk, gv = kv.gather(1, blocks, 6)
    assert torch.equal(gk, k.transpose(0, 1)) and torch.equal(gv, v.transpose(0, 1))
    bk, _ = kv.gather_batch(1, torch.tensor([[3, 1]], dtype=torch.int32))
    assert torch.equal(bk[0, :, :6], k.transpose(0, 1))
    assert float(kv.keys[0].abs().sum()) == 0  # other layers untouched
    kv.copy_block(1, 5)
    assert torch.equal(kv.keys[1][5], kv.keys[1][1]) and torch.equal(kv.values[1][5], kv.values[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_matches_indexed_assignment(dtype):
    kv = KVCache(KVCacheSpec(1, 3, 64, 16, dtype), 8, torch.device("cpu"))
    if kv._native_write is None:
        pytest.skip("native kernels not built")
    k, v = torch.randn(20, 3, 64).to(dtype), torch.randn(20, 3, 64).to(dtype)
    slots = torch.randperm(16 * 8)[:20]  # distinct slots
    blocks, offsets = slots // 16, slots % 16
    kv.write(0, k, v, blocks, offsets)
    ref_k, ref_v = torch.zeros_like(kv.keys[0]), torch.zeros_like(kv.values[0])
    ref_k[blocks, :, offsets], ref_v[blocks, :, offsets] = k, v
    assert torch.equal(kv.keys[0], ref_k) and torch.equal(kv.values[0], ref_v)
    with pytest.raises(RuntimeError, match="out of range"):
        kv.write(0, k[:1], v[:1], torch.tensor([8]), torch.tensor([0]))


def test_large_cache_is_not_resident_until_used():
    """A 1 GiB cache costs neither start-up time nor memory until blocks are written."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = rss()
    kv = KVCache(KVCacheSpec(8, 8, 128, 16, torch.bfloat16), 2048, torch.device("cpu"))
    assert sum(c.numel() * c.element_size() for c in kv.keys + kv.values) == 1 << 30
    assert rss() - before < 64 << 20
    kv.keys[0][7].fill_(1.0)
    assert float(kv.keys[0][7].sum()) == 8 * 16 * 128 and float(kv.keys[0][6].sum()) == 0


def test_cpu_storage_is_private_and_advised_for_huge_pages():
    """The paged cache is read in scattered pieces: its mapping must be private anonymous memory
    (shared memory gets no transparent huge pages) and advised for huge pages."""
    kv = KVCache(KVCacheSpec(1, 2, 64, 16, torch.float32), 1024, torch.device("cpu"))
    addr = kv.keys[0].data_ptr()
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    headers = [i for i, line in enumerate(lines) if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line)]
    for i in headers:
        start, end = (int(x, 16) for x in lines[i].split()[0].split("-"))
        if start <= addr < end:
            perms = lines[i].split()[1]
            flags = next(line for line in lines[i + 1 :] if line.startswith("VmFlags:")).split()[1:]
            break
    else:
        raise AssertionError("the cache's mapping is not in /proc/self/smaps")
    assert perms.endswith("p"), perms  # private, not shared
    assert "hg" in flags, flags  # MADV_HUGEPAGE


def test_bytes_per_block_of_each_format():
    bf16 = KVCacheSpec(30, 3, 64, 16, torch.bfloat16)
    assert KVCacheSpec(30, 3, 64, 16, torch.bfloat16, "fp32").bytes_per_block == 2 * bf16.bytes_per_block
    assert KVCacheSpec(30, 3, 64, 16, torch.float32, "bf16").bytes_per_block == bf16.bytes_per_block
    int8 = KVCacheSpec(30, 3, 64, 16, torch.bfloat16, "int8")
    # A key's 64 codes and 4 fp16 scales (one per 16 dims), a value's 64 codes and one scale.
    assert int8.bytes_per_token == 30 * 3 * (64 + 4 * 2 + 64 + 2)
    budget = 64 << 20
    assert int8.num_blocks_for(budget) / bf16.num_blocks_for(budget) == pytest.approx(256 / 138, rel=0.01)
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int3'"):
        KVCacheSpec(30, 3, 64, 16, torch.bfloat16, "int3")


def test_int8_quantization_error_is_half_a_step_per_element():
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]
    x[7, 1] = 0  # an all-zero row: scale 0, codes 0
    x[9, 0, 5] = 1e4  # an outlier channel: with groups of 16 it coarsens its own group only
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (50, 3)
    assert torch.equal(scale, (x.abs().amax(-1) / 127).half())
    back = codes.float() * scale.float()[..., None]
    step = scale.float()[..., None]
    assert bool(((back - x).abs() <= step / 2 + 1e-6 * x.abs()).all())
    assert int(codes[7, 1].abs().sum()) == 0 and float(scale[7, 1]) == 0
    codes, scale = quantize_int8(x, 16)
    assert scale.shape == (50, 3, 4) and torch.equal(scale, (x.unflatten(-1, (4, 16)).abs().amax(-1) / 127).half())
    back = (codes.float().unflatten(-1, (4, 16)) * scale.float()[..., None]).flatten(-2)
    step = scale.float().repeat_interleave(16, -1)
    assert bool(((back - x).abs() <= step / 2 + 1e-6 * x.abs()).all())
    assert float((back[9, 0, 16:] - x[9, 0, 16:]).abs().max()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cache_write_gather_and_copy_block(dtype):
    """The native write stores the same codes and scales as the PyTorch path, bit for bit; reads
    dequantize in the compute dtype; copy_block copies the scales with the codes."""
    spec = KVCacheSpec(2, 3, 64, 16, dtype, "int8")
    kv = make_kv_cache(spec, 8, torch.device("cpu"))
    assert isinstance(kv, Int8KVCache) and kv.dtype == torch.int8 and kv.lossy
    torch.manual_seed(0)
    k, v = (torch.randn(20, 3, 64) * 4).to(dtype), torch.randn(20, 3, 64).to(dtype)
    k[3], v[3] = 0, 0  # zero rows: scale 0, codes 0
    k[4, 1, 7], v[5, 2, 60] = 1e3, -1e3  # outliers
    slots = torch.randperm(16 * 8)[:20]
    blocks, offsets = slots // 16, slots % 16
    kv.write(1, k, v, blocks, offsets)
    ref = Int8KVCache(spec, 8, torch.device("cpu"))
    ref._native_write = None
    ref.write(1, k, v, blocks, offsets)
    if kv._native_write is not None:  # the native path ran: it must agree with the PyTorch one
        for a, b in zip(kv.keys + kv.values + kv.key_scales + kv.value_scales,
                        ref.keys + ref.values + ref.key_scales + ref.value_scales):
            assert torch.equal(a, b)
    codes, scale = quantize_int8(k, 16)
    # Keys pair-major within each block: dims 2i, 2i + 1 of the block's 16 tokens in one run of 32
    # codes, and a scale per 16 dims; values as they come, with one scale.
    pair_major = kv.keys[1].view(8, 3, 32, 16, 2)
    assert torch.equal(pair_major[blocks, :, :, offsets], codes.view(20, 3, 32, 2))
    assert kv.key_scales[1].shape == (8, 3, 4, 16) and torch.equal(kv.key_scales[1][blocks, :, :, offsets], scale)
    v_codes, v_scale = quantize_int8(v)
    assert torch.equal(kv.values[1][blocks, :, offsets], v_codes)
    gk, gv = kv.gather(1, torch.arange(8), 128)
    assert gk.dtype == gv.dtype == dtype
    expected = (codes.float() * scale.float().repeat_interleave(16, -1)).to(dtype)
    assert torch.equal(gk.transpose(0, 1)[slots], expected)
    assert torch.equal(gv.transpose(0, 1)[slots], (v_codes.float() * v_scale.float()[..., None]).to(dtype))
    if kv._native_gather is not None:  # the one-pass native read equals the PyTorch path, bit for bit
        table = torch.tensor([5, 2, 7])
        for got, want in zip(kv.gather(1, table, 40), KVCache.gather(kv, 1, table, 40)):
            assert got.shape == (3, 40, 64) and torch.equal(got, want)
    kv.copy_block(int(blocks[0]), 7 if int(blocks[0]) != 7 else 6)
    dst = 7 if int(blocks[0]) != 7 else 6
    for layer in (kv.keys, kv.values, kv.key_scales, kv.value_scales):
        assert torch.equal(layer[1][dst], layer[1][int(blocks[0])])


def test_plain_cache_in_another_dtype_than_the_compute_dtype():
    """bf16 storage under fp32 compute: writes round to bf16, reads come back as fp32, and the cache
    counts as lossy (prefill then attends to the keys as stored)."""
    kv = make_kv_cache(KVCacheSpec(1, 2, 8, 4, torch.float32, "bf16"), 4, torch.device("cpu"))
    assert kv.dtype == torch.bfloat16 and kv.lossy
    k = torch.randn(3, 2, 8)
    kv.write(0, k, k, torch.tensor([2, 2, 2]), torch.arange(3))
    gk, _ = kv.gather(0, torch.tensor([2]), 3)
    assert gk.dtype == torch.float32 and torch.equal(gk, k.bfloat16().float().transpose(0, 1))
    assert not make_kv_cache(KVCacheSpec(1, 2, 8, 4, torch.bfloat16, "fp32"), 4, torch.device("cpu")).lossy


@pytest.mark.parametrize("bits", [4, 2])
def test_kivi_codes_round_trip_within_half_a_step(bits):
    x = torch.randn(5, 3, 64) * torch.linspace(0.1, 20, 64)  # channels of very different ranges
    codes, scale, zero = quantize_asym(x, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)
    assert pack_codes(codes, bits).shape[-1] == 64 * bits // 8
    back = codes.float() * scale.float()[..., None] + zero.float()[..., None]
    step = scale.float()[..., None]
    assert ((back - x).abs() <= step / 2 + 1e-2 * x.abs().amax(-1, keepdim=True) / (1 << bits)).all()
    const = torch.full((2, 16), 3.0)  # a constant group: scale 0, every value its zero point
    codes, scale, zero = quantize_asym(const, bits)
    assert float(scale.abs().max()) == 0 and torch.equal(zero.float(), torch.full((2,), 3.0))


def test_kivi_bytes_per_block_and_residual_are_exact():
    spec = KVCacheSpec(30, 3, 64, 32, torch.bfloat16, "int4", residual_tokens=128, value_group=32)
    # per head and block: 2 x 32 x 64 x 4 bits of codes, a key scale and zero per channel, a value
    # scale and zero per token and group of 32 channels.
    per_head = 2 * 32 * 64 // 2 + 2 * 2 * 64 + 2 * 2 * 32 * 2
    assert spec.bytes_per_block == 30 * 3 * per_head
    assert spec.bytes_per_token == spec.bytes_per_block / 32
    assert spec.bytes_per_residual_slot == 2 * 30 * 3 * 128 * 64 * 2
    bf16 = KVCacheSpec(30, 3, 64, 32, torch.bfloat16)
    assert bf16.bytes_per_block / spec.bytes_per_block == pytest.approx(3.2)
    int2 = KVCacheSpec(30, 3, 64, 32, torch.bfloat16, "int2", residual_tokens=128, value_group=64)
    assert bf16.bytes_per_block / int2.bytes_per_block == pytest.approx(4096 / 704)
    budget = 10 * spec.bytes_per_block + 3 * spec.bytes_per_residual_slot
    assert spec.num_blocks_for(budget, num_slots=3) == 10
    with pytest.raises(ValueError, match="lower --max-num-seqs or --kv-residual-tokens"):
        spec.num_blocks_for(budget, num_slots=4)


@pytest.mark.parametrize("opts,match", [
    (dict(residual_tokens=40), "multiple of --block-size 16"),
    (dict(residual_tokens=8), "multiple of --block-size 16"),
    (dict(residual_tokens=32, value_group=24), "--kv-quant-group"),
])
def test_kivi_spec_rejects_bad_sizes(opts, match):
    with pytest.raises(ValueError, match=match):
        KVCacheSpec(2, 2, 64, 16, torch.float32, "int4", **opts)
    assert KVCacheSpec(2, 2, 64, 16, torch.float32, "int4", residual_tokens=32, value_group=256).value_group_size == 64


def test_kivi_groups_seal_the_same_whichever_steps_complete_them():
    """Writing a sequence token by token (decode), in uneven chunks, or at once leaves the same codes
    in its complete groups and the same full-precision rows in its residual; gather reads the first
    ``L // R * R`` tokens quantized and the rest exactly."""
    spec = KVCacheSpec(1, 2, 32, 16, torch.float32, "int2", residual_tokens=32, value_group=16)
    k, v = torch.randn(77, 2, 32), torch.randn(77, 2, 32)
    table = [9, 4, 0, 7, 2]
    caches = []
    for cuts in ([0, 77], list(range(78)), [0, 5, 31, 33, 64, 70, 77]):
        kv = make_kv_cache(spec, 10, torch.device("cpu"), num_slots=2)
        for a, b in zip(cuts, cuts[1:]):
            kv.write(0, k[a:b], v[a:b], None, None, kv.plan_residual_writes([SequenceWrite(0, a, b, table, 1)]))
        caches.append(kv)
    for kv in caches[1:]:
        for a, b in zip(kv.keys + kv.values + kv.key_scales + kv.value_zeros, caches[0].keys + caches[0].values +
                        caches[0].key_scales + caches[0].value_zeros):
            assert torch.equal(a[table[:4]], b[table[:4]])
    gk, gv = caches[0].gather(0, torch.tensor(table), 77, slot=1)
    assert gk.shape == (2, 77, 32)
    assert torch.equal(gk[:, 64:], k[64:].transpose(0, 1)) and torch.equal(gv[:, 64:], v[64:].transpose(0, 1))
    assert not torch.equal(gk[:, :64], k[:64].transpose(0, 1))
    assert (gk[:, :64] - k[:64].transpose(0, 1)).abs().mean() < 0.35
    assert caches[0].lossy
    with pytest.raises(ValueError, match="writes by a residual plan"):
        caches[0].write(0, k[:1], v[:1], torch.tensor([0]), torch.tensor([0]))


def test_kivi_copy_slot_and_copy_block_carry_everything():
    spec = KVCacheSpec(2, 2, 32, 16, torch.float32, "int4", residual_tokens=16)
    kv = make_kv_cache(spec, 4, torch.device("cpu"), num_slots=2)
    k, v = torch.randn(20, 2, 32), torch.randn(20, 2, 32)
    for layer in range(2):
        kv.write(layer, k, v, None, None, kv.plan_residual_writes([SequenceWrite(0, 0, 20, [1, 3], 0)]))
    kv.copy_slot(0, 1)
    kv.copy_block(1, 2)
    for layer in range(2):
        a = kv.gather(layer, torch.tensor([1, 3]), 20, slot=0)
        b = kv.gather(layer, torch.tensor([2, 3]), 20, slot=1)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("fmt,dtype,group", [("int4", torch.float32, 32), ("int2", torch.bfloat16, 16),
                                             ("int4", torch.bfloat16, 64)])
def test_kivi_native_write_writes_the_same_bytes_as_pytorch(fmt, dtype, group):
    spec = KVCacheSpec(1, 3, 64, 16, dtype, fmt, residual_tokens=32, value_group=group)
    native, torch_path = (make_kv_cache(spec, 12, torch.device("cpu"), num_slots=2) for _ in range(2))
    if native._native_write is None:
        pytest.skip("native kernels not built")
    torch_path._native_write = None
    k, v = (torch.randn(90, 3, 64) * torch.linspace(0.2, 9, 64)).to(dtype), torch.randn(90, 3, 64).to(dtype)
    for kv in (native, torch_path):
        for a, b in ((0, 40), (40, 90)):
            kv.write(0, k[a:b], v[a:b], None, None, kv.plan_residual_writes([SequenceWrite(0, a, b, list(range(11, 5, -1)), 1)]))
    for x, y in zip(native.layer_tensors(0), torch_path.layer_tensors(0)):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
