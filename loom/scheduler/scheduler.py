"""Plans each step and owns every change to a request's progress.

``schedule()`` spends a token budget on running decodes first, then on prefill chunks (SARATHI).
There is no separate prefill phase: every request has ``num_computed_tokens`` that catches up
with its length, a chunk at a time. A decode may carry draft tokens to verify. When KV blocks
run out, the policy's victim is preempted by recompute: its blocks are freed (full ones stay in
the prefix cache) and it goes back to the waiting queue with its generated tokens.

``update(plan, result)`` applies what the worker computed: it advances computed tokens, rolls
back the KV of rejected drafts, caches full blocks of accepted tokens, appends tokens with their
token-level stop checks, forks the samples of ``n > 1`` requests, and frees finished requests.
"""

from __future__ import annotations

import itertools
import time

from loom.config import SchedulerConfig
from loom.kvcache import KVCacheManager
from loom.kvcache.manager import cdiv
from loom.request import Request, RequestStatus
from loom.scheduler.policy import QueueState, SchedulingPolicy
from loom.scheduler.registry import policy_from_config
from loom.scheduler.sessions import SessionTTL
from loom.scheduler.stopping import token_stop
from loom.step import RequestResult, ScheduledRequest, StepPlan, StepResult, SwapIn, SwitchCosts

