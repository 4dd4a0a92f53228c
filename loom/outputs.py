"""What the engine hands back per request: typed, plain data (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one sampled (or prompt) token and its top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    prefill_end_time: float | None = None  # the step that computed the prompt's last chunk ended its forward
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        """First scheduled -> prompt computed (all its chunks, interleaved with other work)."""
        if self.prefill_end_time is None or self.first_scheduled_time is None:
            return None
        return self.prefill_end_time - self.first_scheduled_time

    @property
    def first_token_latency(self) -> float | None:
        """Prompt computed -> first token appended (logits, sampling, bookkeeping)."""
        if self.first_token_time is None or self.prefill_end_time is None:
            return None
        return self.first_token_time - self.prefill_end_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request. ``text``/``token_ids`` are cumulative;
    ``delta_text``/``delta_token_ids`` hold what this step added (for streaming)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
