"""Fixed-size KV blocks: reference counts, a free list in LRU order, and the prefix index.

A block whose reference count drops to zero goes to the tail of the free list but keeps its
contents and its hash, so a later request with the same prefix can take it back (a prefix-cache
hit). Allocation takes from the head of the free list, i.e. evicts the least recently freed
cached block first.
"""

from __future__ import annotations

import functools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

# The parent hash of a sequence's first block. An int, not None: ints and tuples of ints hash the
# same in every process (None does not before Python 3.12), so a router can compute the hashes a
# replica's prefix cache holds (``chain_hashes``).
ROOT_HASH = 0
MAX_PREFIX_EVENTS = 1 << 16  # changes kept for a reader (a router) before it must take a snapshot


@dataclass(frozen=True)
class BlockKey:
    """Identity of a full block: chained hash of its parent plus its own tokens.

    The tokens are kept beside the hash so that a hash collision can never map a request to
    another request's KV."""

    parent_hash: int
    tokens: tuple[int, ...]

    @functools.cached_property
    def hash(self) -> int:
        return hash((self.parent_hash, self.tokens))


def block_keys(token_ids: Sequence[int], block_size: int, num_blocks: int | None = None) -> list[BlockKey]:
    """The keys of the first ``num_blocks`` full blocks of ``token_ids`` (all its full blocks by
    default), each chained to the one before."""
    if num_blocks is None:
        num_blocks = len(token_ids) // block_size
    keys: list[BlockKey] = []
    parent = ROOT_HASH
    for i in range(num_blocks):
        keys.append(BlockKey(parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        parent = keys[-1].hash
    return keys


def chain_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The hashes of the full blocks of ``token_ids``: the keys under which a prefix cache with
    this block size holds them."""
    return [key.hash for key in block_keys(token_ids, block_size)]


@dataclass(frozen=True)
class PrefixEvents:
    """How the prefix cache changed since the last read: ``changes`` in order, each (stored?,
    hash); or, when more changed than was kept, ``snapshot``: every hash it holds now."""

    changes: tuple[tuple[bool, int], ...] = ()
    snapshot: tuple[int, ...] | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._key_of_block: dict[int, BlockKey] = {}
        self._block_of_key: dict[BlockKey, int] = {}
        # (stored?, hash) per change of the prefix index, once someone reads them (track_events).
        self._events: deque[tuple[bool, int]] | None = None
        self._events_lost = False

    def track_events(self) -> None:
        """Start recording the prefix index's changes for ``take_events`` (a replica reporting to a
        router); the first read is a snapshot."""
        self._events = deque()
        self._events_lost = True

    def take_events(self) -> PrefixEvents:
        """The changes since the last call (a snapshot after too many). Safe to call from another
        thread than the one that allocates and registers blocks: that one only appends to the
        deque, this one drains it."""
        assert self._events is not None, "track_events() first"
        if self._events_lost:
            self._events_lost = False
            self._events.clear()
            return PrefixEvents(snapshot=tuple(key.hash for key in list(self._block_of_key)))
        return PrefixEvents(tuple(self._events.popleft() for _ in range(len(self._events))))

    def _record(self, stored: bool, key: BlockKey) -> None:
        if self._events is None:
            return
        if len(self._events) >= MAX_PREFIX_EVENTS:
            self._events_lost = True
        else:
            self._events.append((stored, key.hash))

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free, including evictable cached ones)."""
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            key = self._key_of_block.pop(block, None)
            if key is not None:
                del self._block_of_key[key]
                self._record(False, key)
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def lookup(self, key: BlockKey) -> int | None:
        """Return a cached block holding exactly ``key``, or None."""
        if not self.enable_prefix_caching:
            return None
        return self._block_of_key.get(key)

    def touch(self, block: int) -> None:
        """Take one more reference on a block (a prefix-cache hit or a fork)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference on each block. Pass them tail-first so the tail of a sequence
        (least likely to be shared) is evicted before its head."""
        for block in blocks:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def register(self, block: int, key: BlockKey) -> None:
        """Record that ``block`` now holds the full block ``key`` (so later requests can reuse it)."""
        if not self.enable_prefix_caching or block in self._key_of_block:
            return
        if key in self._block_of_key:  # another block already holds these tokens; keep the first
            return
        self._key_of_block[block] = key
        self._block_of_key[key] = block
        self._record(True, key)
