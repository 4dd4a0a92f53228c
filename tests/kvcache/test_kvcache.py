import pytest

from loom.kvcache import ROOT_HASH, BlockKey, BlockPool, ForkCopies, KVCacheManager
from loom.request import Request
from loom.sampling import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8))


def computed(kv: KVCacheManager, rid: str, tokens: list[int]) -> Request:
    """A request whose tokens are all in the cache, its full blocks registered."""
    r = req(rid, tokens)
    assert kv.allocate(r, len(tokens))
    r.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(r)
    return r


def test_pool_allocate_free_and_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free_blocks == 1
    pool.touch(a[0])
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.ref_counts[a[0]] == 1
    with pytest.raises(MemoryError):
        pool.allocate(4)


def test_pool_lru_evicts_least_recently_freed_cached_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, BlockKey(ROOT_HASH, (1,)))
    pool.register(b, BlockKey(ROOT_HASH, (2,)))
    pool.free([a])
    pool.free([b])
    (c,) = pool.allocate(1)  # evicts a (freed first)
    assert c == a
    assert pool.lookup(BlockKey(ROOT_HASH, (1,))) is None
    assert pool.lookup(BlockKey(ROOT_HASH, (2,))) == b


def test_prefix_match_reuses_full_blocks_and_counts_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r1 = computed(kv, "a", list(range(10)))
    assert len(r1.block_hashes) == 2
    r2 = req("b", list(range(8)) + [99, 98, 97])
    hits = kv.match_prefix(r2)
    assert hits == r1.block_ids[:2]
    assert kv.allocate(r2, 11, hits)
    assert r2.block_ids[:2] == r1.block_ids[:2] and r2.block_ids[2] != r1.block_ids[2]
    assert kv.pool.ref_counts[r1.block_ids[0]] == 2


def test_prefix_match_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r1 = computed(kv, "a", list(range(8)))
    r2 = req("b", list(range(8)))
    assert len(kv.match_prefix(r2)) == 1  # 8 tokens: the second block must be recomputed


def test_chained_hash_distinguishes_same_block_after_different_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r1 = computed(kv, "a", [1, 2, 3, 4, 5])
    r2 = req("b", [9, 9, 3, 4, 5])
    assert kv.match_prefix(r2) == []


def test_disabled_prefix_cache_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    r1 = computed(kv, "a", [1, 2, 3, 4, 5])
    assert kv.match_prefix(req("b", [1, 2, 3, 4, 5])) == []


def test_request_wanting_prompt_logprobs_matches_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r1 = computed(kv, "a", [1, 2, 3, 4, 5])
    scored = Request("b", [1, 2, 3, 4, 5], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert kv.match_prefix(scored) == []
    assert len(kv.match_prefix(req("c", [1, 2, 3, 4, 5]))) == 2


def test_allocate_counts_free_cached_hits():
    kv = KVCacheManager(num_blocks=2, block_size=2)
    r1 = computed(kv, "a", [1, 2, 3])
    kv.free(r1)
    r2 = req("b", [1, 2, 7, 8, 9])
    hits = kv.match_prefix(r2)
    assert len(hits) == 1
    # 5 tokens need 2 more blocks + the hit itself, only 2 blocks exist: nothing is taken
    assert not kv.allocate(r2, 5, hits)
    assert r2.block_ids == [] and kv.num_free_blocks == 2
    assert kv.allocate(r2, 4, hits)
    assert r2.block_ids[0] == hits[0] and kv.num_free_blocks == 0


def test_fork_shares_full_blocks_and_copies_partial():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent = computed(kv, "p", list(range(6)))
    child = req("c", list(range(6)))
    copies = kv.fork(parent, child)
    assert child.block_ids[0] == parent.block_ids[0]
    assert copies == ForkCopies(block=(parent.block_ids[1], child.block_ids[1]))
    assert kv.pool.ref_counts[parent.block_ids[0]] == 2
    kv.free(child)
    kv.free(parent)
    assert kv.num_free_blocks == 8


def test_truncate_frees_tail_blocks_and_forgets_their_hashes():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = req("r", list(range(5)))
    assert kv.allocate(r, 13)  # 5 known tokens + 8 draft slots: 4 blocks
    tail = r.block_ids[2:]
    r.num_computed_tokens = 6  # one draft accepted
    kv.truncate(r, 6)
    kv.cache_full_blocks(r)
    assert len(r.block_ids) == 2 and len(r.block_hashes) == 1
    assert all(kv.pool.ref_counts[b] == 0 for b in tail) and kv.num_free_blocks == 6
    # Nothing past the accepted tokens was registered with the prefix index.
    other = req("o", list(range(5)) + [0] * 8)
    assert len(kv.match_prefix(other)) == 1


def test_residual_slots_come_and_go_with_the_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4, residual_tokens=8, num_slots=2)
    a, b, c = req("a", list(range(5))), req("b", list(range(5))), req("c", list(range(5)))
    assert kv.allocate(a, 5) and kv.allocate(b, 5)
    assert {a.residual_slot, b.residual_slot} == {0, 1}
    assert not kv.allocate(c, 5) and c.block_ids == [] and c.residual_slot == -1  # no slot: nothing taken
    assert kv.num_free_blocks == 12
    kv.free(a)
    assert a.residual_slot == -1 and kv.allocate(c, 5) and c.residual_slot >= 0


