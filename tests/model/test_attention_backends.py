"""Attention backends over the paged cache (the native ``cpu`` kernel and the pure ``torch``
path) against plain SDPA on each sequence's keys: single-token decodes, decode rows verifying
draft tokens (causal inside the new tokens), and prefill chunks with context; for the int8 and KIVI
caches, the kernel against the torch reference path over the same codes, and KIVI's prefill against
token-by-token decoding."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from loom.model.attention import AttentionMetadata, PrefillChunk, make_attention_backend
from loom.model.kv_cache import KVCache, KVCacheSpec, SequenceWrite, make_kv_cache

BS = 4
SCALE = 0.25
BACKENDS = ["cpu", "torch"]


def make_cache(dtype, hkv=2, d=16, num_blocks=64, cache_dtype="auto") -> KVCache:
    return make_kv_cache(KVCacheSpec(1, hkv, d, BS, dtype, cache_dtype), num_blocks, torch.device("cpu"))


def reference(q, keys, values, window):
    """q: [H, D] at the last position of ``keys``/``values`` [L, Hkv, D]."""
    h, hkv = q.shape[0], keys.shape[1]
    k = keys.float().repeat_interleave(h // hkv, 1).transpose(0, 1)
    v = values.float().repeat_interleave(h // hkv, 1).transpose(0, 1)
    if window:
        k, v = k[:, -window:], v[:, -window:]
    return F.scaled_dot_product_attention(q.float()[:, None], k, v, scale=SCALE).squeeze(1)


def decode_meta(kv: KVCache, rows: list[tuple[list[int], int]], new_positions: list[tuple[list[int], int]]):
    """rows: (block table, visible keys) per decode row; new_positions: (table, position) per new token."""
    width = max(len(t) for t, _ in rows)
    blocks = torch.tensor([t[p // BS] for t, p in new_positions])
    offsets = torch.tensor([p % BS for _, p in new_positions])
    return AttentionMetadata(
        slot_blocks=blocks, slot_offsets=offsets, num_decode_rows=len(rows),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t, _ in rows], dtype=torch.int32),
        decode_context_lens=torch.tensor([n for _, n in rows], dtype=torch.int32), prefills=[],
    )


def random_sequences(kv: KVCache, lens: list[int], seed=0):
    """Fill each sequence's blocks with random keys/values; return tables and per-sequence k/v."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(kv.num_blocks, generator=g).tolist()
    tables, keys, values = [], [], []
    hkv, d = kv.spec.num_kv_heads, kv.spec.head_dim
    for n in lens:
        table = [perm.pop() for _ in range(-(-n // BS))]
        k = torch.randn(n, hkv, d, generator=g).to(kv.spec.dtype)
        v = torch.randn(n, hkv, d, generator=g).to(kv.spec.dtype)
        pos = torch.arange(n)
        kv.write(0, k, v, torch.tensor(table)[pos // BS], pos % BS)
        tables.append(table)
        keys.append(k)
        values.append(v)
    return tables, keys, values


@pytest.mark.parametrize("dtype,d,window", [(torch.float32, 16, 0), (torch.bfloat16, 64, 0), (torch.bfloat16, 64, 5),
                                             (torch.float32, 16, 3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_reference(dtype, d, window, backend):
    kv = make_cache(dtype, d=d)
    attn = make_attention_backend(backend, kv)
    assert attn.name == backend
    lens = [1, 5, 8, 13, 30]
    tables, keys, values = random_sequences(kv, lens)
    q = torch.randn(len(lens), 4, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    meta = decode_meta(kv, [(t, n) for t, n in zip(tables, lens)], [(t, n - 1) for t, n in zip(tables, lens)])
    # The new token's k/v are (re)written at the last slot of each sequence by the backend itself.
    out = attn.forward(0, q, torch.stack([k[-1] for k in keys]), torch.stack([v[-1] for v in values]), meta, SCALE, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for i, n in enumerate(lens):
        ref = reference(q[i], keys[i], values[i], window)
        assert torch.allclose(out[i].float(), ref, atol=tol), (i, (out[i].float() - ref).abs().max())


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 64)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rows_verifying_drafts_are_causal_inside_the_new_tokens(dtype, d, backend):
    """A sequence with 4 cached tokens brings 1 + 3 query tokens: row j sees keys 0..4+j only,
    so it must equal a plain decode at that position, whatever the later tokens hold."""
    kv = make_cache(dtype, d=d)
    attn = make_attention_backend(backend, kv)
    (table,), (keys,), (values,) = random_sequences(kv, [8])  # 4 cached + 4 new tokens
    q = torch.randn(4, 4, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    rows = [(table, 5 + j) for j in range(4)]
    meta = decode_meta(kv, rows, [(table, 4 + j) for j in range(4)])
    out = attn.forward(0, q, keys[4:], values[4:], meta, SCALE)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for j in range(4):
        ref = reference(q[j], keys[: 5 + j], values[: 5 + j], 0)
        assert torch.allclose(out[j].float(), ref, atol=tol), (j, (out[j].float() - ref).abs().max())


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_chunk_with_context_matches_full_causal_attention(window, backend):
    torch.manual_seed(0)
    h, hkv, d, total, start = 4, 2, 16, 11, 6
    kv = make_cache(torch.float32, hkv=hkv, d=d, num_blocks=8)
    attn = make_attention_backend(backend, kv)
    keys, values, q = torch.randn(total, hkv, d), torch.randn(total, hkv, d), torch.randn(total, h, d)
    blocks = torch.tensor([5, 2, 7])
    pos = torch.arange(total)
    kv.write(0, keys[:start], values[:start], blocks[pos[:start] // BS], pos[:start] % BS)
    meta = AttentionMetadata(
        slot_blocks=blocks[pos[start:] // BS], slot_offsets=pos[start:] % BS, num_decode_rows=0,
        decode_block_tables=torch.zeros(0, 0, dtype=torch.int32), decode_context_lens=torch.zeros(0, dtype=torch.int32),
        prefills=[PrefillChunk(0, total - start, start, blocks)],
    )
    out = attn.forward(0, q[start:], keys[start:], values[start:], meta, SCALE, window)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), keys.repeat_interleave(2, 1).transpose(0, 1),
                                         values.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask, scale=SCALE)
    assert torch.allclose(out, ref.transpose(0, 1)[start:], atol=1e-5)


def test_auto_picks_the_native_cpu_backend_and_unknown_names_are_rejected():
    kv = make_cache(torch.bfloat16)
    assert make_attention_backend("auto", kv).name == "cpu"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        make_attention_backend("flash", kv)
    with pytest.raises(ValueError, match="needs the KV cache on a GPU"):
        make_attention_backend("cuda", kv)


def test_native_kernels_refuse_tensors_on_another_device():
    """The kernel checks the device of each tensor before touching memory (the meta device
    stands in for a GPU here)."""
    from loom.model.kernels import native_ops

    ops = native_ops()
    q = torch.empty(1, 4, 64, dtype=torch.bfloat16, device="meta")
    cache = torch.zeros(2, 2, BS, 64, dtype=torch.bfloat16)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="take CPU tensors, but q is on meta"):
        ops.decode_attention(q, cache, cache, tables, lens, SCALE, 0)
    with pytest.raises(RuntimeError, match="take CPU tensors"):
        ops.rms_norm(torch.empty(2, 64, device="meta"), torch.ones(64), 1e-6, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernels_read_q_k_v_as_views_of_the_fused_projection(dtype):
    """The fused decode step hands the kernels q, k and v as views into one [T, (H + 2 Hkv) D]
    projection (rows strided, heads packed): the results equal those of contiguous copies."""
    from loom.model.kernels import native_ops

    ops = native_ops()
    torch.manual_seed(0)
    T, H, HKV, D = 3, 4, 2, 64
    qkv = torch.randn(T, (H + 2 * HKV) * D).to(dtype)
    q = qkv[:, : H * D].view(T, H, D)
    k = qkv[:, H * D : (H + HKV) * D].view(T, HKV, D)
    v = qkv[:, (H + HKV) * D :].view(T, HKV, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    keys, values = torch.randn(4, HKV, BS, D).to(dtype), torch.randn(4, HKV, BS, D).to(dtype)
    caches = [keys, values, keys.clone(), values.clone()]
    blocks, offsets = torch.tensor([0, 1, 3]), torch.tensor([2, 0, BS - 1])
    ops.kv_write(caches[0], caches[1], k, v, blocks, offsets)
    ops.kv_write(caches[2], caches[3], k.contiguous(), v.contiguous(), blocks, offsets)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    tables = torch.tensor([[0, 2], [1, 3], [3, 0]], dtype=torch.int32)
    lens = torch.tensor([3, BS + 1, BS], dtype=torch.int32)
    got = ops.decode_attention(q, caches[0], caches[1], tables, lens, SCALE, 0)
    assert got.is_contiguous()
    assert torch.equal(got, ops.decode_attention(q.contiguous(), caches[0], caches[1], tables, lens, SCALE, 0))


@pytest.mark.parametrize("dtype,d,window", [(torch.float32, 64, 0), (torch.bfloat16, 64, 0), (torch.bfloat16, 128, 5),
                                             (torch.float32, 16, 0), (torch.bfloat16, 48, 3)])
def test_int8_cache_kernel_matches_the_torch_reference_path(dtype, d, window):
    """Over the same int8 codes and scales, the native kernel (AVX-512 for head_dim % 32 == 0, the
    portable one otherwise) equals the torch path, which dequantizes and runs SDPA; both stay within
    int8's error of attention over the exact keys."""
    kv = make_cache(dtype, hkv=2, d=d, cache_dtype="int8")
    lens = [1, 5, 16, 17, 40]
    tables, keys, values = random_sequences(kv, lens)
    q = torch.randn(len(lens), 6, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    meta = decode_meta(kv, [(t, n) for t, n in zip(tables, lens)], [(t, n - 1) for t, n in zip(tables, lens)])
    new_k, new_v = torch.stack([k[-1] for k in keys]), torch.stack([v[-1] for v in values])
    cpu = make_attention_backend("cpu", kv).forward(0, q, new_k, new_v, meta, SCALE, window)
    ref = make_attention_backend("torch", kv).forward(0, q, new_k, new_v, meta, SCALE, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert torch.allclose(cpu.float(), ref.float(), atol=tol), (cpu.float() - ref.float()).abs().max()
    for i, n in enumerate(lens):
        exact = reference(q[i], keys[i], values[i], window)
        assert torch.allclose(cpu[i].float(), exact, atol=0.05), (i, (cpu[i].float() - exact).abs().max())


def test_int8_cache_prefill_attends_to_the_keys_as_stored():
    """A lossy cache's first chunk attends to its own keys read back from the cache, so that the
    prompt's output does not depend on where chunks or cached prefixes begin."""
    torch.manual_seed(0)
    h, hkv, d, n = 4, 2, 16, 9
    kv = make_cache(torch.float32, hkv=hkv, d=d, num_blocks=8, cache_dtype="int8")
    keys, values, q = torch.randn(n, hkv, d), torch.randn(n, hkv, d), torch.randn(n, h, d)
    blocks, pos = torch.tensor([3, 1, 6]), torch.arange(n)
    meta = AttentionMetadata(
        slot_blocks=blocks[pos // BS], slot_offsets=pos % BS, num_decode_rows=0,
        decode_block_tables=torch.zeros(0, 0, dtype=torch.int32), decode_context_lens=torch.zeros(0, dtype=torch.int32),
        prefills=[PrefillChunk(0, n, 0, blocks)],
    )
    out = make_attention_backend("cpu", kv).forward(0, q, keys, values, meta, SCALE)
    stored_k, stored_v = kv.gather(0, blocks, n)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), stored_k.repeat_interleave(2, 0),
                                         stored_v.repeat_interleave(2, 0), is_causal=True, scale=SCALE)
    assert torch.allclose(out, ref.transpose(0, 1), atol=1e-5)
    assert not torch.equal(stored_k.transpose(0, 1), keys)  # the stored keys are not the exact ones


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_cache_in_bf16_under_fp32_compute(backend):
    kv = make_cache(torch.float32, d=64, cache_dtype="bf16")
    lens = [3, 20]
    tables, keys, values = random_sequences(kv, lens)
    q = torch.randn(len(lens), 4, 64, generator=torch.Generator().manual_seed(1))
    meta = decode_meta(kv, [(t, n) for t, n in zip(tables, lens)], [(t, n - 1) for t, n in zip(tables, lens)])
    out = make_attention_backend(backend, kv).forward(0, q, torch.stack([k[-1] for k in keys]),
                                                      torch.stack([v[-1] for v in values]), meta, SCALE, 0)
    assert out.dtype == torch.float32
    for i, n in enumerate(lens):
        ref = reference(q[i], keys[i].bfloat16(), values[i].bfloat16(), 0)
        assert torch.allclose(out[i], ref, atol=2e-2)


def kivi_sequences(kv, lens: list[int], seed=0):
    """Write each sequence's keys and values through the KIVI cache's residual plan (slot i for
    sequence i, as one prefill); returns tables, keys and values."""
    g = torch.Generator().manual_seed(seed)
    bs, hkv, d = kv.block_size, kv.spec.num_kv_heads, kv.spec.head_dim
    perm = torch.randperm(kv.num_blocks, generator=g).tolist()
    tables, writes, row = [], [], 0
    for i, n in enumerate(lens):
        tables.append([perm.pop() for _ in range(-(-n // bs))])
        writes.append(SequenceWrite(row, 0, n, tables[-1], i))
        row += n
    k = torch.randn(row, hkv, d, generator=g)
    k[:, :, 3] += 6  # an outlier channel, as real keys have
    v = torch.randn(row, hkv, d, generator=g)
    k, v = k.to(kv.spec.dtype), v.to(kv.spec.dtype)
    kv.write(0, k, v, None, None, kv.plan_residual_writes(writes))
    bounds = [0, *itertools.accumulate(lens)]
    return tables, [k[a:b] for a, b in zip(bounds, bounds[1:])], [v[a:b] for a, b in zip(bounds, bounds[1:])]


def kivi_cache(dtype, d, bits, block_size=16, residual=32, group=32, num_blocks=64, slots=8):
    spec = KVCacheSpec(1, 2, d, block_size, dtype, f"int{bits}", residual, group)
    return make_kv_cache(spec, num_blocks, torch.device("cpu"), slots)


@pytest.mark.parametrize("dtype,d,window,bits,block_size,group", [
    (torch.float32, 64, 0, 4, 16, 32), (torch.bfloat16, 64, 0, 2, 16, 64), (torch.bfloat16, 128, 7, 4, 32, 32),
    (torch.float32, 64, 40, 2, 32, 64), (torch.float32, 32, 0, 4, 16, 16)])
def test_kivi_cache_kernel_matches_the_torch_reference_path(dtype, d, window, bits, block_size, group):
    """Over the same codes, scales, zero points and residual, the native KIVI kernel equals the torch
    path (dequantize, overlay the residual, SDPA), for rows before, at and past a group boundary."""
    kv = kivi_cache(dtype, d, bits, block_size, residual=2 * block_size, group=group)
    lens = [1, 2 * block_size - 1, 2 * block_size, 2 * block_size + 1, 5 * block_size + 3]
    tables, keys, values = kivi_sequences(kv, lens)
    q = torch.randn(len(lens), 6, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_blocks=torch.zeros(0, dtype=torch.int64), slot_offsets=torch.zeros(0, dtype=torch.int64),
        num_decode_rows=len(lens), decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                   dtype=torch.int32),
        decode_context_lens=torch.tensor(lens, dtype=torch.int32), prefills=[],
        decode_slots=torch.arange(len(lens), dtype=torch.int32))
    cpu = make_attention_backend("cpu", kv).decode(0, q, meta, SCALE, window)
    ref = make_attention_backend("torch", kv).decode(0, q, meta, SCALE, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(cpu.float(), ref.float(), atol=tol), (cpu.float() - ref.float()).abs().max()
    exact = torch.stack([reference(q[i], keys[i], values[i], window) for i in range(len(lens))])
    err = (cpu.float() - exact).abs().mean(dim=(1, 2))
    assert err[:2].max() < 1e-2  # rows shorter than a group: all in the residual, full precision
    assert err.max() < (0.08 if bits == 4 else 0.3), err  # the format's error of attention over the exact keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,window", [(45, 0), (300, 0), (300, 70)])  # 300: several pieces of queries
def test_kivi_prefill_attends_as_token_by_token_decoding_would(backend, n, window):
    """A prompt prefilled in one chunk gives each position the output that decoding it one token at a
    time gives: a query reads a key quantized once the key's group was complete at the query."""
    torch.manual_seed(0)
    h, r = 4, 32
    prompt_k, prompt_v, q = torch.randn(n, 2, 64), torch.randn(n, 2, 64), torch.randn(n, h, 64)
    table = list(range(-(-n // 16)))
    outs = []
    for chunks in ([(0, n)], [(p, p + 1) for p in range(n)]):
        kv = kivi_cache(torch.float32, 64, 2, residual=r, num_blocks=len(table), slots=1)
        attn = make_attention_backend(backend, kv)
        got = []
        for a, b in chunks:
            pos = torch.arange(a, b)
            blocks = torch.tensor(table)
            meta = AttentionMetadata(
                slot_blocks=blocks[pos // 16], slot_offsets=pos % 16, num_decode_rows=0,
                decode_block_tables=torch.zeros(0, 0, dtype=torch.int32),
                decode_context_lens=torch.zeros(0, dtype=torch.int32),
                prefills=[PrefillChunk(0, b - a, a, blocks[: -(-b // 16)], slot=0)],
                residual=kv.plan_residual_writes([SequenceWrite(0, a, b, table, 0)]))
            got.append(attn.forward(0, q[a:b], prompt_k[a:b], prompt_v[a:b], meta, SCALE, window))
        outs.append(torch.cat(got))
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (outs[0] - outs[1]).abs().max()


def test_kivi_kernel_refuses_a_slot_out_of_range():
    kv = kivi_cache(torch.float32, 64, 4, slots=2)
    tables, _, _ = kivi_sequences(kv, [20])
    ops = make_attention_backend("cpu", kv)._kivi
    if ops is None:
        pytest.skip("the KIVI kernel is not built for this CPU")
    with pytest.raises(RuntimeError, match="residual slot 2 out of range"):
        ops(torch.randn(1, 4, 64), *[kv.layer_tensors(0)[i] for i in (0, 3, 1, 2, 4, 5, 6, 7)],
            torch.tensor([tables[0]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32),
            torch.tensor([2], dtype=torch.int32), 4, 32, SCALE, 0)


@pytest.mark.parametrize("d", [64, 128])
def test_rows_of_one_sequence_read_its_keys_once_and_get_what_they_get_alone(d):
    """Verification rows (consecutive rows of one sequence, each seeing one more key) are served
    together by the native kernel; each row's output is bit for bit its output alone. Whole 16-key
    groups take an unrolled path, the last partial group the general loop: both at head_dim 64 and
    128 (2 and 4 products of 32 per key). Keys are split into tasks at multiples of 512 positions;
    the run of sequence a crosses that boundary (rows of 1 and of 2 chunks), sequence b has 3."""
    from loom.model.kernels import native_ops

    ops = native_ops()
    if ops is None:
        pytest.skip("native kernels not built")
    g = torch.Generator().manual_seed(3)
    k = torch.randn(120, 2, 16, d, generator=g).bfloat16()
    v = torch.randn(120, 2, 16, d, generator=g).bfloat16()
    a, b = list(range(0, 40)), list(range(40, 120))
    # sequence a: 5 rows (lengths 510..514), sequence b: 1 row, sequence a again: 2 rows elsewhere
    tables = torch.tensor([a + [0] * 40] * 5 + [b] + [a + [0] * 40] * 2, dtype=torch.int32)
    lens = torch.tensor([510, 511, 512, 513, 514, 1200, 37, 38], dtype=torch.int32)
    q = torch.randn(len(lens), 6, d, generator=g).bfloat16()
    for window in (0, 64, 700):
        together = ops.decode_attention(q, k, v, tables, lens, 0.125, window, None, None)
        alone = torch.cat([ops.decode_attention(q[i : i + 1], k, v, tables[i : i + 1], lens[i : i + 1], 0.125, window,
                                                None, None) for i in range(len(lens))])
        assert torch.equal(together, alone)
    # and what the softmax of the bf16 keys says (fp32 sums): the last row of sequence a (two
    # chunks), and sequence b (three chunks)
    got = ops.decode_attention(q, k, v, tables, lens, 0.125, 0, None, None).float()
    for row, blocks, n in ((4, a, 514), (5, b, 1200)):
        keys = k[blocks].transpose(0, 1).reshape(2, -1, d)[:, :n].float()  # [kv heads, tokens, d]
        values = v[blocks].transpose(0, 1).reshape(2, -1, d)[:, :n].float()
        weights = torch.softmax(q[row].float().view(2, 3, d) @ keys.transpose(1, 2) * 0.125, dim=-1)
        torch.testing.assert_close(got[row], (weights @ values).reshape(6, d), atol=2e-2, rtol=2e-2)
