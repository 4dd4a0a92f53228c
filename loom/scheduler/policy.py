"""The seam between the step planner and its ordering policies.

A policy is a small object the scheduler consults: which waiting request to admit next, how to rank
running requests for the step's token budget, whom to preempt, and (for stateful policies) what
service each tenant received. Policies register in ``loom.scheduler.registry.POLICIES``; none of
them touches the step loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from loom.request import Request


@dataclass(frozen=True)
class NoOptions:
    """A policy without options."""


@dataclass(frozen=True)
class QueueState:
    """What a policy may read about the scheduler when it picks a request (read-only).

    ``cached_tokens(req)``: prompt tokens of ``req`` the prefix cache holds now (no side effects)."""

    now: float
    running: Sequence[Request]
    capacity_tokens: int  # tokens the whole KV cache holds
    block_size: int
    cached_tokens: Callable[[Request], int]


def tenant_of(req: Request) -> str:
    """The tenant a request is accounted to; requests without one share the tenant ``""``."""
    return req.tenant or ""


class SchedulingPolicy(ABC):
    """Subclasses set ``name``, may declare a frozen ``Options`` dataclass (validated in its
    ``__post_init__``) and take ``tenant_weights`` when ``uses_tenant_weights``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    uses_tenant_weights: ClassVar[bool] = False
    # True: a waiting request may preempt running ones (``preempts``) when seats or blocks are short.
    preemptive: ClassVar[bool] = False
    # True: ``on_step`` is told each step's cost (the scheduler skips counting it otherwise).
    observes_steps: ClassVar[bool] = False

    def __init__(self, options: Any = None, tenant_weights: dict[str, float] | None = None) -> None:
        self.options = options if options is not None else self.Options()
        if tenant_weights is not None and not self.uses_tenant_weights:
            raise ValueError(f"tenant weights are used by the vtc and dlpm policies, not {self.name}")
        self.tenant_weights = tenant_weights

    @abstractmethod
    def sort_key(self, req: Request, now: float) -> Any:
        """Requests with smaller keys go first: in admission (by default) and in the running
        batch's share of the token budget."""

    def next_request(self, waiting: Sequence[Request], state: QueueState) -> Request | None:
        """The waiting request to admit next, or None to admit nothing more this step. Called again
        after each admission, so a stateful policy sees the service it just granted."""
        return min(waiting, key=lambda r: self.sort_key(r, state.now), default=None)

    def select_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """The running request to preempt when KV blocks run out: the lowest-priority one
        (largest ``priority`` value), latest arrived among equals."""
        return max(candidates, key=lambda r: (r.priority, r.arrival_time, r.sample_index))

    def preempts(self, candidate: Request, victim: Request, now: float) -> bool:
        """Whether waiting ``candidate`` may preempt running ``victim`` (``preemptive`` policies)."""
        return False

    def check_request(self, req: Request) -> None:
        """ValueError for a request this policy cannot serve (an unknown tenant)."""
        if self.tenant_weights is not None and tenant_of(req) not in self.tenant_weights and "*" not in self.tenant_weights:
            known = ", ".join(repr(t) for t in sorted(self.tenant_weights)[:20])
            raise ValueError(f"unknown tenant {tenant_of(req)!r}: the tenant weights name {known} and no '*' default")

    def share(self, tenant: str) -> float:
        """A tenant's weight: from the tenant weights (``"*"`` for unnamed tenants), else 1."""
        weights = self.tenant_weights or {}
        return weights.get(tenant, weights.get("*", 1.0))

    # -- hooks for stateful policies -----------------------------------------------------------
    def on_arrival(self, req: Request, now: float) -> None:
        """A request joined the waiting queue (or a fork started running)."""

    def on_scheduled(self, req: Request, prompt_tokens: int, output_tokens: int) -> None:
        """``req`` got a share of this step: ``prompt_tokens`` prompt positions computed for the
        first time and ``output_tokens`` tokens to sample."""

    def on_finished(self, req: Request) -> None:
        """``req`` finished (stop, length or abort)."""

    def on_step(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        """A step computed ``num_tokens`` tokens, ``num_decodes`` of them single-token decodes, in
        ``seconds`` (its forward pass and sampling)."""

    def slo_report(self) -> dict[str, tuple[int, int]]:
        """Per SLO class: requests finished and how many met their targets (policies with classes)."""
        return {}


class FCFSPolicy(SchedulingPolicy):
    """First come, first served."""

    name = "fcfs"

    def sort_key(self, req: Request, now: float) -> Any:
        return (req.arrival_time, req.sample_index)
