"""KV cache bookkeeping: the block pool with its prefix index, and per-request block tables."""

from loom.kvcache.block_pool import BlockKey, BlockPool
from loom.kvcache.manager import ForkCopies, KVCacheManager

__all__ = ["BlockKey", "BlockPool", "ForkCopies", "KVCacheManager"]
