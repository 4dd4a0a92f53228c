"""Engine logprobs in the two OpenAI shapes: legacy completions (parallel lists ``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``) and chat (one object per token with
``bytes`` and a ``top_logprobs`` list)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any

from loom.outputs import TokenLogprob
from loom.tokenizer import Tokenizer

# JSON has no -Infinity; vLLM clamps the same way.
MIN_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 byte values), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB) if not math.isnan(logprob) else MIN_LOGPROB


class LogprobFormatter:
    """Renders token ids as text and bytes (cached per id) and builds the response objects."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes: dict[int, list[int]] = {}

    def token(self, token_id: int) -> str:
        return self.tokenizer.token_to_str(token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's UTF-8 bytes. A token holding part of a character decodes to U+FFFD, so its
        raw bytes come from the vocabulary entry (byte-level BPE, or SentencePiece's <0xNN>)."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        text = self.token(token_id)
        raw = text.encode("utf-8")
        if "\ufffd" in text:
            piece = self.tokenizer.convert_ids_to_tokens([token_id])[0]
            table = _byte_level_decoder()
            if (m := _BYTE_TOKEN.fullmatch(piece)) is not None:
                raw = bytes([int(m.group(1), 16)])
            elif all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
        self._bytes[token_id] = result = list(raw)
        return result

    # -- chat -------------------------------------------------------------------------------
    def chat(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        return [
            {
                "token": self.token(e.token_id),
                "logprob": _clamp(e.logprob),
                "bytes": self.token_bytes(e.token_id),
                "top_logprobs": [
                    {"token": self.token(t), "logprob": _clamp(lp), "bytes": self.token_bytes(t)} for t, lp in e.top
                ],
            }
            for e in entries
        ]

    # -- legacy completions -------------------------------------------------------------------
    def legacy(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], text_offset: int) -> dict[str, Any]:
        """``entries[i]`` scores ``token_ids[i]`` (None for a prompt's first token, which has no
        context). ``text_offset`` is where the first token starts in the choice's text."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, e in zip(token_ids, entries, strict=True):
            text = self.token(token_id)
            tokens.append(text)
            offsets.append(text_offset)
            text_offset += len(text)
            if e is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_clamp(e.logprob))
            top = {self.token(t): _clamp(lp) for t, lp in e.top}
            top.setdefault(text, _clamp(e.logprob))  # like vLLM: the chosen token is always listed
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
