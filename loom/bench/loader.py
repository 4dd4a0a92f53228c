"""From a workload description (``azure:PATH``, ``synthetic``, ...) to a workload."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loom.bench import synthetic as syn
from loom.bench import tenants, traces
from loom.bench.workload import Workload

TRACE_KINDS = ("azure", "mooncake", "burstgpt")
KINDS = (*TRACE_KINDS, "sharegpt", "synthetic", "tenants", "sessions")
ARRIVALS = ("poisson", "gamma")

# The project's shared data sits beside the repository (shared/data); LOOM_DATA_DIR overrides.
DATA_DIR = Path(os.environ.get("LOOM_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
SHAREGPT_FILE = DATA_DIR / "sharegpt" / "ShareGPT_V3_filtered_500.json"
SONNET_FILE = DATA_DIR / "prompts" / "sonnet.txt"


@dataclass(frozen=True)
class WorkloadSpec:
    """What to replay.

    Traces carry their own arrivals and lengths. ``sharegpt`` and ``synthetic``
    get arrivals from ``arrival``/``rate``/``burstiness`` (``rate = inf`` sends
    all at once); ``synthetic`` gets lengths from ``lengths``, and ``sharegpt``
    uses ``lengths.output_len`` for conversations without an answer turn.
    """

    kind: str
    path: str | None = None
    num_requests: int = 100  # for synthetic and sharegpt
    arrival: str = "poisson"
    rate: float = math.inf
    burstiness: float = 1.0
    lengths: syn.LengthSpec = field(default_factory=syn.LengthSpec)
    burstgpt_model: str | None = None
    burstgpt_log_type: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind in (*TRACE_KINDS, "tenants", "sessions") and not self.path:
            raise ValueError(f"the {self.kind} workload needs a file: --workload {self.kind}:PATH")
        if self.kind == "synthetic" and self.path:
            raise ValueError("the synthetic workload takes no file")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival process must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.arrival == "poisson" and self.burstiness != 1.0:
            raise ValueError("burstiness needs the gamma arrival process (poisson is gamma with burstiness 1)")
        if self.num_requests < 1:
            raise ValueError(f"number of requests must be >= 1, got {self.num_requests}")

    @staticmethod
    def parse_kind(text: str) -> tuple[str, str | None]:
        """``"azure:/x.csv"`` -> ("azure", "/x.csv"); ``"synthetic"`` -> ("synthetic", None);
        a bare ``"sharegpt"`` means the project's ShareGPT file."""
        kind, sep, path = text.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"unknown workload {kind!r} in {text!r}; expected KIND[:PATH] with KIND one of {', '.join(KINDS)}")
        if not sep and kind == "sharegpt":
            return kind, str(SHAREGPT_FILE)
        return kind, (path or None)


def read_length_pairs(kind: str, path: str) -> tuple[tuple[int, int], ...]:
    """(input, output) pairs of a trace, for sampling synthetic lengths."""
    if kind not in TRACE_KINDS:
        raise ValueError(f"lengths can be sampled from {', '.join(TRACE_KINDS)} traces, not {kind!r}")
    w = {"azure": traces.load_azure, "mooncake": traces.load_mooncake, "burstgpt": traces.load_burstgpt}[kind](path)
    return tuple((r.input_len, r.output_len) for r in w)


def load_workload(spec: WorkloadSpec, count_tokens: Callable[[str], int]) -> Workload:
    """The workload ``spec`` describes, unshaped. ``count_tokens`` measures real
    prompts (ShareGPT)."""
    if spec.kind == "azure":
        return traces.load_azure(spec.path)
    if spec.kind == "mooncake":
        return traces.load_mooncake(spec.path)
    if spec.kind == "burstgpt":
        return traces.load_burstgpt(spec.path, spec.burstgpt_model, spec.burstgpt_log_type)
    if spec.kind == "tenants":
        return tenants.generate(tenants.load_spec(spec.path), spec.seed)
    burst = spec.burstiness if spec.arrival == "gamma" else 1.0
    if spec.kind == "synthetic":
        return syn.synthetic(spec.num_requests, spec.rate, spec.lengths, burst, spec.seed)
    convs = traces.load_sharegpt(spec.path, count_tokens, spec.lengths.output_len)
    # A seeded shuffle, so a short run does not always take the file's first prompts.
    order = np.random.default_rng(spec.seed).permutation(len(convs))[: spec.num_requests]
    picked = [convs[i] for i in order.tolist()]
    return syn.with_arrivals(picked, syn.arrival_times(len(picked), spec.rate, burst, spec.seed))
