"""Multi-turn sessions (``--workload sessions:SPEC``): conversations whose next turn is sent only
after the previous answer arrived and a think time passed (a user reading, a tool running), with
the whole conversation so far as its prompt, on ``/v1/completions`` with a ``session_id``.

A spec is a JSON object (a file, or inline text starting with ``{``)::

    {"sessions": 24, "rate": 0.5, "turns": 4, "first_input_len": 512, "turn_input_len": 64,
     "output_len": 64, "think_time": 8.0, "think": "exponential"}

Sessions start as a Poisson process of ``rate`` per second; each turn adds ``turn_input_len``
tokens of new text after the previous prompt and answer; think times are exponential with mean
``think_time`` seconds (or exactly that, with ``"think": "fixed"``)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from loom.bench.client import COMPLETIONS, ClientConfig, RequestRecord, RunClock, RunResult, http_client, send_one
from loom.bench.prompts import PreparedRequest, PromptBuilder
from loom.bench.tenants import build_spec
from loom.bench.workload import TraceRequest
from loom.json_source import json_object

MAX_TURNS = 100_000


@dataclass(frozen=True)
class SessionSpec:
    sessions: int
    rate: float
    turns: int
    first_input_len: int
    turn_input_len: int
    output_len: int
    think_time: float
    think: str = "exponential"
    # One-off requests without a session, sent open-loop while the sessions run (0: none): they
    # compete with the sessions' cached prefixes for the KV cache.
    background_rate: float = 0.0
    background_input_len: int = 256
    background_output_len: int = 16

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "first_input_len", "turn_input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"session workload: {name} must be >= 1")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"session workload: rate must be a finite number > 0 sessions/s, got {self.rate}")
        if not (self.think_time >= 0 and math.isfinite(self.think_time)):
            raise ValueError(f"session workload: think_time must be a finite number of seconds >= 0, got {self.think_time}")
        if self.think not in ("exponential", "fixed"):
            raise ValueError(f"session workload: think must be exponential or fixed, got {self.think!r}")
        if not (self.background_rate >= 0 and math.isfinite(self.background_rate)):
            raise ValueError(f"session workload: background_rate must be a finite number >= 0, got {self.background_rate}")
        if self.background_input_len < 1 or self.background_output_len < 1:
            raise ValueError("session workload: background_input_len and background_output_len must be >= 1")
        if self.sessions * self.turns > MAX_TURNS:
            raise ValueError(f"session workload: {self.sessions * self.turns} turns; at most {MAX_TURNS}")


def load_spec(text: str) -> SessionSpec:
    return build_spec(SessionSpec, json_object(text, "session workload"), "session workload")


@dataclass(frozen=True)
class SessionWorkload:
    """Everything a replay needs, drawn once: when each session starts, its texts (the first prompt,
    then each later turn's new text) and its think times."""

    starts: tuple[float, ...]
    texts: tuple[tuple[str, ...], ...]
    thinks: tuple[tuple[float, ...], ...]
    output_len: int
    background: tuple[PreparedRequest, ...]  # one-off requests, open loop
    count_tokens: Callable[[str], int] = field(compare=False, repr=False)  # the harness's count of a prompt

    @property
    def num_requests(self) -> int:
        return sum(len(t) for t in self.texts) + len(self.background)

    def __len__(self) -> int:
        return self.num_requests

    def first_turns(self) -> list[PreparedRequest]:
        return [PreparedRequest(index=i, arrival=s, prompt=t[0], prompt_len=0, max_tokens=self.output_len)
                for i, (s, t) in enumerate(zip(self.starts, self.texts))]


def build(spec: SessionSpec, builder: PromptBuilder, seed: int = 0) -> SessionWorkload:
    """Draw the starts, texts and think times (prompts of corpus text from ``builder``)."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / spec.rate, spec.sessions - 1))]).tolist()
    lengths = [spec.first_input_len if k == 0 else spec.turn_input_len for _ in range(spec.sessions)
               for k in range(spec.turns)]
    texts = [p.prompt for p in builder.prepare([TraceRequest(0.0, n, 1) for n in lengths])]
    if spec.think == "fixed":
        thinks = np.full((spec.sessions, max(spec.turns - 1, 0)), spec.think_time)
    else:
        thinks = rng.exponential(spec.think_time, (spec.sessions, max(spec.turns - 1, 0))) if spec.think_time else \
            np.zeros((spec.sessions, max(spec.turns - 1, 0)))
    per = spec.turns
    background: list[PreparedRequest] = []
    if spec.background_rate > 0:
        horizon = starts[-1] + spec.turns * (spec.think_time + 1.0)  # about as long as the sessions run
        times = np.cumsum(rng.exponential(1.0 / spec.background_rate, int(horizon * spec.background_rate * 2) + 1))
        times = times[times < horizon]
        trace = [TraceRequest(float(t), spec.background_input_len, spec.background_output_len) for t in times]
        first = spec.sessions * per
        background = [replace(p, index=first + i) for i, p in enumerate(builder.prepare(trace))]
    return SessionWorkload(
        starts=tuple(starts),
        texts=tuple(tuple(texts[i * per : (i + 1) * per]) for i in range(spec.sessions)),
        thinks=tuple(tuple(row) for row in thinks.tolist()),
        output_len=spec.output_len,
        background=tuple(background),
        count_tokens=lambda text: len(builder.tokenizer.encode(text)),
    )


Replay = Sequence[PreparedRequest] | SessionWorkload  # open-loop requests, or closed-loop sessions


async def run(workload: SessionWorkload, cfg: ClientConfig,
              on_done: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Every session as its own closed loop; turns are records ``session * turns + turn``."""
    if cfg.endpoint != COMPLETIONS:
        raise ValueError("the sessions workload sends whole conversations as prompts: use --endpoint completions")
    records: list[RequestRecord] = []
    async with http_client(cfg) as client:
        clock = RunClock()

        async def session(i: int) -> None:
            texts, thinks = workload.texts[i], workload.thinks[i]
            due = workload.starts[i]
            history = ""
            for k, text in enumerate(texts):
                await asyncio.sleep(max(0.0, due - clock()))
                prompt = history + text
                req = PreparedRequest(index=i * len(texts) + k, arrival=due, prompt=prompt,
                                      prompt_len=workload.count_tokens(prompt), max_tokens=workload.output_len,
                                      session_id=f"session-{i}", turn=k)
                rec = await send_one(client, cfg, req, clock)
                records.append(rec)
                if on_done is not None:
                    on_done(rec)
                if not rec.ok:
                    return  # the conversation cannot go on without its answer
                history = prompt + rec.text
                due = rec.finished + (thinks[k] if k < len(thinks) else 0.0)

        async def one_off(req: PreparedRequest) -> None:
            await asyncio.sleep(max(0.0, req.arrival - clock()))
            rec = await send_one(client, cfg, req, clock)
            records.append(rec)
            if on_done is not None:
                on_done(rec)

        await asyncio.gather(*(session(i) for i in range(len(workload.texts))),
                             *(one_off(r) for r in workload.background))
        duration = clock()
    return RunResult(records=sorted(records, key=lambda r: r.index), duration=duration, started_at=clock.started_at)

