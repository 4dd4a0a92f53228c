"""Lookahead proposals from an n-gram pool shared by every request: the tokens that followed each
short context anywhere in past prompts and outputs, proposed as several branches at once (a trie)
and verified in one pass with a tree mask (trie-based retrieval, as in PIA's Lookahead and REST)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loom.request import Request
from loom.spec.proposer import Draft, Proposer


@dataclass(frozen=True)
class LookaheadOptions:
    key_len: int = 2  # tokens of context that select continuations
    branch_len: int = 6  # tokens per continuation kept in the pool
    branches: int = 4  # continuations proposed per step, merged into one trie
    max_keys: int = 200_000  # contexts kept (least recently used ones go first)
    per_key: int = 8  # continuations kept per context (the most frequent)

    def __post_init__(self) -> None:
        for name in ("key_len", "branch_len", "branches", "max_keys", "per_key"):
            if getattr(self, name) < 1:
                raise ValueError(f"lookahead proposer: {name} must be >= 1, got {getattr(self, name)}")
        if self.key_len > 16 or self.branch_len > 64 or self.branches > 64 or self.per_key > 64:
            raise ValueError("lookahead proposer: key_len <= 16, branch_len <= 64, branches <= 64 and per_key <= 64")


class NgramPool:
    """Context (``key_len`` tokens) -> the continuations seen after it, with counts; bounded."""

    def __init__(self, options: LookaheadOptions) -> None:
        self.options = options
        self._pool: OrderedDict[tuple[int, ...], dict[tuple[int, ...], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pool)

    def add(self, key: tuple[int, ...], continuation: tuple[int, ...]) -> None:
        o = self.options
        seen = self._pool.get(key)
        if seen is None:
            seen = self._pool[key] = {}
            if len(self._pool) > o.max_keys:
                self._pool.popitem(last=False)
        else:
            self._pool.move_to_end(key)
        for i in range(1, len(continuation)):  # it replaces the shorter windows it grew from
            seen.pop(continuation[:i], None)
        seen[continuation] = seen.get(continuation, 0) + 1
        if len(seen) > o.per_key:
            del seen[min(seen, key=seen.__getitem__)]

    def lookup(self, key: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Continuations after ``key``, the most frequent first (the latest on ties)."""
        seen = self._pool.get(key)
        if not seen:
            return []
        return sorted(reversed(seen), key=lambda c: -seen[c])  # stable: the latest first on ties


class LookaheadProposer(Proposer):
    name = "lookahead"
    makes_trees = True

    def __init__(self, options: LookaheadOptions) -> None:
        self.options = options
        self.pool = NgramPool(options)
        self._indexed: dict[str, int] = {}  # request id -> tokens whose continuations are in the pool

    def _learn(self, req: Request) -> None:
        """Add the windows of ``req`` that became complete (and the latest partial ones)."""
        o = self.options
        total = req.num_tokens
        done = self._indexed.get(req.request_id, 0)
        lo = max(done - o.key_len, 0)
        tokens = req.token_ids_slice(lo, total)
        # windows starting at positions done .. total-1: context = [p - key_len, p), continuation = [p, p + branch_len)
        for p in range(max(done, o.key_len), total):
            self.pool.add(tuple(tokens[p - o.key_len - lo : p - lo]), tuple(tokens[p - lo : p - lo + o.branch_len]))
        # Complete windows are final; a partial one is added again, longer, next time.
        self._indexed[req.request_id] = max(done, total - o.branch_len + 1, 0)

    def _tree(self, req: Request, budget: int) -> Draft:
        o = self.options
        if budget <= 0 or req.num_tokens < o.key_len:
            return Draft()
        key = tuple(req.token_ids_slice(req.num_tokens - o.key_len, req.num_tokens))
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for branch in self.pool.lookup(key)[: o.branches]:
            parent = -1
            for t in branch:
                node = children.get((parent, t))
                if node is None:
                    if len(tokens) == budget:
                        break
                    node = children[(parent, t)] = len(tokens)
                    tokens.append(t)
                    parents.append(parent)
                parent = node
        return Draft(tuple(tokens), tuple(parents))

    def limits(self, requests: Sequence[Request], max_k: int) -> list[int]:
        for r in requests:
            self._learn(r)
        return [len(self._tree(r, max_k).token_ids) for r in requests]

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        return [self._tree(r, k) for r, k in zip(requests, ks)]

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._indexed.pop(rid, None)  # what it taught the pool stays
