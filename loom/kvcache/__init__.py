"""KV cache bookkeeping: the block pool with its prefix index, and per-request block tables."""

from loom.kvcache.block_pool import ROOT_HASH, BlockKey, BlockPool, PrefixEvents, chain_hashes
from loom.kvcache.manager import ForkCopies, KVCacheManager

__all__ = ["ROOT_HASH", "BlockKey", "BlockPool", "ForkCopies", "KVCacheManager", "PrefixEvents", "chain_hashes"]
