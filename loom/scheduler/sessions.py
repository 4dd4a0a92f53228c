"""Multi-turn time-to-live (Continuum): how long a finished turn's KV stays pinned for the session's
next turn.

A session's gaps between one turn finishing and the next arriving (a user reading, a tool running)
are recorded; the next pin lasts 1.5 x the longest of the last ``history`` gaps (at least
``min(default_ttl, 1 s)``: a burst of quick turns should not shrink it to nothing), capped at
``max_ttl``, or ``default_ttl`` before any gap was seen. At most ``max_sessions`` sessions are
remembered (the least recently active are forgotten)."""

from __future__ import annotations

from collections import OrderedDict, deque

GAP_MARGIN = 1.5
MIN_TTL = 1.0


class SessionTTL:
    def __init__(self, default_ttl: float, max_ttl: float, history: int = 8, max_sessions: int = 100_000) -> None:
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.history = history
        self.max_sessions = max_sessions
        self._last_finish: OrderedDict[str, float] = OrderedDict()
        self._gaps: OrderedDict[str, deque[float]] = OrderedDict()

    def on_arrival(self, session: str, now: float) -> bool:
        """Record a turn's arrival; True when the session finished a turn before (a follow-up)."""
        finished = self._last_finish.pop(session, None)
        if finished is None:
            return False
        self._remember(self._gaps, session, self._gaps.get(session) or deque(maxlen=self.history))
        self._gaps[session].append(max(now - finished, 0.0))
        return True

    def on_finish(self, session: str, now: float) -> float:
        """Record the turn's end; returns when its pin expires."""
        self._remember(self._last_finish, session, now)
        return now + self.ttl(session)

    def ttl(self, session: str) -> float:
        gaps = self._gaps.get(session)
        if not gaps:
            return min(self.default_ttl, self.max_ttl)
        return min(self.max_ttl, max(GAP_MARGIN * max(gaps), min(self.default_ttl, MIN_TTL)))

    def _remember(self, table: OrderedDict, session: str, value: object) -> None:
        table[session] = value
        table.move_to_end(session)
        while len(table) > self.max_sessions:
            table.popitem(last=False)
