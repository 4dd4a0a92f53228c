"""Stop-string detection over incrementally growing output text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    end: int  # the output text ends here: output_text[:end] (after the stop string if it is included)
    stop: str  # the stop string that matched


class StopStringMatcher:
    """Finds stop strings in a sample's output text as it grows (one matcher per sample).

    A stop string may span token boundaries, so each check looks at the new characters plus
    the ``max_len - 1`` characters before them. When several stop strings complete in the same
    chunk, the one that *ends* first wins (ties: the longer one): the outcome then does not
    depend on how the text was split into tokens, exactly as if it arrived char by char.
    """

    def __init__(self, stop: tuple[str, ...], include_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = stop
        self.include_in_output = include_in_output
        self.max_len = max((len(s) for s in stop), default=0)
        # The stop strings by first character, for holdback(): memory linear in the stop strings.
        self._by_first: dict[str, tuple[str, ...]] = {}
        for s in stop:
            self._by_first[s[0]] = (*self._by_first.get(s[0], ()), s)

    def check(self, text: str, num_new_chars: int) -> StopMatch | None:
        """Earliest stop string that ends inside the last ``num_new_chars`` characters of ``text``."""
        if not self.stop or num_new_chars <= 0:
            return None
        new_start = len(text) - num_new_chars
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop:
            start = text.find(s, max(0, new_start - len(s) + 1))
            if start < 0:
                continue
            key = (start + len(s), -len(s), s)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        end, neg_len, s = best
        return StopMatch(end=end if self.include_in_output else end + neg_len, stop=s)

    def holdback(self, text: str) -> int:
        """How many trailing chars of ``text`` could still become a stop string (not safe to stream yet):
        the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(self.max_len - 1, len(text)), 0, -1):
            candidates = self._by_first.get(text[-k])
            if candidates is not None:
                tail = text[-k:]
                if any(len(s) > k and s.startswith(tail) for s in candidates):
                    return k
        return 0
