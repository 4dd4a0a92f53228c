"""Ordering policies for the waiting queue and for choosing preemption victims.

A policy is a small object the scheduler consults; new policies (priority, fair, SLO) subclass
``SchedulingPolicy`` and register in ``POLICIES`` without touching the step loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from loom.request import Request


class SchedulingPolicy(ABC):
    name: str = ""

    @abstractmethod
    def sort_key(self, req: Request) -> Any:
        """Requests with smaller keys are admitted (and keep running) first."""

    def select_victim(self, candidates: list[Request]) -> Request:
        """The running request to preempt when KV blocks run out: the lowest-priority one
        (largest ``priority`` value), latest arrived among equals."""
        return max(candidates, key=lambda r: (r.priority, r.arrival_time, r.sample_index))

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        """Hook for stateful policies (e.g. per-tenant fairness counters)."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served."""

    name = "fcfs"

    def sort_key(self, req: Request) -> Any:
        return (req.arrival_time, req.sample_index)


POLICIES: dict[str, type[SchedulingPolicy]] = {FCFSPolicy.name: FCFSPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r} (available: {', '.join(POLICIES)})") from None
