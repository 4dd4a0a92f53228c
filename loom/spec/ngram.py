"""Prompt lookup (n-gram) proposals: find the request's last n tokens earlier in its own prompt
and output, and propose what followed them there."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loom.request import Request
from loom.spec.proposer import Draft, Proposer


@dataclass(frozen=True)
class NgramOptions:
    min_n: int = 2  # the shortest suffix that may match
    max_n: int = 4  # the longest; longer matches win, then the latest occurrence

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n <= 64:
            raise ValueError(f"ngram proposer: need 1 <= min_n <= max_n <= 64, got min_n={self.min_n}, max_n={self.max_n}")


class _Index:
    """One request's n-grams (n in [min_n, max_n]) -> the position just after their latest
    occurrence, over its tokens but the last; extended as the request grows (its tokens only grow)."""

    def __init__(self, max_n: int) -> None:
        self.num_tokens = 0  # tokens seen when last extended
        self.after: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]

    def extend(self, req: Request, min_n: int, max_n: int) -> None:
        total = req.num_tokens
        lo = max(self.num_tokens - 1 - max_n, 0)
        window = req.token_ids_slice(lo, total)
        # n-grams ending at positions num_tokens-1 .. total-2 (the suffix, ending at total-1, is the query)
        for end in range(max(self.num_tokens - 1, 0), total - 1):
            for n in range(min_n, min(max_n, end + 1) + 1):
                self.after[n][tuple(window[end + 1 - n - lo : end + 1 - lo])] = end + 1
        self.num_tokens = total


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, options: NgramOptions) -> None:
        self.options = options
        self._indexes: dict[str, _Index] = {}
        self._found: dict[str, tuple[int, ...]] = {}  # this step's guesses, from ``limits``

    def _guess(self, req: Request, max_k: int) -> tuple[int, ...]:
        o = self.options
        index = self._indexes.get(req.request_id)
        if index is None:
            index = self._indexes[req.request_id] = _Index(o.max_n)
        index.extend(req, o.min_n, o.max_n)
        total = req.num_tokens
        suffix = req.token_ids_slice(max(total - o.max_n, 0), total)
        for n in range(min(o.max_n, total - 1), o.min_n - 1, -1):
            start = index.after[n].get(tuple(suffix[len(suffix) - n :]))
            if start is not None:
                return tuple(req.token_ids_slice(start, min(start + max_k, total)))
        return ()

    def limits(self, requests: Sequence[Request], max_k: int) -> list[int]:
        self._found = {r.request_id: self._guess(r, max_k) if max_k else () for r in requests}
        return [len(self._found[r.request_id]) for r in requests]

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        found = self._found
        self._found = {}
        return [Draft((found[r.request_id] if r.request_id in found else self._guess(r, k))[:k])
                for r, k in zip(requests, ks)]

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._indexes.pop(rid, None)
