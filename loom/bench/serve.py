"""One benchmark run end to end: prepared requests in, run file, plots and
table out. Shared by ``loom bench serve`` and ``loom bench peers``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loom.bench import client, fairness, metrics, plots, report, results, server_stats, sessions

log = logging.getLogger(__name__)


def normalize_base_url(url: str) -> str:
    """``http://h:p/v1/`` -> ``http://h:p``: endpoints are addressed from the root."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://, got {url!r}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def resolve_model(base_url: str, model: str | None, headers: dict[str, str] | None = None) -> str:
    """The given model name, else the first one the server lists."""
    if model:
        return model
    names = asyncio.run(client.list_models(base_url, headers))
    if not names:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return names[0]


@dataclass(frozen=True)
class Outputs:
    json_path: Path
    plots_dir: Path | None  # None: no plots


def plots_dir_for(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + "-plots")


def warm_up(prepared: sessions.Replay, cfg: client.ClientConfig, n: int) -> None:
    """Send ``n`` short requests one after another and discard them, so one-time
    costs (compilation, first allocations) stay out of the measurement."""
    if n <= 0:
        return
    first = prepared.first_turns() if isinstance(prepared, sessions.SessionWorkload) else prepared
    reqs = [replace(r, arrival=0.0, max_tokens=min(r.max_tokens, 8)) for r in first[:n]]
    one_at_a_time = replace(cfg, max_concurrency=1)
    res = asyncio.run(client.run(reqs, one_at_a_time))
    failed = [r.error for r in res.records if not r.ok]
    if failed:
        raise ValueError(f"warm-up request failed: {failed[0]}")


def run_benchmark(
    prepared: sessions.Replay,
    cfg: client.ClientConfig,
    slo: metrics.SLO,
    config: dict[str, Any],
    outputs: Outputs,
    label: str,
    progress: bool = True,
) -> results.RunFile:
    """Replay, summarize, save the run file and plots, print the table."""
    from tqdm import tqdm

    load_before = os.getloadavg()
    if load_before[0] > (os.cpu_count() or 1) / 2:
        log.warning(
            "the machine is busy before the run (1-min load %.1f on %d cores): latencies will include contention",
            load_before[0],
            os.cpu_count() or 1,
        )

    bar = tqdm(total=len(prepared), desc=label, unit="req", disable=not progress, file=sys.stderr)
    failed = 0

    def on_done(rec: client.RequestRecord) -> None:
        nonlocal failed
        failed += 0 if rec.ok else 1
        bar.update(1)
        if failed:
            bar.set_postfix(failed=failed)

    try:
        res, server = asyncio.run(_run_sampled(prepared, cfg, on_done))
    finally:
        bar.close()
    summary = {**metrics.summarize(res, slo), **fairness.summarize_groups(res.records, slo, res.duration),
               "server": server.to_json()}
    # The load average includes the server under test during the run; before it, only other work.
    host = {"cpus": os.cpu_count(), "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg())}
    full_config = {**config, "label": label, "client": _client_json(cfg), "slo": slo.to_json(), "host": host}
    results.save(outputs.json_path, full_config, summary, res)
    if outputs.plots_dir is not None:
        outputs.plots_dir.mkdir(parents=True, exist_ok=True)
        plots.plot_latency_cdfs([(label, res.records)], outputs.plots_dir / "latency_cdf.png")
        plots.plot_timeline(label, res.records, res.duration, outputs.plots_dir / "timeline.png")
        if "tenants" in summary:
            plots.plot_tenant_service(label, res.records, res.duration, outputs.plots_dir / "tenant_service.png")
    report.print_summary(label, summary)
    if server.peak_running is not None:
        usage = "-" if server.peak_kv_usage is None else f"{server.peak_kv_usage:.0%}"
        preempted = "-" if server.preemptions is None else f"{server.preemptions:.0f}"
        hits = "-" if server.prefix_cache_hit_rate is None else f"{server.prefix_cache_hit_rate:.1%}"
        spec = ("" if server.spec_acceptance_rate is None else
                f", speculation: {server.spec_acceptance_rate:.1%} of drafts accepted, "
                f"{server.spec_mean_accepted or 0:.2f} per verification")
        print(f"server (/metrics): peak running {server.peak_running:.0f}, peak KV cache usage {usage}, "
              f"preemptions {preempted}, prefix cache hit rate {hits}{spec}")
    first_error = next((r.error for r in res.records if not r.ok), None)
    if first_error:
        log.warning("%d request(s) failed; first error: %s", summary["failed"], first_error)
    print(f"run file: {outputs.json_path}" + (f"; plots: {outputs.plots_dir}" if outputs.plots_dir else ""))
    return results.RunFile(config=full_config, summary=summary, requests=res.records)


async def _run_sampled(prepared: sessions.Replay, cfg: client.ClientConfig,
                       on_done: Any) -> tuple[client.RunResult, server_stats.ServerStats]:
    """The replay, with the server's own /metrics scraped alongside it."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(server_stats.sample(cfg.base_url, cfg.headers, stop))
    try:
        if isinstance(prepared, sessions.SessionWorkload):
            res = await sessions.run(prepared, cfg, on_done)
        else:
            res = await client.run(prepared, cfg, on_done)
    finally:
        stop.set()
    return res, await sampler


def _client_json(cfg: client.ClientConfig) -> dict[str, Any]:
    return {
        "base_url": cfg.base_url,
        "model": cfg.model,
        "endpoint": cfg.endpoint,
        "ignore_eos": cfg.ignore_eos,
        "max_concurrency": cfg.max_concurrency,
        "request_timeout": cfg.request_timeout,
        "extra_body": cfg.extra_body,
    }
