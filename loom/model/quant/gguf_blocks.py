"""GGUF block formats read into loom's packed layout: the integer codes of every element and the
scale (and min) of every group, exactly as llama.cpp dequantizes them (``w = scale * code + min``,
or ``scale * (code - offset)``). Mirrors ``gguf.quants``' dequantizers, which the tests compare with."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from loom.model.gguf_convert import ARCHS, hf_shape, hf_tensor_name, unpermute_rotary, weight_tensors
from loom.model.gguf_meta import field_value, open_gguf
from loom.model.quant.formats import FORMATS, QuantFormat
from loom.model.quant.packed import PackedWeight

Codes = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # codes [nb, BS], scale [nb, BS/G], min or None


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[nb, 16k] bytes -> [nb, 32k] codes: low nibbles of each 16 bytes, then their high nibbles."""
    nb = qs.shape[0]
    q = qs.reshape(nb, -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(nb, -1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[nb, 4] little-endian bit masks -> [nb, 32] bits (element i <- bit i)."""
    h = np.ascontiguousarray(qh).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return (h & 1).astype(np.uint8)


def _q4_0(b: np.ndarray) -> Codes:
    return _nibbles(b[:, 2:]), _f16(b[:, :2]), None


def _q4_1(b: np.ndarray) -> Codes:
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b: np.ndarray) -> Codes:
    return _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4), _f16(b[:, :2]), None


def _q5_1(b: np.ndarray) -> Codes:
    return _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b: np.ndarray) -> Codes:
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, :2]), None


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per 32-element sub-block, the scale d * sc and the min -dmin * m."""
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    s = b[:, 4:16].reshape(nb, 3, 4)
    lo, hi, mixed = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=-1)
    return d * sc.astype(np.float32), -dmin * mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> Codes:
    nb = b.shape[0]
    q = b[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(nb, 256), *_k_scales(b)


def _q5_k(b: np.ndarray) -> Codes:
    nb = b.shape[0]
    ql = b[:, 48:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = (ql & 0x0F).reshape(nb, 8, 32) | ((qh & 1) << 4)
    return q.reshape(nb, 256), *_k_scales(b)


def _q6_k(b: np.ndarray) -> Codes:
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (ql & 0x0F).reshape(nb, 8, 32) | ((qh & 3).reshape(nb, 8, 32) << 4)
    scale = _f16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return q.reshape(nb, 256), scale, None


READERS: dict[T, tuple[QuantFormat, Callable[[np.ndarray], Codes]]] = {
    T.Q4_0: (FORMATS["q4_0"], _q4_0),
    T.Q4_1: (FORMATS["q4_1"], _q4_1),
    T.Q5_0: (FORMATS["q5_0"], _q5_0),
    T.Q5_1: (FORMATS["q5_1"], _q5_1),
    T.Q8_0: (FORMATS["q8_0"], _q8_0),
    T.Q4_K: (FORMATS["q4_k"], _q4_k),
    T.Q5_K: (FORMATS["q5_k"], _q5_k),
    T.Q6_K: (FORMATS["q6_k"], _q6_k),
}


def read_codes(data: np.ndarray, qtype: T, rows: int, cols: int) -> tuple[QuantFormat, Codes]:
    """The format, and codes [rows, cols], scale and min [rows, cols / group], of a GGUF tensor's raw
    blocks (``ReaderTensor.data``). KeyError for a type loom does not keep packed."""
    fmt, read = READERS[qtype]
    block, size = GGML_QUANT_SIZES[qtype]
    codes, scale, mn = read(np.asarray(data).reshape(-1, size))
    return fmt, (
        codes.reshape(rows, cols),
        scale.reshape(rows, cols // fmt.group),
        None if mn is None else mn.reshape(rows, cols // fmt.group),
    )


# Legacy block formats whose bytes already are loom's layout: (scale, min, qh, qs) byte offsets in a block.
_AS_STORED: dict[T, tuple[int, int | None, tuple[int, int] | None, int]] = {
    T.Q4_0: (0, None, None, 2),
    T.Q4_1: (0, 2, None, 4),
    T.Q5_0: (0, None, (2, 6), 6),
    T.Q5_1: (0, 2, (4, 8), 8),
    T.Q8_0: (0, None, None, 2),
}


def read_packed(data: np.ndarray, qtype: T, rows: int, cols: int) -> PackedWeight:
    """A GGUF tensor's raw blocks as a :class:`PackedWeight` (KeyError for types loom does not keep
    packed). Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks are sliced as they are; K-quants go through their codes."""
    if qtype not in _AS_STORED:
        fmt, (codes, scale, mins) = read_codes(data, qtype, rows, cols)
        return PackedWeight.from_codes(fmt, codes, scale, mins)
    fmt = READERS[qtype][0]
    _, size = GGML_QUANT_SIZES[qtype]
    b = np.asarray(data).reshape(rows, cols // 32, size)
    s, m, h, q = _AS_STORED[qtype]
    tensor = lambda a, dtype: torch.from_numpy(np.ascontiguousarray(a).view(dtype).reshape(rows, -1))  # noqa: E731
    return PackedWeight(
        fmt,
        qs=tensor(b[:, :, q:], np.int8 if fmt.bits == 8 else np.uint8),
        qh=None if h is None else tensor(b[:, :, h[0] : h[1]], np.uint8),
        scale=tensor(b[:, :, s : s + 2], np.float16),
        min=None if m is None else tensor(b[:, :, m : m + 2], np.float16),
    )


def gguf_packed_weights(path: Path, only: QuantFormat | None = None) -> Iterator[tuple[str, PackedWeight]]:
    """(Hugging Face name, packed weight) for every matrix of the GGUF file stored in a type loom
    keeps packed (``only``: of that format alone), with llama.cpp's q/k row permutation undone.
    Other tensors come from the converted checkpoint."""
    reader = open_gguf(path)
    arch = field_value(reader, "general.architecture")
    spec = ARCHS[arch]
    for t in weight_tensors(reader):
        shape = hf_shape(t)
        if t.tensor_type not in READERS or len(shape) != 2 or (only is not None and READERS[t.tensor_type][0] != only):
            continue
        packed = read_packed(t.data, t.tensor_type, *shape)
        if spec.permute_qk and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = field_value(reader, f"{arch}.attention.head_count")
            if "attn_k" in t.name:
                heads = field_value(reader, f"{arch}.attention.head_count_kv") or heads
            order = unpermute_rotary(torch.arange(shape[0]).reshape(-1, 1), int(heads)).reshape(-1)
            packed = packed.select_rows(order)
        yield hf_tensor_name(t.name, arch, path), packed
