"""Plans one step: a token budget shared by running decodes first, then prefill chunks (SARATHI).

There is no separate prefill phase: every request has ``num_computed_tokens`` that catches up
with its length, a chunk at a time. When KV blocks run out, the lowest-priority running request
is preempted by recompute: its blocks are freed (they stay in the prefix cache) and it goes back
to the waiting queue with its generated tokens, which are recomputed as part of its prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loom.config import SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.request import Request, RequestStatus
from loom.scheduler.policy import SchedulingPolicy, make_policy


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled after it."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: SchedulingPolicy | None = None) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.config = config
        self.kv = kv
        self.policy = policy or make_policy(config.policy)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """Adopt a request that already holds its blocks (a forked sample of ``n > 1``)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and free its blocks (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- planning ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        key = self.policy.sort_key
        # Decodes first (one token each), then requests still in their prefill.
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, key(r)))
        unscheduled = list(order)
        for req in order:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            unscheduled.remove(req)
            if budget == 0:
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.policy.select_victim(unscheduled + [req])
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
                unscheduled.remove(victim)
            if req.status is not RequestStatus.RUNNING:
                continue
            out.scheduled.append(ScheduledRequest(req, num_new))
            self.policy.on_scheduled(req, num_new)
            budget -= num_new

        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=self.policy.sort_key)
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.match_prefix(req)
            num_computed = len(hits) * self.kv.block_size
            num_new = min(req.num_tokens - num_computed, budget)
            req.num_computed_tokens = num_computed
            if not self.kv.allocate(req, num_new, hits):
                req.num_computed_tokens = 0
                req.block_hashes.clear()
                break
            self.waiting.pop(0)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = num_computed
                req.metrics.num_cached_prompt_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            self.policy.on_scheduled(req, num_new)
            budget -= num_new

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