def test_with_a_residual_only_complete_groups_are_cached_and_matched():
    kv = KVCacheManager(num_blocks=16, block_size=4, residual_tokens=8, num_slots=4)
    tokens = list(range(14))
    parent = computed(kv, "p", tokens)  # one complete group of 8 (2 blocks); 6 tokens still in the residual
    assert len(parent.block_hashes) == 2
    r = req("r", tokens + [99])
    assert kv.match_prefix(r) == parent.block_ids[:2]
    short = req("s", tokens[:7] + [98, 97])  # shares 1 full block, half a group: nothing matches
    assert kv.match_prefix(short) == []
    assert kv.max_drafts(14) == 1 and kv.max_drafts(16) == 7  # drafts never complete a group
    assert KVCacheManager(4, 4).max_drafts(3) > 100


def test_fork_with_a_residual_copies_the_slot_not_the_block():
    kv = KVCacheManager(num_blocks=16, block_size=4, residual_tokens=8, num_slots=2)
    parent = computed(kv, "p", list(range(13)))
    child = req("c", list(range(13)))
    copies = kv.fork(parent, child)
    assert child.block_ids[:2] == parent.block_ids[:2]  # the complete group is shared
    assert len(child.block_ids) == 4 and not set(child.block_ids[2:]) & set(parent.block_ids)
    assert copies == ForkCopies(slot=(parent.residual_slot, child.residual_slot))
    with pytest.raises(MemoryError):  # both slots taken
        kv.fork(parent, req("d", list(range(13))))
    kv.free(child)
    kv.free(parent)
    assert kv.num_free_blocks == 16 and sorted(kv.free_slots) == [0, 1]


def test_chain_hashes_are_the_prefix_cache_keys_in_any_process():
    import subprocess
    import sys

    from loom.kvcache import chain_hashes

    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = computed(kv, "a", list(range(10)))
    assert chain_hashes(list(range(10)), 4) == r.block_hashes
    # A router in another process computes the same numbers (hash(None) would differ before 3.12).
    code = "from loom.kvcache import chain_hashes; print(chain_hashes(list(range(10)), 4))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert other.stdout.strip() == str(r.block_hashes)


def test_pool_reports_stored_and_evicted_blocks_in_order():
    pool = BlockPool(2)
    pool.track_events()
    assert pool.take_events().snapshot == ()  # the first read is a snapshot
    a, b = pool.allocate(2)
    k1, k2, k3 = (BlockKey(ROOT_HASH, (t,)) for t in (1, 2, 3))
    pool.register(a, k1)
    pool.register(b, k2)
    pool.free([a, b])
    (c,) = pool.allocate(1)  # evicts k1
    pool.register(c, k3)
    assert pool.take_events().changes == ((True, k1.hash), (True, k2.hash), (False, k1.hash), (True, k3.hash))
    assert pool.take_events().changes == ()


def test_pool_events_past_the_cap_become_a_snapshot(monkeypatch):
    import loom.kvcache.block_pool as block_pool

    monkeypatch.setattr(block_pool, "MAX_PREFIX_EVENTS", 2)
    pool = BlockPool(4)
    pool.track_events()
    pool.take_events()
    blocks = pool.allocate(3)
    keys = [BlockKey(ROOT_HASH, (t,)) for t in range(3)]
    for block, key in zip(blocks, keys):
        pool.register(block, key)
    events = pool.take_events()
    assert events.snapshot is not None and set(events.snapshot) == {k.hash for k in keys}
