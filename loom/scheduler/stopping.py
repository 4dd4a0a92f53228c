"""Token-level stop conditions, checked as each accepted token is appended (stop strings need
the detokenized text and are checked by the engine's output stage)."""

from __future__ import annotations

from loom.request import Request


def token_stop(req: Request, eos_token_ids: tuple[int, ...]) -> tuple[str, int | None] | None:
    """(finish reason, stop reason) if ``req``'s last token ends it, else None."""
    token = req.output_token_ids[-1]
    p = req.params
    if len(req.output_token_ids) >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            return "stop", None
        if p.stop_token_ids and token in p.stop_token_ids:
            return "stop", token
    if req.grammar is not None and req.grammar.is_terminated:
        return "stop", None  # the constrained document is complete; nothing may follow it
    if req.num_tokens >= req.max_total_tokens:
        return "length", None
    return None
