"""A request as the scheduler and engine see it: token ids, progress, timestamps. No tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loom.outputs import RequestMetrics, TokenLogprob

if TYPE_CHECKING:
    from loom.sampling import SamplingParams
    from loom.structured import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestTags:
    """What a request tells the scheduler beyond its tokens: ``priority`` (lower is more important),
    ``tenant`` and ``slo_class`` for the scheduling policy, ``session_id`` for multi-turn KV pins."""

    priority: int = 0
    tenant: str | None = None
    slo_class: str | None = None
    session_id: str | None = None


@dataclass(eq=False)
class Request:
    """One sequence being generated. A user request with ``n > 1`` becomes ``n`` of these
    (same ``group_id``, different ``sample_index``) that share the prompt's KV blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: "SamplingParams"
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower value = more important (as in vLLM)
    tenant: str | None = None
    slo_class: str | None = None  # the slo policy's class (None: its default class)
    session_id: str | None = None  # turns of one conversation: the KV of the last one stays pinned a while
    group_id: str = ""
    sample_index: int = 0
    max_total_tokens: int = 0  # prompt + output cap (from max_tokens and the context length)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0  # sum of ``output_logprobs`` (kept when the sampler computes them)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache on first admission
    num_served_prompt_tokens: int = 0  # prompt positions computed so far, recomputes not counted again
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of this request's full blocks
    residual_slot: int = -1  # its full-precision residual, with a KIVI cache (while it holds blocks)
    # Swapped out (preempted by swapping): the tokens whose KV sits in the swap tier, and while it is
    # swapped back in, the saved blocks still to copy.
    num_swapped_tokens: int = 0
    swap_in_pending: int = 0
    # Speculative tokens a proposer guessed to follow this request's tokens; the next step
    # verifies them (then they are cleared). A tree of drafts also has each one's parent among
    # them (-1: the request's last token); empty for a chain.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_parents: list[int] = field(default_factory=list)
    # Samples 1..n-1 of an ``n > 1`` request, waiting to fork from this one when its prompt is done.
    forks: list["Request"] = field(default_factory=list)
    seed: int | None = None  # a seeded sample's (loom.sampling.sample_seed)
    grammar: "GrammarState | None" = None  # structured output: advances with each accepted token
    # An embedding request: computes its prompt only and sums the final hidden states of every
    # prompt position into ``hidden_sum`` (never served from the prefix cache).
    embed: bool = False
    hidden_sum: list[float] = field(default_factory=list)
    # A request moved here from another engine: (its full blocks, the tokens in its partial last
    # block, that block's contents per block tensor), written in place of computing those tokens
    # when its full blocks are found in the prefix cache on admission.
    adopted_tail: tuple[int, int, tuple] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if not self.group_id:
            self.group_id = self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
