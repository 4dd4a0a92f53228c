"""The messages of one engine step, shared by the scheduler and the model worker (which never
import each other): the plan of what to compute, and the plain results that come back.

No tensors cross this boundary: the worker turns a ``StepPlan`` into tensors, runs the model
and the sampler, and answers with token ids and logprobs only."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.outputs import TokenLogprob
from loom.request import Request


DECODE_ROWS_CHUNK = 4  # chunks up to this many tokens are served as decode rows


def tree_depths(parents: tuple[int, ...] | list[int]) -> list[int]:
    """Each draft's depth in a tree given by its parents (-1: the last known token, depth 0)."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 + (depths[p] if p >= 0 else 0))
    return depths


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step, fixed when it is scheduled.

    The step computes the request's tokens ``[start, start + num_new_tokens)`` followed by
    ``draft_token_ids`` (speculative tokens to verify; ``draft_parents``, when not empty, makes
    them a tree: each token's parent among them, -1 for the last known token). With ``sample``
    set, the worker returns the next token after them; with drafts, it returns every accepted
    draft (of one branch) plus one more token.
    ``forks`` are the other samples of an ``n > 1`` request: they get their first token from
    this step's logits and then share the prompt's blocks."""

    request: Request
    start: int
    num_new_tokens: int
    sample: bool
    draft_token_ids: tuple[int, ...] = ()
    forks: tuple[Request, ...] = ()
    draft_parents: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        """Tokens of the request in the KV cache after this step if every draft is rejected."""
        return self.start + self.num_new_tokens

    @property
    def num_query_tokens(self) -> int:
        return self.num_new_tokens + len(self.draft_token_ids)

    @property
    def decode_rows(self) -> bool:
        """Served as rows of the paged decode path (each row attends to its sequence up to itself):
        a decode with a chain of drafts, or a chunk of at most ``DECODE_ROWS_CHUNK`` tokens (a draft
        model catching up, a prompt's tail after a prefix hit), which would otherwise be a chunk of
        its own through SDPA and keep the step off the fused decode stack."""
        return self.num_new_tokens <= DECODE_ROWS_CHUNK and not self.draft_parents

    @property
    def is_decode(self) -> bool:
        """One known token (plus a chain of drafts): served by the paged decode kernel, not as a
        prefill chunk (a tree of drafts is a chunk with a tree mask)."""
        return self.num_new_tokens == 1 and not self.draft_parents


@dataclass(frozen=True)
class SwapIn:
    """Saved blocks ``start .. start + len(block_ids)`` of a swapped-out request, to copy back into
    ``block_ids`` before the forward pass; ``last``: the host copy can go."""

    request_id: str
    block_ids: tuple[int, ...]
    start: int
    last: bool


@dataclass(frozen=True)
class SwitchCosts:
    """What a context switch costs either way, measured by the worker at start-up: the scheduler's
    cost model for choosing swap or recompute per victim."""

    swap_seconds_per_block: float  # copied out and back in
    recompute_seconds_per_token: float  # a prefill chunk's forward pass, per token
    swap_capacity_blocks: int
    mode: str = "auto"  # auto | swap (always, while there is room)
    blocks_per_step: int = 32  # swapped back in per step

    def prefers_swap(self, num_blocks: int, num_tokens: int) -> bool:
        if self.mode == "swap":
            return True
        return num_blocks * self.swap_seconds_per_block < num_tokens * self.recompute_seconds_per_token


@dataclass
class StepPlan:
    """What one forward pass computes: decodes first, then prefill chunks (SARATHI)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # KV blocks to copy before the forward pass: the partial last block of a forked sample (with
    # a KIVI cache, its residual slot instead).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    slot_copies: list[tuple[int, int]] = field(default_factory=list)
    # The swap tier, before the forward pass in this order: save the blocks of requests swapped out
    # this step (request id, blocks), forget host copies of requests that finished while swapped out,
    # copy saved blocks back in.
    swap_out: list[tuple[str, list[int]]] = field(default_factory=list)
    swap_drop: list[str] = field(default_factory=list)
    swap_in: list[SwapIn] = field(default_factory=list)
    # Whole blocks to write before the forward pass: (block, its contents per block tensor), the
    # partial last block of a request moved here from another engine (``loom.engine.handoff``).
    block_writes: list[tuple[int, tuple]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.scheduled or self.swap_out or self.swap_in or self.swap_drop)


@dataclass(frozen=True)
class RequestResult:
    """What the worker computed for one request (or fork) of the plan.

    ``token_ids`` are the tokens to append: empty for a prefill chunk that does not reach the
    end of the sequence, one token for a plain decode, and ``1 + accepted drafts`` when drafts
    were verified. ``prompt_logprobs`` covers the prompt positions this step computed (position
    ``i`` scores prompt token ``i + 1``). ``hidden_sum`` (embedding requests) is the sum of the
    final hidden states of the prompt positions this step computed."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    hidden_sum: tuple[float, ...] = ()


@dataclass(frozen=True)
class StepResult:
    """Per request id (including forks), what the step produced."""

    results: dict[str, RequestResult]
    forward_end_time: float  # time.monotonic() when the forward pass ended (before sampling)
