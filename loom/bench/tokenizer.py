"""Tokenizers used to cut real text to an exact token length.

Three sources, best first: the server under test (``/tokenize`` and
``/detokenize``, which loom, vLLM and llama.cpp's server all have), a local
``tokenizer.json``, or an estimate of a fixed number of characters per token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol

import httpx

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class LocalTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "tokenizer.json")
        if not os.path.isfile(p):
            raise ValueError(f"no tokenizer.json at {path}")
        self._tok = HFTokenizer.from_file(p)
        self.name = f"local:{p}"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class RemoteTokenizer:
    """The server's own tokenizer over HTTP.

    The request body carries both vLLM's field names (``prompt``,
    ``add_special_tokens``) and llama.cpp's (``content``, ``add_special``); each
    server ignores the other's. Replies carry ``tokens``, and ``prompt`` (vLLM)
    or ``content`` (llama.cpp) for detokenize.
    """

    def __init__(self, base_url: str, model: str | None = None, headers: dict[str, str] | None = None, timeout: float = 60.0):
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers or {}, timeout=timeout)
        self._model = model
        self.name = f"server:{base_url}"

    def _post(self, path: str, body: dict) -> dict:
        if self._model is not None:
            body = {"model": self._model, **body}
        r = self._client.post(path, json=body)
        if r.status_code != 200:
            raise ValueError(f"{self.name}{path} answered {r.status_code}: {r.text[:200]}")
        return r.json()

    def encode(self, text: str) -> list[int]:
        reply = self._post("/tokenize", {"prompt": text, "content": text, "add_special_tokens": False, "add_special": False})
        tokens = reply.get("tokens")
        if not isinstance(tokens, list):
            raise ValueError(f"{self.name}/tokenize reply has no 'tokens' list: {str(reply)[:200]}")
        # llama.cpp returns {"id", "piece"} objects when asked for pieces; plain ids otherwise.
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]

    def decode(self, ids: Sequence[int]) -> str:
        reply = self._post("/detokenize", {"tokens": list(ids)})
        text = reply.get("prompt", reply.get("content"))
        if not isinstance(text, str):
            raise ValueError(f"{self.name}/detokenize reply has no text: {str(reply)[:200]}")
        return text

    def close(self) -> None:
        self._client.close()


class ApproxTokenizer:
    """Stand-in when no real tokenizer is at hand: every ``chars_per_token``
    characters count as one token. Prompt lengths are then only estimates."""

    def __init__(self, chars_per_token: float = 4.0):
        if not chars_per_token >= 1:
            raise ValueError(f"chars per token must be >= 1, got {chars_per_token}")
        self._step = chars_per_token
        self._pieces: dict[str, int] = {}
        self._by_id: list[str] = []
        self.name = f"approx:{chars_per_token:g}-chars-per-token"

    def encode(self, text: str) -> list[int]:
        ids = []
        n = int(len(text) / self._step + 0.999999)
        for i in range(n):
            piece = text[round(i * self._step) : round((i + 1) * self._step)]
            if piece not in self._pieces:
                self._pieces[piece] = len(self._by_id)
                self._by_id.append(piece)
            ids.append(self._pieces[piece])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._by_id[i] for i in ids)


def server_tokenizer(base_url: str, model: str | None, headers: dict[str, str] | None = None) -> RemoteTokenizer | None:
    """The server's tokenizer if its ``/tokenize`` and ``/detokenize`` round-trip
    a probe, else ``None``."""
    tok = RemoteTokenizer(base_url, model, headers)
    probe = "Shall I compare thee to a summer's day?"
    try:
        ids = tok.encode(probe)
        if ids and probe in tok.decode(ids):
            return tok
    except (httpx.HTTPError, ValueError) as e:
        log.info("server tokenizer unavailable at %s: %s", base_url, e)
    tok.close()
    return None


def resolve_tokenizer(
    tokenizer_path: str | None, base_url: str | None, model: str | None, headers: dict[str, str] | None = None
) -> Tokenizer:
    """A local tokenizer.json if given, else the server's, else the estimate (with a warning)."""
    if tokenizer_path:
        return LocalTokenizer(tokenizer_path)
    if base_url:
        tok = server_tokenizer(base_url, model, headers)
        if tok is not None:
            return tok
    log.warning(
        "no tokenizer: neither --tokenizer nor the server's /tokenize is available; prompt lengths"
        " are estimated at 4 characters per token"
    )
    return ApproxTokenizer()
