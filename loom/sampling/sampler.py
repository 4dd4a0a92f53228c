"""Batched sampling: logits [B, V] -> one token (and optionally its logprobs) per row.

Order of processing: the grammar mask (structured output), logit_bias, the min_tokens mask,
repetition/presence/frequency penalties, temperature, top-k, top-p, min-p, then a draw.
Logprobs describe the *raw* model distribution.

Everything but the per-row generator draws is vectorised. Two CPU-specific choices:

- top-k / top-p thresholds come from a radix select instead of a sort. Sorting [64, 49152]
  floats takes ~250 ms on one core; bucketing the probabilities by their top float bits
  (exponent + 3 mantissa bits, a monotone key) and sorting only the members of the bucket
  that holds the cut-off costs a few passes over the batch.
- the draw is an inverse-CDF lookup done in two stages (blocks of 128 tokens, then inside the
  chosen block) in float64, so a row needs one uniform number and tail tokens keep their
  exact share of probability mass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.outputs import TokenLogprob
from loom.sampling.params import SamplingParams
from loom.structured import apply_token_bitmask

_BUCKET_SHIFT = 20  # float32 bits >> 20: sign, exponent and 3 mantissa bits
_NUM_BUCKETS = 1024  # non-negative floats below 2.0 fall in buckets 0..1023
_DRAW_BLOCK = 128


@dataclass
class SamplingRow:
    """One row of the logits batch: the sample's parameters and history."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far for this sample (drafts before the row included)
    seed: int | None  # from sample_seed(); None = the sampler's shared generator
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokenBitmask:
    """The tokens a grammar allows, for some rows of the batch: ``bitmask[i]`` is for ``rows[i]``."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)]


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: TokenLogprob | None  # set when params.sampled_logprobs is not None


def sample_seed(params: SamplingParams, sample_index: int) -> int | None:
    """The seed of a seeded request's sample: sample ``i`` is seeded from (seed, i), so the ``n``
    samples differ from each other but each is reproducible."""
    if params.seed is None:
        return None
    digest = hashlib.blake2b(f"{params.seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def position_generator(seed: int, position: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a seeded sample's draw at output ``position``: one stream per position, so
    a token depends on the seed, the position and the logits only, not on how many draws came
    before. A speculative step that samples at several positions (and throws some away) then draws
    exactly what one-token steps would have drawn."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed ^ (position * 0x9E3779B97F4A7C15)) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]) -> list[TokenLogprob]:
    """Logprob, rank and top-``num_top[i]`` alternatives of ``token_ids[i]`` under ``log_softmax(logits[i])``.

    Also serves prompt logprobs: pass the logits of positions ``0..n-2`` and the prompt ids ``1..n-1``.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.view(-1, 1).long())
    ranks = (logprobs > chosen).sum(dim=-1, dtype=torch.int32).add_(1).tolist()
    k_max = min(max(num_top, default=0), logprobs.shape[-1])
    values, indices = torch.topk(logprobs, k_max, dim=-1)
    return [
        TokenLogprob(token_id=token_id, logprob=lp, rank=rank, top=tuple(zip(top_ids[:k], top_values[:k])))
        for token_id, lp, rank, k, top_ids, top_values in zip(
            token_ids.tolist(), chosen.view(-1).tolist(), ranks, num_top, indices.tolist(), values.tolist()
        )
    ]


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row (the first one on ties). ``max`` finds the same index as ``argmax``
    but runs 2.5x faster on the CPU, and 5x over bf16, where it needs no fp32 copy either
    (measured on [64, 49152] logits: 1.1 ms against 5.1 ms for ``argmax``)."""
    return logits.max(dim=-1).indices


class Sampler:
    """Turns a batch of logits into tokens. ``seed`` seeds the generator shared by unseeded rows."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None = None) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        if not rows:
            return []
        biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
        masked = [i for i, row in enumerate(rows) if len(row.output_token_ids) < row.params.min_tokens]
        penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
        want_logprobs = [i for i, row in enumerate(rows) if row.params.sampled_logprobs is not None]
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows) and not (masked or penalised or want_logprobs or biased or allowed):
            token_ids = greedy_ids(logits).tolist()
            return [SampleResult(token_id, None) for token_id in token_ids]

        x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # never the caller's
        raw = x[want_logprobs] if want_logprobs else None  # a copy, taken before any processing
        if allowed is not None and allowed.rows:
            apply_token_bitmask(x, allowed.rows, allowed.bitmask)
        if biased:
            _apply_logit_bias(x, rows, biased)
        if masked:
            _apply_min_tokens(x, rows, masked)
        if penalised:
            _apply_penalties(x, rows, penalised)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=x.device)
        if len(greedy) == len(rows):
            token_ids = greedy_ids(x)  # no gather of the rows (a copy of the logits)
        elif greedy:
            token_ids[greedy] = greedy_ids(x[greedy])
        drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
        if drawn:
            token_ids[drawn] = self._sample(x if len(drawn) == len(rows) else x[drawn], [rows[i] for i in drawn])

        logprobs: dict[int, TokenLogprob] = {}
        if raw is not None:
            num_top = [rows[i].params.sampled_logprobs for i in want_logprobs]
            logprobs = dict(zip(want_logprobs, compute_logprobs(raw, token_ids[want_logprobs], num_top)))
        return [SampleResult(token_id, logprobs.get(i)) for i, token_id in enumerate(token_ids.tolist())]

    def _sample(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one draw per row. ``x`` may be modified."""
        device = x.device
        temperatures = torch.tensor([row.params.temperature for row in rows], dtype=torch.float32, device=device)
        if bool((temperatures != 1.0).any()):
            x.div_(temperatures.unsqueeze(1))
        probs = _filter(torch.softmax(x, dim=-1), [row.params for row in rows])
        out = torch.empty(len(rows), dtype=torch.long, device=device)
        unseeded = [i for i, row in enumerate(rows) if row.seed is None]
        if unseeded:
            shared = self._shared_generator(device)
            uniforms = torch.rand(len(unseeded), dtype=torch.float64, generator=shared, device=device)
            out[unseeded] = _draw(probs[unseeded] if len(unseeded) < len(rows) else probs, uniforms)
        for i, row in enumerate(rows):
            if row.seed is not None:
                out[i] = _race(probs[i], position_generator(row.seed, len(row.output_token_ids), device))
        return out


def _apply_logit_bias(x: torch.Tensor, rows: list[SamplingRow], indices: list[int]) -> None:
    """Add each row's logit_bias values to the logits of their tokens (ids are checked against
    the vocabulary when the request is added)."""
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i in indices:
        bias = rows[i].params.logit_bias or {}
        row_idx += [i] * len(bias)
        tok_idx += bias.keys()
        values += bias.values()
    index = (torch.tensor(row_idx, device=x.device), torch.tensor(tok_idx, device=x.device))
    x.index_put_(index, torch.tensor(values, dtype=x.dtype, device=x.device), accumulate=True)


def _apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow], indices: list[int]) -> None:
    """While a sample is shorter than min_tokens, it may not produce a token that would stop it."""
    vocab = x.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i in indices:
        params = rows[i].params
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:  # with ignore_eos, EOS does not stop the sample, so it stays allowed
            stops.update(rows[i].eos_token_ids)
        in_vocab = [t for t in stops if t < vocab]
        row_idx += [i] * len(in_vocab)
        tok_idx += in_vocab
    if tok_idx:
        x[torch.tensor(row_idx, device=x.device), torch.tensor(tok_idx, device=x.device)] = float("-inf")


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow], indices: list[int]) -> None:
    """Repetition (HF: prompt+output tokens; divide positive, multiply negative logits), then
    frequency and presence (OpenAI: output token counts). Only the logits of seen tokens are touched."""
    num_rows, vocab = x.shape
    device = x.device
    out_parts, prompt_parts = [], []
    for i in indices:
        out_parts.append(torch.as_tensor(rows[i].output_token_ids, dtype=torch.long, device=device) + i * vocab)
        if rows[i].params.repetition_penalty != 1.0:
            prompt_parts.append(torch.as_tensor(rows[i].prompt_token_ids, dtype=torch.long, device=device) + i * vocab)
    out_flat = torch.cat(out_parts)
    seen, inverse = torch.unique(torch.cat([out_flat, *prompt_parts]), return_inverse=True)
    if seen.numel() == 0:
        return
    counts = torch.zeros(seen.numel(), dtype=torch.float32, device=device)
    counts.index_add_(0, inverse[: out_flat.numel()], torch.ones(out_flat.numel(), dtype=torch.float32, device=device))
    per_row = torch.tensor([[1.0], [0.0], [0.0]], device=device).repeat(1, num_rows)
    per_row[:, indices] = torch.tensor(
        [[rows[i].params.repetition_penalty, rows[i].params.frequency_penalty, rows[i].params.presence_penalty] for i in indices],
        device=device,
    ).T
    rep, freq, pres = per_row[:, seen // vocab]
    flat = x.view(-1)
    values = flat[seen]
    values = torch.where(values > 0, values / rep, values * rep)
    values -= freq * counts + pres * (counts > 0)
    flat[seen] = values


def _filter(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero the probabilities that top-k, then top-p (over the top-k renormalised
    distribution), then min-p exclude. Not renormalised: the draw does not need it."""
    num_rows, vocab = probs.shape
    device = probs.device
    top_k = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if top_k:
        targets = torch.zeros(num_rows, dtype=torch.float64, device=device)
        targets[top_k] = torch.tensor([float(params[i].top_k) for i in top_k], dtype=torch.float64, device=device)
        probs = _mask_below(probs, _top_threshold(probs, targets, top_k, weighted=False))
    top_p = [i for i, p in enumerate(params) if p.top_p < 1.0]
    min_p = [i for i, p in enumerate(params) if p.min_p > 0.0]
    if not (top_p or min_p):
        return probs
    thresholds = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if top_p:
        fractions = torch.tensor([params[i].top_p for i in top_p], dtype=torch.float64, device=device)
        targets = torch.zeros(num_rows, dtype=torch.float64, device=device)
        targets[top_p] = probs[top_p].sum(dim=-1, dtype=torch.float64) * fractions if top_k else fractions
        thresholds = _top_threshold(probs, targets, top_p, weighted=True)
    if min_p:
        scale = torch.tensor([params[i].min_p for i in min_p], dtype=torch.float32, device=device)
        thresholds[min_p] = torch.maximum(thresholds[min_p], probs[min_p].amax(dim=-1) * scale)
    return _mask_below(probs, thresholds)


