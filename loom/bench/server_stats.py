"""What the server under test says about itself during a run, from its Prometheus ``/metrics``: the
peak number of running requests, the peak KV cache usage and the preemptions during the run. loom's
and vLLM's metric names are known; a server that exports neither (llama.cpp) yields no figures."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

RUNNING = ("loom_num_requests_running", "vllm:num_requests_running")
KV_USAGE = ("loom_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc")  # both a fraction of 1
PREEMPTIONS = ("loom_num_preemptions_total", "vllm:num_preemptions_total")
PREFIX_HIT_TOKENS = ("loom_prefix_cache_hit_tokens_total",)
PROMPT_TOKENS = ("loom_prompt_tokens_total",)
DRAFT_TOKENS = ("loom_spec_draft_tokens_total", "vllm:spec_decode_num_draft_tokens_total")
ACCEPTED_TOKENS = ("loom_spec_accepted_tokens_total", "vllm:spec_decode_num_accepted_tokens_total")
VERIFICATIONS = ("loom_spec_verifications_total", "vllm:spec_decode_num_drafts_total")
INTERVAL = 0.25  # seconds between scrapes


def scrape_values(text: str) -> dict[str, float]:
    """Each sample name of a Prometheus text page with its value, summed over label sets."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def first_of(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((values[n] for n in names if n in values), None)


@dataclass
class ServerStats:
    scrapes: int = 0
    peak_running: float | None = None
    peak_kv_usage: float | None = None
    preemptions: float | None = None  # during the run: the last scrape's count less the first's
    prefix_cache_hit_rate: float | None = None  # prompt tokens served from the prefix cache during the run
    # Speculative decoding during the run: accepted / verified drafts, accepted drafts per verification.
    spec_acceptance_rate: float | None = None
    spec_mean_accepted: float | None = None
    spec_draft_tokens: float | None = None
    _first: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, float]) -> None:
        self.scrapes += 1
        running, usage, preempted = (first_of(values, n) for n in (RUNNING, KV_USAGE, PREEMPTIONS))
        if running is not None:
            self.peak_running = max(running, self.peak_running or 0.0)
        if usage is not None:
            self.peak_kv_usage = max(usage, self.peak_kv_usage or 0.0)
        if preempted is not None:
            self.preemptions = preempted - self._first.setdefault("preemptions", preempted)
        hits, prompt = first_of(values, PREFIX_HIT_TOKENS), first_of(values, PROMPT_TOKENS)
        if hits is not None and prompt is not None:
            prompt_delta = prompt - self._first.setdefault("prompt", prompt)
            hit_delta = hits - self._first.setdefault("hits", hits)
            self.prefix_cache_hit_rate = hit_delta / prompt_delta if prompt_delta > 0 else None
        drafts, accepted, verified = (first_of(values, n) for n in (DRAFT_TOKENS, ACCEPTED_TOKENS, VERIFICATIONS))
        if drafts is not None and accepted is not None and verified is not None:
            self.spec_draft_tokens = drafts - self._first.setdefault("drafts", drafts)
            accepted_delta = accepted - self._first.setdefault("accepted", accepted)
            verified_delta = verified - self._first.setdefault("verified", verified)
            self.spec_acceptance_rate = accepted_delta / self.spec_draft_tokens if self.spec_draft_tokens else None
            self.spec_mean_accepted = accepted_delta / verified_delta if verified_delta else None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


async def sample(base_url: str, headers: dict[str, str], stop: asyncio.Event) -> ServerStats:
    """Scrape ``base_url/metrics`` every ``INTERVAL`` seconds until ``stop`` is set, and once more then.
    A server without ``/metrics`` (or with unknown names) leaves the figures None."""
    stats = ServerStats()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10.0) as client:
        while True:
            try:
                r = await client.get("/metrics")
                if r.status_code == 200:
                    stats.add(scrape_values(r.text))
            except (httpx.HTTPError, ValueError):
                pass  # no metrics endpoint, or one that is not Prometheus text: no figures
            if stop.is_set():
                return stats
            try:
                await asyncio.wait_for(stop.wait(), INTERVAL)
            except TimeoutError:
                pass
