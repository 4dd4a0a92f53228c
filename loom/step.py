"""The messages of one engine step, shared by the scheduler and the model worker (which never
import each other): the plan of what to compute, and the plain results that come back.

No tensors cross this boundary: the worker turns a ``StepPlan`` into tensors, runs the model
and the sampler, and answers with token ids and logprobs only."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.outputs import TokenLogprob
from loom.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step, fixed when it is scheduled.

    The step computes the request's tokens ``[start, start + num_new_tokens)`` followed by
    ``draft_token_ids`` (speculative tokens to verify). With ``sample`` set, the worker returns
    the next token after them; with drafts, it returns every accepted draft plus one more token.
    ``forks`` are the other samples of an ``n > 1`` request: they get their first token from
    this step's logits and then share the prompt's blocks."""

    request: Request
    start: int
    num_new_tokens: int
    sample: bool
    draft_token_ids: tuple[int, ...] = ()
    forks: tuple[Request, ...] = ()

    @property
    def end(self) -> int:
        """Tokens of the request in the KV cache after this step if every draft is rejected."""
        return self.start + self.num_new_tokens

    @property
    def num_query_tokens(self) -> int:
        return self.num_new_tokens + len(self.draft_token_ids)

    @property
    def is_decode(self) -> bool:
        """One known token (plus drafts): served by the paged decode kernel, not as a prefill chunk."""
        return self.num_new_tokens == 1


@dataclass
class StepPlan:
    """What one forward pass computes: decodes first, then prefill chunks (SARATHI)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # KV blocks to copy before the forward pass: the partial last block of a forked sample (with
    # a KIVI cache, its residual slot instead).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    slot_copies: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


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
