"""A user request's state outside the scheduler: its ``n`` samples, their detokenizers and stop
matchers, and what has been streamed so far."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.outputs import CompletionOutput, RequestOutput, TokenLogprob
from loom.request import Request
from loom.sampling import SamplingParams
from loom.sampling.stop import StopStringMatcher
from loom.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(eq=False)
class SampleState:
    request: Request
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    text: str = ""
    num_detokenized: int = 0  # output tokens already fed to ``detok``
    sent_chars: int = 0  # characters already handed out as deltas
    sent_tokens: int = 0
    sent_logprobs: int = 0


@dataclass(eq=False)
class RequestGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    samples: list[SampleState] = field(default_factory=list)

    def new_sample(self, request: Request) -> SampleState:
        s = SampleState(
            request=request,
            detok=IncrementalDetokenizer(self.tokenizer, self.params.skip_special_tokens),
            stop=StopStringMatcher(self.params.stop, self.params.include_stop_str_in_output),
        )
        self.samples.append(s)
        return s

    @property
    def finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.request.is_finished for s in self.samples)

    def output(self) -> RequestOutput:
        """Cumulative outputs plus the deltas since the previous call."""
        outs = []
        for i, s in enumerate(self.samples):
            r = s.request
            done = r.is_finished
            visible = len(s.text) if done else len(s.text) - s.stop.holdback(s.text)
            visible = max(visible, s.sent_chars)
            want_lp = self.params.logprobs is not None
            outs.append(
                CompletionOutput(
                    index=i,
                    text=s.text,
                    token_ids=list(r.output_token_ids),
                    logprobs=list(r.output_logprobs) if want_lp else None,
                    finish_reason=r.finish_reason,
                    stop_reason=r.stop_reason,
                    delta_text=s.text[s.sent_chars : visible],
                    delta_token_ids=r.output_token_ids[s.sent_tokens :],
                    delta_logprobs=r.output_logprobs[s.sent_logprobs :] if want_lp else None,
                )
            )
            s.sent_chars, s.sent_tokens, s.sent_logprobs = visible, len(r.output_token_ids), len(r.output_logprobs)
        first = self.samples[0].request
        prompt_lp: list[TokenLogprob | None] | None = None
        if self.params.prompt_logprobs is not None:
            prompt_lp = list(first.prompt_logprobs)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outs,
            finished=self.finished,
            metrics=first.metrics,
            prompt_logprobs=prompt_lp,
            num_cached_tokens=first.num_cached_tokens,
        )

