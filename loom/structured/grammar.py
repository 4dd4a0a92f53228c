"""Grammar-constrained decoding on llguidance: compiling constraints (cached), one matcher per
sample that advances with its accepted tokens, and the token bitmask applied to the logits.

llguidance was chosen over xgrammar because it has no dependencies of its own (xgrammar pulls
triton, ~285 MB, and transformers at run time) and covers every constraint kind the API has:
JSON schema, regex, choice and GBNF/Lark grammars, with rollback for speculative decoding.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import torch

from loom.structured.params import StructuredOutputs
from loom.tokenizer import Tokenizer

# JSON as json.dumps writes it, with no free whitespace: free whitespace lets a model pad forever
# (small models do). "oneOf" is compiled as "anyOf" (llguidance cannot enforce "exactly one"; the
# branches of real schemas, such as pydantic's tagged unions, rarely overlap). A schema's own
# "x-guidance" options override these.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
# _PENALTY[b, j]: what token j of a byte b of the bitmask adds to its logit: 0 if bit j is set, -inf if not.
_PENALTY = torch.where(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))
_PENALTIES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_executor: llguidance.LLExecutor | None = None


class GrammarError(ValueError):
    """A constraint that does not compile (bad schema, regex or grammar), or one that is too large."""


class GrammarState:
    """One sample's position in its grammar. ``accept`` only the tokens the sample keeps;
    ``rollback`` takes tokens back (rejected speculation)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (the state is then an error)."""
        return self._matcher.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback of {num_tokens} tokens failed: {self._matcher.get_error()}")

    @property
    def is_terminated(self) -> bool:
        """The document is complete and nothing more may follow it."""
        return self._matcher.is_stopped()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int, drafts: Sequence[int] = ()) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (bit ``t % 32`` of word ``t // 32``),
        and with draft tokens to verify, the tokens allowed after each of them into the rows that
        follow. The state is left where it was. Rows after a draft the grammar rejects allow
        everything: verification never keeps a token past that draft."""
        self._fill(bitmask[row])
        consumed = 0
        for j, token in enumerate(drafts, start=1):
            if self._matcher.try_consume_tokens([token]) != 1:
                bitmask[row + j : row + len(drafts) + 1] = -1
                break
            consumed += 1
            self._fill(bitmask[row + j])
        self.rollback(consumed)

    def _fill(self, target: torch.Tensor) -> None:
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())


class GrammarCompiler:
    """Compiles constraints for one tokenizer and keeps the most recent ``cache_size`` of them.
    Thread-safe: the server compiles off the engine thread, and the engine then hits the cache."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self.compile_seconds: dict[tuple[str, str], float] = {}  # of the grammars in the cache

    def _llguidance_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (~0.5 s for a 50k vocabulary): most engines never see a grammar.
        if self._lltokenizer is None:
            self._lltokenizer = llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                       eos_token=self._eos)
        return self._lltokenizer

    def compile(self, spec: StructuredOutputs) -> None:
        """Compile ``spec`` into the cache (a no-op when it is there). GrammarError names a bad one."""
        self._compiled(spec)

    def new_state(self, spec: StructuredOutputs) -> GrammarState:
        """A fresh matcher at the start of ``spec``'s grammar, for one sample."""
        return GrammarState(self._compiled(spec).deep_copy())

    def _compiled(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        key = (spec.kind, spec.source)
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
                return matcher
            tokenizer = self._llguidance_tokenizer()
        t0 = time.perf_counter()
        try:
            if spec.kind in ("json", "json_object"):
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
            else:
                grammar = llguidance.grammar_from(spec.kind, spec.source)  # type: ignore[arg-type]
        except ValueError as e:
            raise GrammarError(f"invalid {spec.kind} constraint: {e}") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)  # drops the GIL while it compiles
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.kind} constraint: {matcher.get_error()}")
        elapsed = time.perf_counter() - t0
        with self._lock:
            self._cache[key] = matcher
            self.compile_seconds[key] = elapsed
            while len(self._cache) > self._cache_size:
                old, _ = self._cache.popitem(last=False)
                self.compile_seconds.pop(old, None)
        return matcher


def new_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    return torch.zeros(num_rows, (vocab_size + 31) // 32, dtype=torch.int32)


def fill_bitmasks(states: Sequence[tuple[GrammarState, int, Sequence[int]]], bitmask: torch.Tensor) -> None:
    """``state.fill_bitmask(bitmask, row, drafts)`` for each ``(state, row, drafts)``. The rows
    without drafts are filled in one llguidance call, on its own thread pool (as many threads as
    torch computes with), instead of one Python call after another."""
    plain = [(state._matcher, row) for state, row, drafts in states if not drafts]
    if len(plain) > 1 and bitmask.is_contiguous():
        global _executor
        if _executor is None:
            _executor = llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads()))
        _executor.unsafe_compute_mask_ptr(plain, bitmask.data_ptr(), bitmask.shape[1] * bitmask.element_size(),
                                          bitmask.shape[0])
        states = [item for item in states if item[2]]
    for state, row, drafts in states:
        state.fill_bitmask(bitmask, row, drafts)


def apply_token_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf in ``rows`` (``bitmask[i]`` is for ``rows[i]``);
    other rows are untouched. Each byte of the bitmask looks up its 8 tokens' penalties (0 or
    -inf) in a table, and the penalties are added in place: two passes over the rows' logits."""
    vocab = logits.shape[1]
    if sys.byteorder != "little":  # the byte view below reads the words' low bits first
        bits = (bitmask.to(logits.device).unsqueeze(-1) >> _BIT_SHIFTS.to(logits.device)) & 1
        allowed = bits.view(len(rows), -1)[:, :vocab].bool()
        index = torch.tensor(rows, device=logits.device)
        logits[index] = torch.where(allowed, logits[index], float("-inf"))
        return
    key = (logits.device, logits.dtype)
    table = _PENALTIES.get(key)
    if table is None:
        table = _PENALTIES[key] = _PENALTY.to(device=logits.device, dtype=logits.dtype)
    words = bitmask.to(logits.device).contiguous()
    penalty = table.index_select(0, words.view(torch.uint8).view(-1).int()).view(len(rows), -1)[:, :vocab]
    if len(rows) == logits.shape[0] and list(rows) == list(range(len(rows))):
        logits.add_(penalty)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), penalty)
