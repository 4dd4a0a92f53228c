"""Serving benchmarks over HTTP: replay production traces or synthetic arrivals
against any OpenAI-compatible endpoint and report TTFT, TPOT, ITL, end-to-end
latency and goodput. Imports nothing of loom's engine."""
