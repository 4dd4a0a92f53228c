"""Per-request block tables on top of the block pool: prefix matching, growth, caching, forks,
and rolling back the tail (rejected speculative tokens)."""

from __future__ import annotations

from loom.kvcache.block_pool import BlockKey, BlockPool
from loom.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def _key(self, req: Request, index: int) -> BlockKey:
        parent = req.block_hashes[index - 1] if index > 0 else None
        bs = self.block_size
        return BlockKey(parent, tuple(req.token_ids_slice(index * bs, (index + 1) * bs)))

    def match_prefix(self, req: Request) -> list[int]:
        """Blocks of the prefix cache that hold the start of ``req``'s tokens.

        At most ``num_tokens - 1`` tokens match: the last token must be computed to produce logits.
        A request that wants prompt logprobs or an embedding matches nothing (every prompt
        position must be computed to score or pool it). Fills ``req.block_hashes`` for the
        matched blocks; takes no references yet."""
        req.block_hashes.clear()
        if not self.pool.enable_prefix_caching or req.params.prompt_logprobs is not None or req.embed:
            return []
        hits: list[int] = []
        max_blocks = (req.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            key = self._key(req, i)
            block = self.pool.lookup(key)
            if block is None:
                break
            req.block_hashes.append(key.hash)
            hits.append(block)
        return hits

    def blocks_needed(self, req: Request, num_tokens: int, num_hits: int = 0) -> int:
        """Blocks to add so that ``req`` holds ``num_tokens`` tokens after taking ``num_hits`` hits."""
        return max(0, cdiv(num_tokens, self.block_size) - len(req.block_ids) - num_hits)

    def allocate(self, req: Request, num_tokens: int, hits: list[int] | None = None) -> bool:
        """Grow ``req``'s block table (after taking the prefix-cache ``hits``) to hold
        ``num_tokens`` tokens. False, with nothing taken, when the blocks do not exist; a free
        cached hit uses up a free block too."""
        hits = hits or []
        needed = self.blocks_needed(req, num_tokens, len(hits))
        hits_now_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if needed + hits_now_free > self.pool.num_free_blocks:
            return False
        for b in hits:
            self.pool.touch(b)
        req.block_ids.extend(hits)
        if needed:
            req.block_ids.extend(self.pool.allocate(needed))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks full of computed (accepted) tokens with the prefix index."""
        num_full = req.num_computed_tokens // self.block_size
        for i in range(len(req.block_hashes), num_full):
            key = self._key(req, i)
            req.block_hashes.append(key.hash)
            self.pool.register(req.block_ids[i], key)

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Keep only the blocks that hold the first ``num_tokens`` tokens (roll back the KV of
        rejected draft tokens). Slots past ``num_tokens`` in the last kept block are overwritten
        by the next tokens."""
        keep = cdiv(num_tokens, self.block_size)
        if len(req.block_ids) > keep:
            self.pool.free(list(reversed(req.block_ids[keep:])))
            del req.block_ids[keep:]
        del req.block_hashes[num_tokens // self.block_size :]

    def free(self, req: Request) -> None:
        self.pool.free(list(reversed(req.block_ids)))
        req.block_ids.clear()
        req.block_hashes.clear()

    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Share ``parent``'s full blocks with ``child``. Returns (src, dst) of the partial last
        block that must be copied, or None when the sequence ends on a block boundary.
        Raises MemoryError when no block is free for the copy."""
        full = parent.num_computed_tokens // self.block_size
        shared = parent.block_ids[:full]
        for b in shared:
            self.pool.touch(b)
        child.block_ids = list(shared)
        child.block_hashes = list(parent.block_hashes[:full])
        if parent.num_computed_tokens % self.block_size == 0:
            return None
        try:
            (dst,) = self.pool.allocate(1)
        except MemoryError:
            self.free(child)
            raise
        child.block_ids.append(dst)
        return parent.block_ids[full], dst
