"""The proposer seam: guesses of the tokens that follow running requests, verified by the next step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from loom.request import Request
from loom.spec.controller import StepCostModel
from loom.step import tree_depths


@dataclass(frozen=True)
class Draft:
    """Draft tokens for one request. ``parents[i]`` is the index of token ``i``'s parent among the
    draft tokens, -1 for the request's last token; parents come before their children. ``()`` is a
    chain (each token follows the one before), the only shape a plain proposer makes; a tree holds
    several branches that share their prefixes and is verified in one pass with a tree mask."""

    token_ids: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.parents and len(self.parents) != len(self.token_ids):
            raise ValueError("a draft tree needs one parent per token")
        if any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError("a draft tree's parents must come before their children")
        if self.parents and all(p == i - 1 for i, p in enumerate(self.parents)):
            object.__setattr__(self, "parents", ())  # a chain after all

    def cut(self, n: int) -> Draft:
        """The first ``n`` tokens (still a tree: parents come first)."""
        return Draft(self.token_ids[:n], self.parents[:n])

    @property
    def depth(self) -> int:
        """Tokens on the longest branch."""
        return max(tree_depths(self.parents), default=0) if self.parents else len(self.token_ids)

    def chain(self) -> Draft:
        """The first branch alone (for requests that cannot verify a tree)."""
        if not self.parents:
            return self
        n = 1
        while n < len(self.parents) and self.parents[n] == n - 1:
            n += 1
        return Draft(self.token_ids[:n])


class Proposer(ABC):
    """Proposes draft tokens for running requests; ``Speculator`` decides how many each may have."""

    name: ClassVar[str] = ""
    makes_trees: ClassVar[bool] = False
    pass_cost: StepCostModel | None = None  # a draft model's forward pass (by requests in it); None: free

    def limits(self, requests: Sequence[Request], max_k: int) -> list[int]:
        """How many tokens it could propose for each request, at most ``max_k`` (a cheap proposer
        finds its guesses here and hands them out in ``propose``)."""
        return [max_k] * len(requests)

    def setup_seconds(self, requests: Sequence[Request]) -> list[float]:
        """Seconds of the work the proposer must do for each request before its first draft (a
        draft model catching up on the tokens it has not run); a proposer that reads the request's
        tokens as they are has none."""
        return [0.0] * len(requests)

    @abstractmethod
    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        """At most ``ks[i]`` tokens for ``requests[i]`` (``ks[i]`` may be 0: no draft)."""

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop what it keeps for requests that are gone (finished, aborted or preempted)."""
