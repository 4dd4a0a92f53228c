"""Sampling: validated request parameters, the batched sampler, logprobs, stop strings."""

from loom.sampling.params import MAX_LOGPROBS, SamplingParams
from loom.sampling.sampler import SampleResult, Sampler, SamplingRow, TokenBitmask, compute_logprobs, position_generator, sample_seed
from loom.sampling.stop import StopMatch, StopStringMatcher

__all__ = [
    "MAX_LOGPROBS",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "SamplingRow",
    "StopMatch",
    "StopStringMatcher",
    "TokenBitmask",
    "compute_logprobs",
    "position_generator",
    "sample_seed",
]
