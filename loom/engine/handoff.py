"""A running request as it moves between engines: prefill to decode (disaggregation) or one replica
to another (migration).

The KV moves as the contents of the request's full blocks; the target writes them into its own
blocks and its prefix cache (``Engine.import_blocks``), and the request, readmitted there with its
output so far (``Engine.adopt_request``), finds them as a prefix hit. The last stage also carries
the partial last block, which is written into the request's own block on admission, so nothing is
computed again and the next step is the decode step the source would have run. Blocks can move in
stages while the request keeps running on the source (``start_block``): only the last stage stops
it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from loom.outputs import RequestMetrics, TokenLogprob
from loom.request import RequestTags
from loom.sampling import SamplingParams


CLOCK_TOLERANCE = 0.01  # seconds: clock offsets closer than this are one machine's (no shift)


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
    kv: tuple[np.ndarray, ...]  # per block tensor of the cache: the moved blocks' bytes (``read_blocks``)
    layout: tuple[tuple[tuple[int, ...], str], ...]  # per block tensor: one block's shape and dtype
    copy_seconds: float  # copying the blocks out of the cache
    num_computed_tokens: int  # tokens whose KV the source held
    clock_offset: float  # the source's time.monotonic() - time.time() at export (``metrics`` are on its clock)
    tail: tuple[np.ndarray, ...] | None  # the last stage's partial last block, whole (None: none)

    def local_metrics(self) -> RequestMetrics:
        """``metrics`` on this process's monotonic clock: shifted by the difference of the two
        machines' monotonic-to-wall offsets (wall clocks agree across machines, monotonic ones do
        not); unshifted on the source's machine."""
        shift = (time.monotonic() - time.time()) - self.clock_offset
        if abs(shift) < CLOCK_TOLERANCE:
            return dataclasses.replace(self.metrics)
        return dataclasses.replace(self.metrics, **{f.name: getattr(self.metrics, f.name) + shift
                                                    for f in dataclasses.fields(RequestMetrics)
                                                    if f.name.endswith("time") and getattr(self.metrics, f.name) is not None})

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_blocks(self) -> int:
        return self.kv[0].shape[0] if self.kv else 0

    @property
    def kv_bytes(self) -> int:
        return sum(a.nbytes for a in (*self.kv, *(self.tail or ())))