_NOTHING = RequestResult()


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        eos_token_ids: tuple[int, ...] = (),
        policy: SchedulingPolicy | None = None,
        switch: SwitchCosts | None = None,
        sessions: SessionTTL | None = None,
    ) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.config = config
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.policy = policy or policy_from_config(config)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        # The swap tier (None: every preemption recomputes).
        self.switch = switch
        self.swap_free_blocks = switch.swap_capacity_blocks if switch else 0
        self.num_swap_preemptions = 0
        self._swap_drops: list[str] = []  # host copies of finished requests, for the next plan
        # Multi-turn pins (None: a finished turn's blocks go straight to the LRU prefix cache).
        self.sessions = sessions
        self.session_followups = 0  # turns of a session that had finished a turn before
        self.pinned_hits = 0  # of those, turns admitted while their session's pin held
        # Prefix-cache effect, counted once per request at its first admission.
        self.prompt_tokens_admitted = 0
        self.prompt_tokens_cached = 0
        self._block_copies: list[tuple[int, int]] = []  # for the next plan (forks)
        self._slot_copies: list[tuple[int, int]] = []

    # -- queue management -------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """ValueError for a request the policy cannot serve (an unknown tenant), before it is added."""
        self.policy.check_request(req)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        now = time.monotonic()
        if self.sessions is not None and req.session_id is not None and req.sample_index == 0:
            self.session_followups += self.sessions.on_arrival(req.session_id, now)
        self.policy.on_arrival(req, now)

    def finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """End a request (stop, length or abort): out of the queues, blocks freed."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.sessions is not None and req.session_id is not None and req.sample_index == 0 and reason != "abort":
            self.kv.pin(req, req.session_id, self.sessions.on_finish(req.session_id, time.monotonic()))
        else:
            self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.metrics.finished_time = time.monotonic()
        if req.num_swapped_tokens:
            self._release_swap(req)
            self._swap_drops.append(req.request_id)
        self.policy.on_finished(req)

    # -- planning ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(block_copies=self._block_copies, slot_copies=self._slot_copies, swap_drop=self._swap_drops)
        self._block_copies, self._slot_copies, self._swap_drops = [], [], []
        now = time.monotonic()
        if self.kv.pins:
            self.kv.expire_pins(now)
        head = self._preempt_for_waiting(plan, now) if self.policy.preemptive and self.waiting else None
        budget = self.config.max_num_batched_tokens
        # Decodes first, then requests still in their prefill.
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, self.policy.sort_key(r, now)))
        unscheduled = list(order)
        short_of_blocks = False
        for req in order:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            unscheduled.remove(req)
            if req.swap_in_pending:
                self._swap_in_step(plan, req)
                continue
            if budget == 0:
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new > 1 and self._outranked(req, head, now):
                continue
            room = min(budget - 1, self.kv.max_drafts(req.num_computed_tokens + num_new)) if num_new == 1 else 0
            drafts = tuple(req.draft_token_ids[:room])
            while not self.kv.allocate(req, req.num_computed_tokens + num_new + len(drafts)):
                short_of_blocks = True
                victim = self.policy.select_victim(unscheduled + [req], now)
                self._preempt(victim, plan)
                plan.preempted.append(victim)
                if victim is req:
                    break
                unscheduled.remove(victim)
            if req.status is not RequestStatus.RUNNING:
                continue
            plan.scheduled.append(self._scheduled(req, num_new, drafts, tuple(req.draft_parents[: len(drafts)])))
            budget -= num_new + len(drafts)
        if not short_of_blocks:
            self._admit(plan, budget, now)
        return plan

    def prefill_backlog(self) -> int:
        """Prompt tokens the next step could take beside its decodes: what running requests have
        left of their prefill, and the uncached prompts of waiting requests for the free seats (an
        estimate, for speculation's controller: the policy picks which wait)."""
        running = sum(r.num_tokens - r.num_computed_tokens for r in self.running
                      if r.num_tokens - r.num_computed_tokens > 1)
        seats = max(self.config.max_num_seqs - len(self.running), 0)
        waiting = itertools.islice((r for r in self.waiting if not r.num_swapped_tokens), seats)
        return running + sum(r.num_tokens - self.kv.cached_prefix_tokens(r) for r in waiting)

    def _queue_state(self, now: float) -> QueueState:
        bs = self.kv.block_size
        return QueueState(now, self.running, self.kv.num_blocks * bs, bs, self.kv.cached_prefix_tokens)

    def _outranked(self, req: Request, head: Request | None, now: float) -> bool:
        """Whether a preemptive policy holds back ``req``'s prefill chunk this step: a more important
        request is waiting or still in its prefill, and a short step gets its first token out sooner
        (decodes, one token each, always go)."""
        if not self.policy.preemptive:
            return False
        key = self.policy.sort_key(req, now)
        if head is not None and self.policy.preempts(head, req, now):
            return True
        return any(r is not req and r.num_tokens - r.num_computed_tokens > 1 and self.policy.sort_key(r, now) < key
                   and self.policy.preempts(r, req, now) for r in self.running)

    def _preempt_for_waiting(self, plan: StepPlan, now: float) -> Request | None:
        """A preemptive policy's next waiting request takes seats and blocks from running requests
        it outranks, until it fits (its first chunk, beside the running decodes' next tokens).
        Returns that request."""
        head = self.policy.next_request(self.waiting, self._queue_state(now))
        while head is not None and self.running and not self._fits(head):
            victim = self.policy.select_victim(self.running, now)
            if not self.policy.preempts(head, victim, now):
                break
            self._preempt(victim, plan)
            plan.preempted.append(victim)
        return head

    def _fits(self, req: Request) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        bs = self.kv.block_size
        cached = self.kv.cached_prefix_tokens(req)
        first_chunk = min(req.num_tokens, cached + self.config.max_num_batched_tokens)
        return self._fits_beside_running(cdiv(first_chunk, bs) - cached // bs)

    def _fits_beside_running(self, blocks: int) -> bool:
        """Whether ``blocks`` more are free beside those the running requests need for their next token."""
        growth = sum(self.kv.blocks_needed(r, r.num_computed_tokens + 1) for r in self.running)
        return blocks + growth <= self.kv.num_free_blocks

    def _scheduled(self, req: Request, num_new: int, drafts: tuple[int, ...] = (),
                   parents: tuple[int, ...] = ()) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        sample = end == req.num_tokens and req.params.max_tokens != 0
        if all(p == i - 1 for i, p in enumerate(parents)):
            parents = ()  # a chain (a tree cut down to its first branch's start)
        prompt_end = min(end, req.num_prompt_tokens)
        new_prompt = max(0, prompt_end - max(start, req.num_served_prompt_tokens))
        req.num_served_prompt_tokens = max(req.num_served_prompt_tokens, prompt_end)
        self.policy.on_scheduled(req, new_prompt, int(sample))
        return ScheduledRequest(req, start, num_new, sample, drafts, tuple(req.forks) if sample else (), parents)

    def _admit(self, plan: StepPlan, budget: int, now: float) -> None:
        state = self._queue_state(now)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.policy.next_request(self.waiting, state)
            if req is None:
                break
            if req.num_swapped_tokens:
                if not self._swap_in(plan, req):
                    break
                continue
            hits = self.kv.match_prefix(req)
            num_computed = len(hits) * self.kv.block_size
            tail = req.adopted_tail
            if tail is not None and (len(hits) != tail[0] or num_computed + tail[1] >= req.num_tokens):
                tail = None  # its blocks were evicted meanwhile: the tail is computed again
            if tail is not None:
                num_computed += tail[1]
            num_new = min(req.num_tokens - num_computed, budget)
            if not self.kv.allocate(req, num_computed + num_new, hits):
                req.block_hashes.clear()
                break
            if tail is not None:
                plan.block_writes.append((req.block_ids[len(hits)], tail[2]))
            req.adopted_tail = None
            self.waiting.remove(req)
            if req.session_id is not None and self.kv.unpin(req.session_id):
                self.pinned_hits += 1  # the pin's blocks are this request's now (the hits took them)
            req.num_computed_tokens = num_computed
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = req.metrics.num_cached_prompt_tokens = num_computed
                self.prompt_tokens_admitted += req.num_prompt_tokens
                self.prompt_tokens_cached += num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        """Take ``req``'s blocks and requeue it: swapped out where the swap tier has room and the
        cost model prefers it, else to be recomputed (its full blocks stay in the prefix cache)."""
        self.running.remove(req)
        if self._swap_out(req, plan):
            self.num_swap_preemptions += 1
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.draft_token_ids.clear()
        req.draft_parents.clear()
        req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)

    # -- the swap tier --------------------------------------------------------------------------
    def _swap_out(self, req: Request, plan: StepPlan) -> bool:
        if req.num_swapped_tokens:  # preempted while swapping back in: the host copy is still whole
            req.swap_in_pending = 0
            return True
        n = cdiv(req.num_computed_tokens, self.kv.block_size)
        s = self.switch
        if s is None or n == 0 or n > self.swap_free_blocks or not s.prefers_swap(n, req.num_computed_tokens):
            return False
        plan.swap_out.append((req.request_id, req.block_ids[:n]))
        self.swap_free_blocks -= n
        req.num_swapped_tokens = req.num_computed_tokens
        return True

    def _swap_in(self, plan: StepPlan, req: Request) -> bool:
        """Readmit a swapped-out request: its blocks now, their contents a group per step. Only when the
        running requests' next tokens still fit beside it: a swap-in the next step must undo costs twice."""
        needed = self.kv.blocks_needed(req, req.num_swapped_tokens + 1)  # and room for its own next token
        if not self._fits_beside_running(needed) or not self.kv.allocate(req, req.num_swapped_tokens):
            return False
        self.waiting.remove(req)
        req.num_computed_tokens = req.num_swapped_tokens
        req.swap_in_pending = cdiv(req.num_swapped_tokens, self.kv.block_size)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._swap_in_step(plan, req)
        return True

    def _swap_in_step(self, plan: StepPlan, req: Request) -> None:
        n = cdiv(req.num_swapped_tokens, self.kv.block_size)
        start = n - req.swap_in_pending
        take = min(req.swap_in_pending, self.switch.blocks_per_step)
        req.swap_in_pending -= take
        last = req.swap_in_pending == 0
        plan.swap_in.append(SwapIn(req.request_id, tuple(req.block_ids[start : start + take]), start, last))
        if last:
            self._release_swap(req)

    def _release_swap(self, req: Request) -> None:
        self.swap_free_blocks += cdiv(req.num_swapped_tokens, self.kv.block_size)
        req.num_swapped_tokens = req.swap_in_pending = 0

    def observe_step(self, plan: StepPlan, seconds: float) -> None:
        """Tell the policy what the step cost (policies that predict time use it)."""
        if not self.policy.observes_steps:
            return
        num_tokens = sum(s.num_query_tokens for s in plan.scheduled)
        num_decodes = sum(1 for s in plan.scheduled if s.num_query_tokens == 1)
        self.policy.on_step(num_tokens, num_decodes, seconds)

    # -- applying a step's results ------------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply ``result`` to the requests of ``plan``. Returns the requests that got tokens or
        finished (forked samples included), in plan order."""
        changed: list[Request] = []
        for s in plan.scheduled:
            req = s.request
            res = result.results.get(req.request_id, _NOTHING)
            if res.prompt_logprobs:
                if s.start == 0:
                    req.prompt_logprobs = [None]  # the first token has no context
                req.prompt_logprobs.extend(res.prompt_logprobs)
            if res.hidden_sum:  # a recompute after preemption starts over
                prev = req.hidden_sum if s.start else [0.0] * len(res.hidden_sum)
                req.hidden_sum = [a + b for a, b in zip(prev, res.hidden_sum)]
            accepted_drafts = max(len(res.token_ids) - 1, 0) if s.draft_token_ids else 0
            req.num_computed_tokens = s.end + accepted_drafts
            if s.draft_token_ids:
                req.draft_token_ids.clear()
                req.draft_parents.clear()
                self.kv.truncate(req, req.num_computed_tokens)
            self.kv.cache_full_blocks(req)
            if req.metrics.prefill_end_time is None and req.num_computed_tokens >= req.num_prompt_tokens:
                req.metrics.prefill_end_time = result.forward_end_time
            if s.sample:
                for child in s.forks:  # before the parent's token, which may finish it
                    self._fork(req, child, result.results.get(child.request_id, _NOTHING))
                req.forks.clear()
                self._append(req, res)
                changed += [req, *s.forks]
            elif req.num_computed_tokens == req.num_tokens and req.params.max_tokens == 0:
                self.finish(req, "length")  # prompt logprobs or an embedding only
                changed.append(req)
        return changed

    def _append(self, req: Request, res: RequestResult) -> None:
        """Append accepted tokens one by one; a token-level stop drops the ones after it."""
        for i, token in enumerate(res.token_ids):
            req.output_token_ids.append(token)
            if req.grammar is not None:
                req.grammar.accept(token)
            if res.logprobs:
                req.output_logprobs.append(res.logprobs[i])
                req.cumulative_logprob += res.logprobs[i].logprob
            stop = token_stop(req, self.eos_token_ids)
            if stop is not None:
                self.finish(req, *stop)
                break
        now = time.monotonic()
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now

    def _fork(self, parent: Request, child: Request, res: RequestResult) -> None:
        """Give ``child`` the parent's prompt blocks (copying the partial last one) and its own
        first token. Without a free block for the copy it recomputes the prompt on its own."""
        child.metrics.first_scheduled_time = parent.metrics.first_scheduled_time
        child.metrics.prefill_end_time = parent.metrics.prefill_end_time
        child.num_cached_tokens = parent.num_cached_tokens
        try:
            copies = self.kv.fork(parent, child)
        except MemoryError:
            self.add(child)
        else:
            if copies.block is not None:
                self._block_copies.append(copies.block)
            if copies.slot is not None:
                self._slot_copies.append(copies.slot)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = RequestStatus.RUNNING
            self.running.append(child)
            self.policy.on_arrival(child, time.monotonic())
        self._append(child, res)
