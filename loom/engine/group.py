"""A user request's state outside the scheduler: its samples, their detokenizers and stop
matchers, and what has been streamed so far; the ``n`` best of ``best_of`` samples and the pooled
embedding of embedding requests are picked here."""

from __future__ import annotations

import math
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
    embed: bool = False  # an embedding request: no completions, an embedding when finished
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
        return len(self.samples) == self.params.num_samples and all(s.request.is_finished for s in self.samples)

    def output(self) -> RequestOutput:
        """Cumulative outputs plus the deltas since the previous call. While ``best_of`` > ``n``
        samples run, every sample is listed (``index`` is the sample's number); once all have
        finished, the ``n`` with the highest cumulative logprob, best first, indexed 0..n-1."""
        outs = [] if self.embed else [self._completion(i, s) for i, s in enumerate(self.samples)]
        finished = self.finished
        if finished and self.params.ranks_samples:
            order = sorted(range(len(outs)), key=lambda i: self.samples[i].request.cumulative_logprob, reverse=True)
            outs = [outs[i] for i in order[: self.params.n]]
            for rank, c in enumerate(outs):
                c.index = rank
        first = self.samples[0].request
        prompt_lp: list[TokenLogprob | None] | None = None
        if self.params.prompt_logprobs is not None:
            prompt_lp = list(first.prompt_logprobs)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outs,
            finished=finished,
            metrics=first.metrics,
            prompt_logprobs=prompt_lp,
            num_cached_tokens=first.num_cached_tokens,
            num_generated_tokens=sum(len(s.request.output_token_ids) for s in self.samples),
            embedding=self._embedding(first) if self.embed and finished else None,
        )

    def _completion(self, index: int, s: SampleState) -> CompletionOutput:
        r = s.request
        visible = len(s.text) if r.is_finished else len(s.text) - s.stop.holdback(s.text)
        visible = max(visible, s.sent_chars)
        want_lp = self.params.logprobs is not None
        out = CompletionOutput(
            index=index,
            text=s.text,
            token_ids=list(r.output_token_ids),
            logprobs=list(r.output_logprobs) if want_lp else None,
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            delta_text=s.text[s.sent_chars : visible],
            delta_token_ids=r.output_token_ids[s.sent_tokens :],
            delta_logprobs=r.output_logprobs[s.sent_logprobs :] if want_lp else None,
            cumulative_logprob=r.cumulative_logprob if self.params.sampled_logprobs is not None else None,
        )
        s.sent_chars, s.sent_tokens, s.sent_logprobs = visible, len(r.output_token_ids), len(r.output_logprobs)
        return out

    def _embedding(self, request: Request) -> list[float] | None:
        """Mean of the prompt's final hidden states, L2-normalised (normalising the sum gives the
        same vector); None for an aborted request."""
        if request.finish_reason == "abort":
            return None
        norm = math.sqrt(sum(x * x for x in request.hidden_sum)) or 1.0
        return [x / norm for x in request.hidden_sum]
