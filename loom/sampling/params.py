"""Per-request sampling parameters (vLLM / OpenAI semantics), validated on construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from loom.structured.params import StructuredOutputs

# OpenAI caps top_logprobs at 20; vLLM's default max_logprobs is 20 as well.
MAX_LOGPROBS = 20
# Caps on stop strings: OpenAI allows 4, vLLM no limit; these are generous, yet bound the work
# the stop-string check does for every generated token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
# Temperatures below this are treated as greedy: dividing logits by ~0 overflows float32.
GREEDY_TEMPERATURE = 1e-5
# OpenAI's range for logit_bias values; the entry cap bounds the work one request can ask for.
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 4096


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_int(name: str, value: object, minimum: int) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_logprobs(name: str, value: int | None) -> None:
    if value is None:
        return
    _check_int(name, value, 0)
    if value > MAX_LOGPROBS:
        raise ValueError(f"{name} must be <= {MAX_LOGPROBS}, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request (shared by its ``n`` samples).

    Frozen: derive variants with ``dataclasses.replace`` (which validates again).
    ``stop`` and ``stop_token_ids`` are normalised to tuples, ``top_k=-1`` to ``0`` (off).
    ``logit_bias`` maps token ids to values in [-100, 100] added to their logits before sampling;
    ``structured_outputs`` constrains the output (a ``StructuredOutputs``, or a dict of its fields).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16  # None: until the context is full; 0: prompt only (e.g. prompt_logprobs)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; 0 = only the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Only meaningful for slow (Python) tokenizers; loom's fast tokenizers ignore it, like HF's.
    spaces_between_special_tokens: bool = True
    logit_bias: Mapping[int, float] | None = None
    structured_outputs: StructuredOutputs | None = None
    # Run this many samples and return the ``n`` with the highest cumulative logprob (None: ``n``).
    best_of: int | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        temperature = _check_finite("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        top_p = _check_finite("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        _check_int("top_k", self.top_k, -1)
        min_p = _check_finite("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        repetition_penalty = _check_finite("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_finite(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 0)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check_logprobs("logprobs", self.logprobs)
        _check_logprobs("prompt_logprobs", self.prompt_logprobs)
        if self.best_of is not None and _check_int("best_of", self.best_of, 1) < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        object.__setattr__(self, "logit_bias", self._normalise_logit_bias(self.logit_bias))
        object.__setattr__(self, "structured_outputs", self._normalise_structured(self.structured_outputs))
        if self.structured_outputs is not None and self.min_tokens:
            raise ValueError("min_tokens cannot be combined with structured_outputs (a complete document must be able to end)")

        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", 0 if self.top_k == -1 else self.top_k)
        object.__setattr__(self, "min_p", min_p)
        object.__setattr__(self, "repetition_penalty", repetition_penalty)
        object.__setattr__(self, "presence_penalty", float(self.presence_penalty))
        object.__setattr__(self, "frequency_penalty", float(self.frequency_penalty))
        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        items = (stop,) if isinstance(stop, str) else stop
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"stop must be a string, a list of strings or None, got {stop!r}")
        for s in items:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long, got {len(s)}")
        unique = tuple(dict.fromkeys(items))  # drop duplicates, keep order
        if len(unique) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(unique)}")
        return unique

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers or None, got {ids!r}")
        for i in ids:
            if not _is_int(i) or i < 0:
                raise ValueError(f"stop_token_ids must contain non-negative integers, got {i!r}")
        return tuple(ids)

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, Mapping):
            raise ValueError(f"logit_bias must be a mapping of token ids to numbers, got {bias!r}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
        out: dict[int, float] = {}
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {token!r}")
            value = _check_finite(f"logit_bias[{token}]", value)
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                 f"got {value} for token {token}")
            out[token] = value
        return out or None

    @staticmethod
    def _normalise_structured(spec: object) -> StructuredOutputs | None:
        if spec is None or isinstance(spec, StructuredOutputs):
            return spec
        if isinstance(spec, Mapping):
            try:
                return StructuredOutputs(**spec)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        raise ValueError(f"structured_outputs must be a StructuredOutputs or a dict, got {type(spec).__name__}")

    @property
    def num_samples(self) -> int:
        """Samples the engine runs: ``best_of`` of them, of which ``n`` are returned."""
        return self.best_of or self.n

    @property
    def ranks_samples(self) -> bool:
        """Whether the ``n`` returned samples are picked out of more by cumulative logprob."""
        return self.num_samples > self.n

    @property
    def sampled_logprobs(self) -> int | None:
        """Top alternatives the sampler computes per sampled token: ``logprobs``, else 0 when the
        samples are ranked (which needs each sampled token's logprob), else None (no logprobs)."""
        if self.logprobs is None and self.ranks_samples:
            return 0
        return self.logprobs

    @property
    def greedy(self) -> bool:
        """Deterministic argmax decoding (temperature ~0 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
