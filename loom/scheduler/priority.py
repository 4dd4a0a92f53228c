"""Priority scheduling (QLLM, vLLM's ``--scheduling-policy priority``) with aging.

Lower ``priority`` values are more important. The waiting queue is ordered by ``(priority,
arrival)``; a waiting request that is strictly more important than the least important running one
preempts it when seats or KV blocks are short. With ``aging_seconds``, every that many seconds of
waiting (since arrival) make a request one level more important, so best-effort work is never
starved forever: after ``(p - q) * aging_seconds`` it ranks with priority-``q`` arrivals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loom.request import Request
from loom.scheduler.policy import SchedulingPolicy


@dataclass(frozen=True)
class PriorityOptions:
    aging_seconds: float | None = None  # None: no aging
    preempt: bool = True  # False: priority orders the queue but never preempts running work

    def __post_init__(self) -> None:
        if self.aging_seconds is not None and not (self.aging_seconds > 0 and math.isfinite(self.aging_seconds)):
            raise ValueError(f"priority policy option aging_seconds must be a finite number > 0, got {self.aging_seconds}")


class PriorityPolicy(SchedulingPolicy):
    name = "priority"
    Options = PriorityOptions
    preemptive = True

    def effective_priority(self, req: Request, now: float) -> float:
        aging = self.options.aging_seconds
        if aging is None:
            return req.priority
        return req.priority - math.floor(max(now - req.arrival_time, 0.0) / aging)

    def sort_key(self, req: Request, now: float) -> Any:
        return (self.effective_priority(req, now), req.arrival_time, req.sample_index)

    def select_victim(self, candidates: list[Request], now: float) -> Request:
        return max(candidates, key=lambda r: self.sort_key(r, now))

    def preempts(self, candidate: Request, victim: Request, now: float) -> bool:
        return self.options.preempt and self.effective_priority(candidate, now) < self.effective_priority(victim, now)
