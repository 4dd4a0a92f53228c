"""Draft shapes, the n-gram (prompt lookup) proposer and the lookahead pool."""

from __future__ import annotations

import pytest

from loom.request import Request
from loom.sampling import SamplingParams
from loom.spec import Draft
from loom.spec.lookahead import LookaheadOptions, LookaheadProposer, NgramPool
from loom.spec.ngram import NgramOptions, NgramProposer


def request(tokens: list[int], rid: str = "r", prompt_len: int | None = None) -> Request:
    n = len(tokens) if prompt_len is None else prompt_len
    req = Request(rid, tokens[:n], SamplingParams())
    req.output_token_ids = tokens[n:]
    return req


def test_draft_shapes():
    assert Draft((5, 6, 7), (-1, 0, 1)).parents == ()  # a chain is stored as one
    tree = Draft((5, 6, 8, 9), (-1, 0, -1, 2))
    assert tree.depth == 2 and tree.chain() == Draft((5, 6)) and tree.cut(3) == Draft((5, 6, 8), (-1, 0, -1))
    assert Draft((1, 2, 3)).depth == 3
    with pytest.raises(ValueError, match="before their children"):
        Draft((1, 2), (1, -1))
    with pytest.raises(ValueError, match="one parent per token"):
        Draft((1, 2), (-1,))


def test_ngram_proposes_what_followed_the_longest_latest_match():
    p = NgramProposer(NgramOptions(min_n=2, max_n=3))
    # suffix (7, 8, 9) occurred once (followed by 1, 2); (8, 9) also later (followed by 5)
    req = request([7, 8, 9, 1, 2, 3, 8, 9, 5, 6, 7, 8, 9])
    assert p.limits([req], 4) == [4]
    assert p.propose([req], [2]) == [Draft((1, 2))]
    # the index grows with the request: the continuation is cut at the request's end
    req.output_token_ids += [1]
    assert p.propose([req], [8]) == [Draft((2, 3, 8, 9, 5, 6, 7, 8))]  # after (8, 9, 1) at the start
    assert p.propose([request([1, 2, 3, 4], "other")], [3]) == [Draft()]


def test_ngram_min_n_and_forget():
    p = NgramProposer(NgramOptions(min_n=2, max_n=2))
    req = request([4, 5, 6, 5])  # only a 1-gram (5) repeats
    assert p.limits([req], 3) == [0]
    p.forget(["r"])
    assert p._indexes == {}
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramOptions(min_n=3, max_n=2)


def test_pool_counts_bounds_and_partial_windows():
    pool = NgramPool(LookaheadOptions(key_len=1, branch_len=3, per_key=2, max_keys=2))
    pool.add((1,), (2,))
    pool.add((1,), (2, 3))  # the window grew: it replaces the shorter one
    pool.add((1,), (4, 5, 6))
    pool.add((1,), (4, 5, 6))
    assert pool.lookup((1,)) == [(4, 5, 6), (2, 3)]
    pool.add((1,), (7, 7, 7))  # a third continuation: the least frequent goes
    assert len(pool.lookup((1,))) == 2 and (4, 5, 6) in pool.lookup((1,))
    pool.add((2,), (1,))
    pool.add((3,), (1,))  # a third key: the least recently used goes
    assert len(pool) == 2 and pool.lookup((1,)) == []


def test_lookahead_merges_branches_into_a_trie_across_requests():
    p = LookaheadProposer(LookaheadOptions(key_len=2, branch_len=3, branches=3))
    other = request([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8], "other")
    mine = request([40, 41, 1, 2], "mine")
    p.limits([other], 8)  # learns the other request's windows
    [draft] = p.propose([mine], [8])
    assert draft.token_ids[:3] == (3, 7, 8) or draft.token_ids[:3] == (3, 4, 5)
    assert sorted(draft.token_ids) == [3, 4, 5, 7, 8] and draft.parents  # "3" is shared by both branches
    assert all(parent < i for i, parent in enumerate(draft.parents))
    assert p.propose([mine], [2])[0].depth <= 2 and len(p.propose([mine], [2])[0].token_ids) == 2
    with pytest.raises(ValueError, match="branches must be >= 1"):
        LookaheadOptions(branches=0)
