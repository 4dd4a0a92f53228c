"""Fixed-size KV blocks: reference counts, a free list in LRU order, and the prefix index.

A block whose reference count drops to zero goes to the tail of the free list but keeps its
contents and its hash, so a later request with the same prefix can take it back (a prefix-cache
hit). Allocation takes from the head of the free list, i.e. evicts the least recently freed
cached block first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockKey:
    """Identity of a full block: chained hash of its parent plus its own tokens.

    The tokens are kept beside the hash so that a hash collision can never map a request to
    another request's KV."""

    parent_hash: int | None
    tokens: tuple[int, ...]

    @property
    def hash(self) -> int:
        return hash((self.parent_hash, self.tokens))


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
