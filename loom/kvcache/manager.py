"""Per-request block tables on top of the block pool: prefix matching, growth, caching, forks,
and rolling back the tail (rejected speculative tokens)."""

from __future__ import annotations

from dataclasses import dataclass

from loom.kvcache.block_pool import ROOT_HASH, BlockKey, BlockPool, block_keys
from loom.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Pin:
    """A finished turn's cached blocks, held for its session until ``expires`` (monotonic seconds)."""

    blocks: list[int]
    expires: float


@dataclass(frozen=True)
class ForkCopies:
    """What a fork copies before the next forward pass: the parent's partial last block, or with a
    residual its residual slot (the open group)."""

    block: tuple[int, int] | None = None
    slot: tuple[int, int] | None = None


class KVCacheManager:
    """``residual_tokens > 0`` (a KIVI cache): each request holding blocks also holds one of
    ``num_slots`` residual slots, where its newest positions gather until their group of
    ``residual_tokens`` is complete and quantized into the blocks. Only blocks of complete groups
    are shared (prefix cache, forks); a fork copies the open group's slot."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 residual_tokens: int = 0, num_slots: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.residual_tokens = residual_tokens
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._keys_memo: dict[str, tuple[int, list[BlockKey]]] = {}  # request id -> (length, block keys)
        self.pins: dict[str, Pin] = {}  # session -> its last turn's blocks (Continuum)
        self.num_pinned_blocks = 0
        self.pins_expired = 0
        self.pins_released_for_memory = 0

    def _sealed(self, num_tokens: int) -> int:
        """Tokens of the complete groups among the first ``num_tokens`` (all of them without a residual)."""
        r = self.residual_tokens
        return num_tokens // r * r if r else num_tokens

    def max_drafts(self, end: int) -> int:
        """Draft tokens that may follow position ``end - 1``: with a residual, none may complete a
        group, since a quantized group cannot be rolled back."""
        r = self.residual_tokens
        return r - 1 - end % r if r else 1 << 30

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def _key(self, req: Request, index: int) -> BlockKey:
        parent = req.block_hashes[index - 1] if index > 0 else ROOT_HASH
        bs = self.block_size
        return BlockKey(parent, tuple(req.token_ids_slice(index * bs, (index + 1) * bs)))

    def _prefix_keys(self, req: Request) -> list[BlockKey]:
        """The keys of the blocks of ``req`` that may match (its first ``num_tokens - 1`` tokens),
        each chained to the one before; computed once per request and length."""
        memo = self._keys_memo.get(req.request_id)
        if memo is None or memo[0] != req.num_tokens:
            bs = self.block_size
            n = self._sealed(req.num_tokens - 1) // bs
            memo = self._keys_memo[req.request_id] = (req.num_tokens, block_keys(req.token_ids_slice(0, n * bs), bs))
        return memo[1]

    def _cached_prefix(self, req: Request) -> list[tuple[BlockKey, int]]:
        """The keys and blocks of the prefix cache that hold the start of ``req``, whole groups only
        (with a residual, the open group starts in the slot); nothing taken."""
        if not self.pool.enable_prefix_caching or req.params.prompt_logprobs is not None or req.embed:
            return []
        found: list[tuple[BlockKey, int]] = []
        for key in self._prefix_keys(req):
            block = self.pool.lookup(key)
            if block is None:
                break
            found.append((key, block))
        return found[: self._sealed(len(found) * self.block_size) // self.block_size]

    def match_prefix(self, req: Request) -> list[int]:
        """Blocks of the prefix cache that hold the start of ``req``'s tokens.

        At most ``num_tokens - 1`` tokens match: the last token must be computed to produce logits.
        A request that wants prompt logprobs or an embedding matches nothing (every prompt
        position must be computed to score or pool it). Fills ``req.block_hashes`` for the
        matched blocks; takes no references yet."""
        found = self._cached_prefix(req)
        self._keys_memo.pop(req.request_id, None)  # admitted (or retried from scratch): no more probes
        req.block_hashes[:] = [key.hash for key, _ in found]
        return [block for _, block in found]

    def cached_prefix_tokens(self, req: Request) -> int:
        """Tokens at the start of ``req`` that the prefix cache holds now, as ``match_prefix`` would
        take them, without side effects (no references, ``req.block_hashes`` untouched)."""
        return len(self._cached_prefix(req)) * self.block_size

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
            self._release_pins_for(needed + hits_now_free - self.pool.num_free_blocks, keep=req.session_id)
            hits_now_free = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
            if needed + hits_now_free > self.pool.num_free_blocks:
                return False
        if self.residual_tokens and req.residual_slot < 0:
            if not self.free_slots:
                return False
            req.residual_slot = self.free_slots.pop()
        for b in hits:
            self.pool.touch(b)
        req.block_ids.extend(hits)
        if needed:
            req.block_ids.extend(self.pool.allocate(needed))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks full of computed (accepted) tokens with the prefix index."""
        num_full = self._sealed(req.num_computed_tokens) // self.block_size
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

    def adopt_blocks(self, token_ids: list[int], start_block: int, num_blocks: int) -> tuple[list[int], list[int]]:
        """Take blocks for full blocks ``start_block .. start_block + num_blocks`` of ``token_ids``
        that come from another engine, registered in the prefix index under their keys: those not
        held already, as many as are free. Returns (their indices among the ``num_blocks``, the
        blocks to write them into); ``release_adopted`` once written."""
        if not self.pool.enable_prefix_caching:
            return [], []
        keys = block_keys(token_ids, self.block_size, start_block + num_blocks)[start_block:]
        wanted = [(row, key) for row, key in enumerate(keys) if self.pool.lookup(key) is None]
        wanted = wanted[: self.pool.num_free_blocks]
        blocks = self.pool.allocate(len(wanted))
        for block, (_, key) in zip(blocks, wanted):
            self.pool.register(block, key)
        return [row for row, _ in wanted], blocks

    def release_adopted(self, blocks: list[int]) -> None:
        """Free adopted blocks into the prefix cache (last first, so the head is evicted last)."""
        self.pool.free(list(reversed(blocks)))

    def free(self, req: Request) -> None:
        self._keys_memo.pop(req.request_id, None)
        self.pool.free(list(reversed(req.block_ids)))
        req.block_ids.clear()
        req.block_hashes.clear()
        if req.residual_slot >= 0:
            self.free_slots.append(req.residual_slot)
            req.residual_slot = -1

    # -- multi-turn pins (Continuum) ----------------------------------------------------------
    def pin(self, req: Request, session: str, expires: float) -> None:
        """Hold ``req``'s cached blocks (its full blocks in the prefix index) for ``session`` until
        ``expires``, replacing the session's previous pin; then free ``req``'s own references."""
        self.unpin(session)
        blocks = req.block_ids[: len(req.block_hashes)]
        for b in blocks:
            self.pool.touch(b)
        if blocks:
            self.pins[session] = Pin(blocks, expires)
            self.num_pinned_blocks += len(blocks)
        self.free(req)

    def unpin(self, session: str) -> int:
        """Release a session's pin (its blocks stay cached, evictable); the number of blocks it held."""
        pin = self.pins.pop(session, None)
        if pin is None:
            return 0
        self.pool.free(list(reversed(pin.blocks)))
        self.num_pinned_blocks -= len(pin.blocks)
        return len(pin.blocks)

    def expire_pins(self, now: float) -> None:
        for session in [s for s, p in self.pins.items() if p.expires <= now]:
            self.unpin(session)
            self.pins_expired += 1

    def _release_pins_for(self, shortfall: int, keep: str | None) -> None:
        """Memory pressure: release pins, the latest to expire first (a pin's time-to-live follows its
        session's gaps, so the latest expiry is the session expected back last, or one whose gaps are
        not known yet), until ``shortfall`` more blocks are free or only ``keep``'s pin is left. A
        released pin's blocks go to the LRU free list with their hashes, still matchable until reused."""
        for session in sorted(self.pins, key=lambda s: -self.pins[s].expires):
            if shortfall <= 0:
                return
            if session == keep:
                continue
            before = self.pool.num_free_blocks
            self.unpin(session)
            self.pins_released_for_memory += 1
            shortfall -= self.pool.num_free_blocks - before

    def fork(self, parent: Request, child: Request) -> ForkCopies:
        """Share ``parent``'s full blocks (of complete groups, with a residual) with ``child``, and
        say what must be copied: the partial last block, or with a residual the slot, where the
        open group lives (the child gets fresh blocks for it). Raises MemoryError when no block or
        slot is free for the copy."""
        n = parent.num_computed_tokens
        full = self._sealed(n) // self.block_size
        shared = parent.block_ids[:full]
        for b in shared:
            self.pool.touch(b)
        child.block_ids = list(shared)
        child.block_hashes = list(parent.block_hashes[:full])
        try:
            if self.residual_tokens:
                if not self.free_slots:
                    raise MemoryError("no free residual slot")
                child.block_ids.extend(self.pool.allocate(cdiv(n, self.block_size) - full))
                child.residual_slot = self.free_slots.pop()
                return ForkCopies(slot=(parent.residual_slot, child.residual_slot))
            if n % self.block_size == 0:
                return ForkCopies()
            (dst,) = self.pool.allocate(1)
        except MemoryError:
            self.free(child)
            raise
        child.block_ids.append(dst)
        return ForkCopies(block=(parent.block_ids[full], dst))
