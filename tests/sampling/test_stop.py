"""Stop strings over streamed text."""

from __future__ import annotations

import random

import pytest

from loom.sampling import StopMatch, StopStringMatcher


def _feed(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, StopMatch | None]:
    """Stream chunks the way the engine does; stop at the first match."""
    text = ""
    for chunk in chunks:
        text += chunk
        match = matcher.check(text, len(chunk))
        if match is not None:
            return text, match
    return text, None


def test_stop_string_spanning_chunks() -> None:
    matcher = StopStringMatcher(("</end>",))
    text, match = _feed(matcher, ["Hello </", "en", "d> trailing"])
    assert match == StopMatch(end=len("Hello "), stop="</end>")
    assert text[: match.end] == "Hello "


def test_include_stop_string_in_output() -> None:
    text, match = _feed(StopStringMatcher(("STOP",), include_in_output=True), ["a S", "TO", "P b"])
    assert match is not None and text[: match.end] == "a STOP"


def test_earliest_completed_stop_wins() -> None:
    matcher = StopStringMatcher(("world", "lo w", "xyz"))
    # both "lo w" and "world" are in the chunk; "lo w" completes first
    assert matcher.check("hello world", 11) == StopMatch(end=3, stop="lo w")
    # completing at the same character: the longer (earlier starting) one
    matcher = StopStringMatcher(("c", "abc"))
    assert matcher.check("xxabc", 5) == StopMatch(end=2, stop="abc")
    # a stop string that ends first wins even if a longer one starts earlier
    matcher = StopStringMatcher(("abcd", "c"))
    assert matcher.check("abcd", 4) == StopMatch(end=2, stop="c")


def test_result_does_not_depend_on_chunking() -> None:
    stops = ("needle", "dle in", "hay!")
    text = "hay hay needle in a haystack hay!"
    expected = StopStringMatcher(stops).check(text, len(text))
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 8)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _feed(StopStringMatcher(stops), chunks)[1] == expected
    assert expected == StopMatch(end=len("hay hay "), stop="needle")


def test_only_new_text_is_searched() -> None:
    matcher = StopStringMatcher(("ab",))
    assert matcher.check("ab then more", 5) is None  # the match lies wholly in old text
    assert matcher.check("xa", 0) is None
    assert matcher.check("xab", 1) == StopMatch(end=1, stop="ab")


def test_no_stop_strings() -> None:
    matcher = StopStringMatcher(())
    assert matcher.check("anything", 8) is None
    assert matcher.holdback("anything") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello", 0),
        ("Hello <", 1),
        ("Hello </e", 3),
        ("Hello </end", 5),
        ("Hello </end>", 0),  # a full match is check()'s business, not a prefix
        ("Hello ##", 2),
        ("Hello #", 1),
        ("<", 1),
        ("", 0),
    ],
)
def test_holdback(text: str, expected: int) -> None:
    assert StopStringMatcher(("</end>", "###")).holdback(text) == expected


def test_stream_never_shows_part_of_a_stop_string() -> None:
    matcher = StopStringMatcher(("<|stop|>",))
    text, streamed = "", ""
    for chunk in ["The answer", " is 4", "<|", "st", "op|> ignored"]:
        text += chunk
        match = matcher.check(text, len(chunk))
        if match is not None:
            text = text[: match.end]
            streamed += text[len(streamed) :]
            break
        visible = len(text) - matcher.holdback(text)
        streamed += text[len(streamed) : visible]
        assert "<" not in streamed
    assert streamed == "The answer is 4"


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(("ok", ""))


def test_holdback_matches_the_set_of_all_prefixes() -> None:
    """holdback() without storing every prefix: the same answer as the quadratic definition."""
    rng = random.Random(1)
    for _ in range(300):
        stops = tuple({"".join(rng.choices("ab<", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))})
        prefixes = {s[:k] for s in stops for k in range(1, len(s))}
        text = "".join(rng.choices("ab<x", k=rng.randint(0, 10)))
        expected = next((k for k in range(len(text), 0, -1) if text[-k:] in prefixes), 0)
        assert StopStringMatcher(stops).holdback(text) == expected, (stops, text)


def test_long_stop_strings_cost_linear_memory() -> None:
    import tracemalloc

    stops = tuple(f"{i:02d}" + "x" * 1022 for i in range(64))
    tracemalloc.start()
    matcher = StopStringMatcher(stops)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size < 64 * 1024  # every prefix of every stop string would be ~33 MB
    assert matcher.holdback("abc07" + "x" * 500) == 502
