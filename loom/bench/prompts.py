"""Turn a workload's lengths into prompts made of real text.

The corpus (ShareGPT prompts or Shakespeare's sonnets) is tokenized once; a
prompt of N tokens is a window of N corpus tokens, decoded and then checked by
re-encoding, since a window's text can re-tokenize to a slightly different
count at its edges.

Plain requests start at distinct corpus offsets so they share no prefix by
accident. Mooncake hash ids map to fixed corpus windows, so equal ids give equal
text and prompts share exactly the prefixes the trace says they share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.bench.tokenizer import Tokenizer
from loom.bench.workload import TraceRequest

# Spreads block ids that wrap around a short corpus onto new offsets.
_WRAP_STRIDE = 7919


@dataclass(frozen=True)
class PreparedRequest:
    """A request ready to send: when, what text, how many tokens to ask for."""

    index: int
    arrival: float
    prompt: str
    prompt_len: int  # by the harness's tokenizer; the server's usage is authoritative
    max_tokens: int
    tenant: str | None = None
    priority: int = 0
    slo_class: str | None = None
    session_id: str | None = None  # a multi-turn session's turn (sent as ``session_id``)
    turn: int = 0


def read_corpus(path: str | os.PathLike) -> str:
    """Text from a ShareGPT JSON file (every human turn) or a plain text file."""
    p = Path(path)
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON ({e})") from None
        texts = [
            str(t.get("value", ""))
            for conv in data
            if isinstance(conv, dict)
            for t in conv.get("conversations", [])
            if t.get("from") == "human"
        ]
        raw = "\n\n".join(t for t in texts if t.strip())
    if not raw.strip():
        raise ValueError(f"{p}: the corpus has no text")
    return raw


class PromptBuilder:
    """Builds prompts of exact token lengths from a corpus."""

    def __init__(self, tokenizer: Tokenizer, corpus_text: str, seed: int = 0):
        self.tokenizer = tokenizer
        self._ids = np.asarray(tokenizer.encode(corpus_text), dtype=np.int64)
        if len(self._ids) < 2:
            raise ValueError("the corpus tokenizes to fewer than 2 tokens")
        self._rng = np.random.default_rng(seed)

    @property
    def corpus_tokens(self) -> int:
        return len(self._ids)

    def _window(self, offset: int, n: int) -> list[int]:
        """``n`` corpus tokens from ``offset``, wrapping around the end."""
        idx = (offset + np.arange(n)) % len(self._ids)
        return self._ids[idx].tolist()

    def _exact(self, ids: list[int], n: int, refill_offset: int) -> tuple[str, int]:
        """Decode ``ids`` and adjust so the text re-encodes to ``n`` tokens when
        the tokenizer allows; returns the text and its actual count."""
        text = self.tokenizer.decode(ids)
        for _ in range(4):
            re_ids = self.tokenizer.encode(text)
            if len(re_ids) == n:
                return text, n
            if len(re_ids) > n:
                re_ids = re_ids[:n]
            else:
                re_ids = re_ids + self._window(refill_offset, n - len(re_ids))
            text = self.tokenizer.decode(re_ids)
        return text, len(self.tokenizer.encode(text))

    def block_offset(self, block_id: int, block_tokens: int) -> int:
        """The corpus offset of a hash-id block; a pure function of the id."""
        per_lap = max(1, len(self._ids) // block_tokens)
        lap = block_id // per_lap
        return (block_id * block_tokens + lap * _WRAP_STRIDE) % len(self._ids)

    def from_blocks(self, hash_ids: Sequence[int], block_tokens: int, n: int) -> tuple[str, int]:
        """A prompt of ``n`` tokens made of the hash ids' blocks, in order."""
        ids: list[int] = []
        for h in hash_ids:
            ids.extend(self._window(self.block_offset(h, block_tokens), block_tokens))
        last = hash_ids[-1] if hash_ids else 0
        refill = self.block_offset(last, block_tokens) + block_tokens
        if len(ids) < n:
            ids.extend(self._window(refill, n - len(ids)))
        return self._exact(ids[:n], n, refill)

    def prepare(self, workload: Sequence[TraceRequest]) -> list[PreparedRequest]:
        """Prompts for a whole workload."""
        replace_offsets = len(workload) > len(self._ids)
        offsets = self._rng.choice(len(self._ids), size=len(workload), replace=replace_offsets).tolist()
        out = []
        for i, (r, offset) in enumerate(zip(workload, offsets)):
            if r.prompt is not None:
                text, count = r.prompt, r.input_len
            elif r.hash_ids:
                text, count = self.from_blocks(r.hash_ids, r.block_tokens, r.input_len)
            else:
                text, count = self._exact(self._window(offset, r.input_len), r.input_len, offset + r.input_len)
            out.append(PreparedRequest(index=i, arrival=r.arrival, prompt=text, prompt_len=count, max_tokens=r.output_len,
                                       tenant=r.tenant, priority=r.priority, slo_class=r.slo_class))
        return out
