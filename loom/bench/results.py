"""The run file: ``{"config": ..., "summary": ..., "requests": [...]}``.

``config`` says what was run (endpoint, workload and how it was shaped, SLOs);
``summary`` is :func:`loom.bench.metrics.summarize`; ``requests`` holds one
:class:`loom.bench.client.RequestRecord` per request with its chunk times, so
any metric can be recomputed later.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom.bench.client import RequestRecord, RunResult

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RunFile:
    config: dict[str, Any]
    summary: dict[str, Any]
    requests: list[RequestRecord]

    @property
    def label(self) -> str:
        return str(self.config.get("label") or self.config.get("base_url") or "run")


def save(path: str | os.PathLike, config: dict[str, Any], summary: dict[str, Any], result: RunResult) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "config": {**config, "started_at": result.started_at},
        "summary": summary,
        "requests": [r.to_json() for r in result.records],
    }
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True))
    tmp.replace(p)
    return p


def load(path: str | os.PathLike) -> RunFile:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read a run file ({e})") from None
    for key in ("config", "summary", "requests"):
        if key not in doc:
            raise ValueError(f"{p}: not a loom bench run file (no {key!r})")
    return RunFile(config=doc["config"], summary=doc["summary"], requests=[RequestRecord.from_json(r) for r in doc["requests"]])
