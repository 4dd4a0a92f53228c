"""The methods ``--speculative`` names, and building the engine's speculator from its options."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loom.config import EngineConfig
from loom.json_source import json_object, parse_options
from loom.model.worker import Worker
from loom.spec.controller import StepCostModel
from loom.spec.draft import DraftModelProposer, DraftOptions, kv_bytes_per_token
from loom.spec.lookahead import LookaheadOptions, LookaheadProposer
from loom.spec.ngram import NgramOptions, NgramProposer
from loom.spec.proposer import Proposer
from loom.spec.speculator import Speculator
from loom.tokenizer import Tokenizer

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Target:
    """What a proposer may need of the engine it proposes for."""

    config: EngineConfig
    tokenizer: Tokenizer
    kv_cache_tokens: int
    max_model_len: int


# method -> (its options dataclass, the proposer built from them and the target)
PROPOSERS: dict[str, tuple[type, Callable[[Any, Target], Proposer]]] = {
    "ngram": (NgramOptions, lambda options, _: NgramProposer(options)),
    "lookahead": (LookaheadOptions, lambda options, _: LookaheadProposer(options)),
    "draft": (DraftOptions, lambda options, t: DraftModelProposer(options, t.config, t.tokenizer, t.kv_cache_tokens,
                                                                  t.max_model_len)),
}


def proposer_options(config: EngineConfig) -> dict[str, Any]:
    """The ``--speculative-config`` object (empty without one)."""
    text = config.speculation.speculative_config
    return json_object(text, "speculative config") if text else {}


def check_speculation(config: EngineConfig) -> None:
    """ValueError naming a bad proposer option, before anything loads."""
    method = config.speculation.speculative
    if method in PROPOSERS:
        parse_options(PROPOSERS[method][0], proposer_options(config), f"the {method} proposer")


def proposer_kv_bytes_per_token(config: EngineConfig) -> int:
    """What the proposer's own KV cache takes per token of the target's, when it holds as many
    tokens as the target's (a draft model's, unless its ``kv_cache_tokens`` says otherwise): the
    target's cache leaves that share of the memory budget to it."""
    if config.speculation.speculative != "draft":
        return 0
    options = parse_options(DraftOptions, proposer_options(config), "the draft proposer")
    return 0 if options.kv_cache_tokens else kv_bytes_per_token(config)


def make_proposer(target: Target) -> Proposer:
    method = target.config.speculation.speculative
    options_cls, build = PROPOSERS[method]
    return build(parse_options(options_cls, proposer_options(target.config), f"the {method} proposer"), target)


def make_speculator(config: EngineConfig, proposer: Proposer, worker: Worker, max_model_len: int,
                    trees: bool) -> Speculator:
    """The target's step costs are measured (``worker``) only when the speculation length is chosen
    per step."""
    sc = config.speculation
    budget = config.scheduler.max_num_batched_tokens
    step_cost = None
    if sc.fixed_k is None:
        points = worker.measure_step_seconds(budget)
        step_cost = StepCostModel(points, worker.measure_context_seconds(max_model_len))
        log.info("speculation (%s): step costs %s; %.3f us per row and token of context", proposer.name,
                 ", ".join(f"{n} tokens {s * 1e3:.1f} ms" for n, s in points), step_cost.per_context_token * 1e6)
    return Speculator(proposer, sc.speculative_max_k, sc.fixed_k, step_cost, budget, trees)
