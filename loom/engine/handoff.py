"""A running request as it moves between engines: prefill to decode (disaggregation) or one replica
to another (migration).

The KV moves as the contents of the request's full blocks; the target writes them into its own
blocks and its prefix cache (``Engine.import_blocks``), and the request, readmitted there with its
output so far (``Engine.adopt_request``), finds them as a prefix hit. Only the tail that does not
fill a block (fewer than ``block_size`` tokens) is computed again. Blocks can move in stages while
the request keeps running on the source (``start_block``): only the last stage stops it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.outputs import RequestMetrics, TokenLogprob
from loom.request import RequestTags
from loom.sampling import SamplingParams


@dataclass(frozen=True)
class Handoff:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    tags: RequestTags
    output_token_ids: list[int]
    output_logprobs: list[TokenLogprob]
    cumulative_logprob: float
    metrics: RequestMetrics
    num_cached_tokens: int
    # What the source already streamed: the target's deltas start after it.
    sent_chars: int
    sent_tokens: int
    sent_logprobs: int
    block_size: int
    start_block: int  # the first block ``kv`` holds (earlier ones moved in an earlier stage)
    kv: tuple[torch.Tensor, ...]  # per block tensor of the cache: the moved blocks, on the CPU
    layout: tuple[tuple[tuple[int, ...], str], ...]  # per block tensor: one block's shape and dtype
    copy_seconds: float  # copying the blocks out of the cache

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_blocks(self) -> int:
        return self.kv[0].shape[0] if self.kv else 0

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)


def kv_layout(tensors: list[torch.Tensor]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """One block's shape and dtype per block tensor: two caches can trade blocks when equal."""
    return tuple((tuple(t.shape[1:]), str(t.dtype).removeprefix("torch.")) for t in tensors)


def read_blocks(tensors: list[torch.Tensor], block_ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Copies of the blocks ``block_ids`` of each block tensor, on the CPU."""
    if not block_ids:
        return tuple(t.new_empty((0, *t.shape[1:]), device="cpu") for t in tensors)
    index = torch.tensor(block_ids, device=tensors[0].device)
    return tuple(t.index_select(0, index).to("cpu") for t in tensors)


def write_blocks(tensors: list[torch.Tensor], block_ids: list[int], data: tuple[torch.Tensor, ...],
                 rows: list[int]) -> None:
    """Write rows ``rows`` of ``data`` (per block tensor) into blocks ``block_ids``."""
    if not block_ids:
        return
    index = torch.tensor(block_ids, device=tensors[0].device)
    pick = torch.tensor(rows)
    for t, d in zip(tensors, data, strict=True):
        t.index_copy_(0, index, d.index_select(0, pick).to(t.device))
