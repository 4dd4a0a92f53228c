"""Paged attention: the native decode kernel and the PyTorch fallback against plain SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.model.attention import AttentionMetadata, PrefillChunk, paged_attention
from loom.model.kernels import native_ops

BS = 4


def reference(q, keys, values, window):
    """q: [H, D] for the last position; keys/values: [L, Hkv, D]."""
    h, hkv = q.shape[0], keys.shape[1]
    k = keys.float().repeat_interleave(h // hkv, 1).transpose(0, 1)
    v = values.float().repeat_interleave(h // hkv, 1).transpose(0, 1)
    if window:
        k, v = k[:, -window:], v[:, -window:]
    return F.scaled_dot_product_attention(q.float()[:, None], k, v, scale=0.25).squeeze(1)


def setup(dtype, lens, h=4, hkv=2, d=16, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, hkv, BS, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, hkv, BS, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lens:
        nb = -(-n // BS)
        tables.append([perm.pop() for _ in range(nb)])
    q = torch.randn(len(lens), h, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables


def seq_kv(cache, table, n):
    return cache[torch.tensor(table)].transpose(1, 2).flatten(0, 1)[:n]  # [n, Hkv, D]


@pytest.mark.parametrize("dtype,d,window", [(torch.float32, 16, 0), (torch.bfloat16, 64, 0), (torch.bfloat16, 64, 5),
                                             (torch.float32, 16, 3)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_decode_matches_reference(dtype, d, window, use_kernel):
    if use_kernel and native_ops() is None:
        pytest.fail("the native kernel failed to build")
    lens = [1, 5, 8, 13, 30]
    q, kc, vc, tables = setup(dtype, lens, d=d)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    # The new token's k/v are written at the last slot of each sequence by paged_attention itself.
    new_k = torch.stack([seq_kv(kc, t, n)[-1] for t, n in zip(tables, lens)])
    new_v = torch.stack([seq_kv(vc, t, n)[-1] for t, n in zip(tables, lens)])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lens)]),
        num_decodes=len(lens), decode_block_tables=bt, decode_context_lens=torch.tensor(lens, dtype=torch.int32),
        prefills=[], block_size=BS, use_kernel=use_kernel,
    )
    out = paged_attention(q, new_k, new_v, kc, vc, meta, scale=0.25, window=window)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for i, (t, n) in enumerate(zip(tables, lens)):
        ref = reference(q[i], seq_kv(kc, t, n), seq_kv(vc, t, n), window)
        assert torch.allclose(out[i].float(), ref, atol=tol), (i, (out[i].float() - ref).abs().max())


@pytest.mark.parametrize("window", [0, 3])
def test_prefill_chunk_with_context_matches_full_causal_attention(window):
    torch.manual_seed(0)
    h, hkv, d, total, start = 4, 2, 16, 11, 6
    kc = torch.zeros(8, hkv, BS, d)
    vc = torch.zeros(8, hkv, BS, d)
    keys, values, q = torch.randn(total, hkv, d), torch.randn(total, hkv, d), torch.randn(total, h, d)
    blocks = torch.tensor([5, 2, 7])
    slots = (blocks[torch.arange(total) // BS] * BS + torch.arange(total) % BS)
    kc[blocks[torch.arange(start) // BS], :, torch.arange(start) % BS] = keys[:start]
    vc[blocks[torch.arange(start) // BS], :, torch.arange(start) % BS] = values[:start]
    meta = AttentionMetadata(
        slot_mapping=slots[start:], num_decodes=0, decode_block_tables=torch.zeros(0, 0, dtype=torch.int32),
        decode_context_lens=torch.zeros(0, dtype=torch.int32),
        prefills=[PrefillChunk(0, total - start, start, blocks)], block_size=BS, use_kernel=False,
    )
    out = paged_attention(q[start:], keys[start:], values[start:], kc, vc, meta, scale=0.25, window=window)
    pos = torch.arange(total)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), keys.repeat_interleave(2, 1).transpose(0, 1),
                                         values.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask, scale=0.25)
    assert torch.allclose(out, ref.transpose(0, 1)[start:], atol=1e-5)
