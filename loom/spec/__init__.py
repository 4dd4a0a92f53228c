"""Speculative decoding: proposers (prompt lookup, a draft model, a lookahead n-gram pool), the
controller that picks each request's speculation length, and the engine-facing speculator."""

from loom.spec.proposer import Draft, Proposer
from loom.spec.registry import (PROPOSERS, Target, check_speculation, make_proposer, make_speculator,
                                proposer_kv_bytes_per_token)
from loom.spec.speculator import SpecStats, Speculator

__all__ = ["Draft", "PROPOSERS", "Proposer", "SpecStats", "Speculator", "Target", "check_speculation", "make_proposer",
           "make_speculator", "proposer_kv_bytes_per_token"]