def _mask_below(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    return torch.where(probs < thresholds.unsqueeze(1), 0.0, probs)  # faster than masked_fill_ on CPU


def _top_threshold(probs: torch.Tensor, targets: torch.Tensor, rows: list[int], weighted: bool) -> torch.Tensor:
    """Per listed row, the value ``t`` such that ``{j: probs[j] >= t}`` is the smallest top set whose
    weight (token count, or probability mass if ``weighted``) reaches ``targets[row]``; 0 elsewhere.

    Radix select: histogram each row by the top bits of its float32 values (a monotone key for
    non-negative floats), find the bucket where the weight counted from the top crosses the
    target, and sort only that bucket's members to place the cut-off. Ties at the cut-off are
    kept. Every step is row-local, so a row's result never depends on the rest of the batch.
    """
    num_rows = probs.shape[0]
    device = probs.device
    buckets = probs.view(torch.int32) >> _BUCKET_SHIFT
    buckets += torch.arange(num_rows, dtype=torch.int32, device=device).mul_(_NUM_BUCKETS).unsqueeze(1)
    hist = torch.bincount(buckets.view(-1), weights=probs.view(-1) if weighted else None, minlength=num_rows * _NUM_BUCKETS)
    hist = hist.view(num_rows, _NUM_BUCKETS).double()
    below_or_at = hist.cumsum(dim=-1)
    above = below_or_at[:, -1:] - below_or_at  # weight of the buckets above each bucket
    cut = (above + hist >= targets.unsqueeze(1)).sum(dim=-1) - 1  # the bucket holding the cut-off
    listed = torch.zeros(num_rows, dtype=torch.bool, device=device)
    listed[rows] = True
    # cut <= 0: the target needs (nearly) everything, down to zeros and denormals: keep all.
    resolve = listed & (cut >= 1)
    thresholds = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if not bool(resolve.any()):
        return thresholds
    need = targets - above.gather(1, cut.clamp(min=0).unsqueeze(1)).squeeze(1)  # missing on entering the cut-off bucket
    member_bucket = torch.where(resolve, cut + torch.arange(num_rows, device=device) * _NUM_BUCKETS, -1)
    r, j = (buckets == member_bucket.to(torch.int32).unsqueeze(1)).nonzero(as_tuple=True)
    bits = probs.view(torch.int32)[r, j].long()  # monotone in the value for non-negative floats
    order = torch.argsort((r << 32) | (0x7FFFFFFF - bits))  # by row, then value descending
    r, j = r[order], j[order]
    values = probs[r, j]
    # Lay each row's members out densely so the running sums are per row (batch independent).
    position = torch.arange(r.numel(), device=device) - torch.searchsorted(r, r)
    dense = torch.zeros(num_rows, int(position.max()) + 1, dtype=torch.float64, device=device)
    dense[r, position] = values.double() if weighted else 1.0
    before = (dense.cumsum(dim=1) - dense)[r, position]  # weight of the row's members above this one
    keep = before < need[r]
    return thresholds.scatter_reduce_(0, r[keep], values[keep], "amin", include_self=False)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from unnormalised ``probs`` [R, V] with one uniform in [0, 1) per row:
    first a block of ``_DRAW_BLOCK`` tokens by block mass, then a token inside that block."""
    num_rows, vocab = probs.shape
    pad = -vocab % _DRAW_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(num_rows, -1, _DRAW_BLOCK)
    block_cum = blocks.sum(dim=-1).double().cumsum(dim=-1)
    targets = uniforms * block_cum[:, -1]
    rows = torch.arange(num_rows, device=probs.device)
    block = _search(block_cum, targets)
    before = torch.where(block > 0, block_cum[rows, (block - 1).clamp(min=0)], 0.0)
    token = _search(blocks[rows, block].double().cumsum(dim=-1), targets - before)
    return block * _DRAW_BLOCK + token


def _race(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exponential race: argmax of p_i / E_i with E_i ~ Exp(1) draws token i with probability p_i.

    Used for seeded rows because, unlike an inverse-CDF draw (where a rounding change in any
    earlier token's probability can move the boundary), the winner only changes when two
    candidates nearly tie, so the same seed gives the same tokens whatever batch the row sits in
    (batch size changes matmul blocking and so the last bits of the logits)."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device)
    return (probs / -torch.log(u)).argmax()


def _search(cumulative: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass exceeds the target; never past the last
    index that carries mass (float rounding can put a target at or beyond the total)."""
    found = torch.searchsorted(cumulative, targets.unsqueeze(1), right=True).squeeze(1)
    increments = torch.diff(cumulative, dim=-1, prepend=torch.zeros_like(cumulative[:, :1]))
    positions = torch.arange(cumulative.shape[1], device=cumulative.device)
    return torch.minimum(found, torch.where(increments > 0, positions, 0).amax(dim=-1))
