"""SamplingParams validation and normalisation."""

from __future__ import annotations

import dataclasses
import math

import pytest

from loom.sampling import MAX_LOGPROBS, SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", 1.5),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", math.nan),
        ("seed", 1.5),
        ("seed", "42"),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", ["ok", 3]),
        ("stop", 42),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("stop_token_ids", 2),
        ("max_tokens", -1),
        ("max_tokens", 1.0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("prompt_logprobs", -3),
        ("ignore_eos", "yes"),
        ("include_stop_str_in_output", 1),
        ("skip_special_tokens", None),
        ("best_of", 0),
        ("best_of", 2.0),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10


def test_best_of_runs_more_samples_than_it_returns() -> None:
    with pytest.raises(ValueError, match=r"best_of \(2\) must be >= n \(3\)"):
        SamplingParams(n=3, best_of=2)
    assert (SamplingParams(n=2).num_samples, SamplingParams(n=2).ranks_samples) == (2, False)
    assert (SamplingParams(n=2, best_of=2).num_samples, SamplingParams(n=2, best_of=2).ranks_samples) == (2, False)
    ranked = SamplingParams(n=2, best_of=5)
    assert (ranked.num_samples, ranked.ranks_samples) == (5, True)
    # Ranking needs the sampled tokens' logprobs even when none were asked for.
    assert (SamplingParams().sampled_logprobs, ranked.sampled_logprobs) == (None, 0)
    assert SamplingParams(n=2, best_of=5, logprobs=3).sampled_logprobs == 3


def test_defaults_are_valid_and_openai_like() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.greedy and not p.has_penalties


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b", "a"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[5, 7]).stop_token_ids == (5, 7)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=1).temperature == 1.0 and isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams(max_tokens=0).max_tokens == 0  # prompt only (echo / prompt_logprobs)


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8, top_k=2).greedy


def test_has_penalties() -> None:
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties
    assert SamplingParams(frequency_penalty=0.1).has_penalties


def test_frozen_and_replace_revalidates() -> None:
    p = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert dataclasses.replace(p, top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)


def test_stop_strings_are_capped() -> None:
    from loom.sampling.params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

    SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS)] + ["0"])  # duplicates do not count
    with pytest.raises(ValueError, match=f"stop must have at most {MAX_STOP_STRINGS} strings"):
        SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)])
    SamplingParams(stop="x" * MAX_STOP_STRING_CHARS)
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRING_CHARS} characters"):
        SamplingParams(stop=["ok", "x" * (MAX_STOP_STRING_CHARS + 1)])
