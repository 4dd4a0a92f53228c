"""Readers for production trace formats. Each returns a workload sorted by
arrival and rebased so the first request arrives at time 0.

- Azure LLM inference 2023: CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``.
- Mooncake (FAST'25): JSONL ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``.
- BurstGPT: CSV ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``.
- ShareGPT: JSON ``[{"id", "conversations": [{"from", "value"}, ...]}]``; real prompts.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from datetime import datetime

from loom.bench.workload import MOONCAKE_BLOCK_TOKENS, TraceRequest, Workload, sort_and_rebase

PathLike = str | os.PathLike


def _csv_rows(path: PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) and check the header names the required columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing CSV column(s) {missing}; header is {header}")
        reader.fieldnames = header
        for row in reader:
            yield reader.line_num, row


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} is not a number") from None


def load_azure(path: PathLike) -> Workload:
    """Azure LLM inference trace 2023 (code or conversation)."""
    out = []
    t0: datetime | None = None
    for line, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        where = f"{path}:{line}"
        try:
            ts = datetime.fromisoformat(row["TIMESTAMP"].strip())
        except ValueError:
            raise ValueError(f"{where}: bad TIMESTAMP {row['TIMESTAMP']!r}") from None
        t0 = ts if t0 is None else min(t0, ts)
        context = _int(row["ContextTokens"], "ContextTokens", where)
        generated = _int(row["GeneratedTokens"], "GeneratedTokens", where)
        if context < 1 or generated < 1:
            continue  # nothing to replay: an empty prompt or no output
        out.append((ts, context, generated))
    return sort_and_rebase([TraceRequest(arrival=(ts - t0).total_seconds(), input_len=c, output_len=g) for ts, c, g in out])


def load_mooncake(path: PathLike) -> Workload:
    """Mooncake JSONL trace; timestamps are milliseconds, each hash id a 512-token block."""
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
                ts = float(rec["timestamp"]) / 1000.0
                input_len = int(rec["input_length"])
                output_len = int(rec["output_length"])
                hash_ids = tuple(int(h) for h in rec.get("hash_ids", ()))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: bad Mooncake record ({type(e).__name__}: {e})") from None
            if input_len < 1 or output_len < 1:
                continue
            if hash_ids and len(hash_ids) * MOONCAKE_BLOCK_TOKENS < input_len:
                raise ValueError(
                    f"{where}: {len(hash_ids)} hash ids cover {len(hash_ids) * MOONCAKE_BLOCK_TOKENS} tokens,"
                    f" fewer than input_length {input_len}"
                )
            out.append(TraceRequest(arrival=ts, input_len=input_len, output_len=output_len, hash_ids=hash_ids))
    return sort_and_rebase(out)


def load_burstgpt(path: PathLike, model: str | None = None, log_type: str | None = None) -> Workload:
    """BurstGPT trace. Rows with 0 response tokens are failed requests and are
    skipped, as the BurstGPT authors do in their ``without_fails`` files; so are
    rows with an empty request. ``model`` ("ChatGPT", "GPT-4") and ``log_type``
    ("Conversation log", "API log") filter rows when given."""
    cols = ("Timestamp", "Model", "Request tokens", "Response tokens", "Log Type")
    out = []
    for line, row in _csv_rows(path, cols):
        where = f"{path}:{line}"
        if model is not None and row["Model"].strip() != model:
            continue
        if log_type is not None and row["Log Type"].strip() != log_type:
            continue
        try:
            ts = float(row["Timestamp"])
        except ValueError:
            raise ValueError(f"{where}: bad Timestamp {row['Timestamp']!r}") from None
        request = _int(row["Request tokens"], "Request tokens", where)
        response = _int(row["Response tokens"], "Response tokens", where)
        if response < 1 or request < 1:
            continue
        out.append(TraceRequest(arrival=ts, input_len=request, output_len=response))
    return sort_and_rebase(out)


def load_sharegpt(
    path: PathLike,
    count_tokens: Callable[[str], int],
    default_output_len: int | None = None,
) -> Workload:
    """First human turn of each ShareGPT conversation as a real prompt.

    The output length is the token count of the following assistant turn when
    the file has one, else ``default_output_len``; conversations with neither are
    an error, since the replay must know how many tokens to ask for. All arrive
    at time 0; give them arrivals with :func:`loom.bench.synthetic.with_arrivals`.
    """
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    out = []
    for i, conv in enumerate(data):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not turns:
            raise ValueError(f"{path}: entry {i} has no 'conversations'")
        first = next((k for k, t in enumerate(turns) if t.get("from") == "human"), None)
        if first is None or not str(turns[first].get("value", "")).strip():
            continue
        prompt = str(turns[first]["value"])
        answer = turns[first + 1] if first + 1 < len(turns) else None
        if answer is not None and answer.get("from") in ("gpt", "assistant") and str(answer.get("value", "")).strip():
            output_len = count_tokens(str(answer["value"]))
        elif default_output_len is not None:
            output_len = default_output_len
        else:
            raise ValueError(f"{path}: entry {i} has no answer turn; give an output length")
        out.append(
            TraceRequest(arrival=0.0, input_len=max(1, count_tokens(prompt)), output_len=max(1, output_len), prompt=prompt)
        )
    if not out:
        raise ValueError(f"{path}: no usable conversations")
    return out
