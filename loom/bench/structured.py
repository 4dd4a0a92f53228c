"""``loom bench structured``: JSON-schema constrained decoding, on real-world and hand-written
schemas. Three measurements:

1. compile: every schema of the OpenAI API spec (``components.schemas``, each resolved into a
   self-contained schema) and the hand-written ones below are compiled fresh; the time of each,
   the time of its first token mask, and why the compiler rejects the ones it rejects;
2. validity: a selection of the compilable schemas is generated with the model (the schema in a
   chat prompt, greedy plus a few seeded temperature-1 samples), and each document that finished
   with "stop" is parsed and validated against its schema (jsonschema_rs). Outputs cut by
   max_tokens are counted apart, never as valid documents;
3. overhead: the median decode step (``engine.step()`` wall time) with every request of the batch
   constrained, against the same prompts unconstrained (``ignore_eos``), over the same number of
   decode steps, and how much of the step the token-mask fill takes.

The OpenAI spec is read at run time from the project's shared data (``--schemas-from``); nothing
of it is stored in the repository.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom.bench.loader import DATA_DIR

OPENAPI_FILE = DATA_DIR / "openai-openapi" / "openapi.yaml"

# Schemas written for this benchmark: one feature each (they also appear mixed in the OpenAI ones).
HAND_WRITTEN: dict[str, dict[str, Any]] = {
    "enums": {
        "type": "object",
        "properties": {"status": {"enum": ["open", "closed", "pending"]},
                       "priority": {"type": "integer", "enum": [1, 2, 3]},
                       "color": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["status", "priority", "color"],
        "additionalProperties": False,
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string", "maxLength": 60},
                               "city": {"type": "string", "maxLength": 40},
                               "geo": {"type": "object",
                                       "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                                       "required": ["lat", "lon"], "additionalProperties": False}},
                "required": ["street", "city", "geo"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 4},
                       "scores": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}},
        "required": ["tags", "scores"],
        "additionalProperties": False,
    },
    "patterns": {
        "type": "object",
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                       "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
                       "hex_color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
        "required": ["sku", "zip", "hex_color"],
        "additionalProperties": False,
    },
    "number_bounds": {
        "type": "object",
        "properties": {"temperature_c": {"type": "number", "minimum": -50, "maximum": 60},
                       "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
                       "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                       "count": {"type": "integer", "minimum": 1, "maximum": 12}},
        "required": ["temperature_c", "humidity", "price", "count"],
        "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 16}]},
            "shape": {"anyOf": [
                {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}},
                 "required": ["kind", "radius"], "additionalProperties": False},
                {"type": "object", "properties": {"kind": {"const": "rect"}, "width": {"type": "number", "minimum": 0},
                                                  "height": {"type": "number", "minimum": 0}},
                 "required": ["kind", "width", "height"], "additionalProperties": False},
            ]},
        },
        "required": ["id", "shape"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1},
                       "nickname": {"type": "string", "maxLength": 20},
                       "email": {"type": "string", "maxLength": 40},
                       "active": {"type": "boolean"},
                       "note": {"type": ["string", "null"], "maxLength": 40}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "string_formats": {
        "type": "object",
        "properties": {"email": {"type": "string", "format": "email"},
                       "date": {"type": "string", "format": "date"},
                       "created_at": {"type": "string", "format": "date-time"},
                       "id": {"type": "string", "format": "uuid"}},
        "required": ["email", "date", "created_at", "id"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                           "unit_price": {"type": "number", "minimum": 0}},
            "required": ["name", "qty", "unit_price"],
            "additionalProperties": False,
        }}},
        "required": ["items"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 6}, "minItems": 3, "maxItems": 5},
}

# -- the OpenAI spec: components.schemas -> self-contained JSON schemas -------------------------
_REF_PREFIX = "#/components/schemas/"
# Keywords whose value maps names to schemas, is a list of schemas, or is one schema (or a list,
# for the old ``items``): only these are walked, so property *names* are never mistaken for keywords.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SCHEMA_ONE = frozenset({"items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
                         "propertyNames", "unevaluatedProperties", "unevaluatedItems"})
# OpenAPI keywords that are no JSON Schema (``nullable`` is OpenAPI 3.0's; 3.1 spells it with a
# "null" type, and a JSON Schema validator ignores it, so it is dropped for both sides alike).
_OPENAPI_ONLY = frozenset({"discriminator", "deprecated", "example", "examples", "nullable", "xml", "externalDocs",
                           "readOnly", "writeOnly"})


def _clean(node: Any, deps: set[str]) -> Any:
    """A copy of the schema ``node`` without OpenAPI-only keywords, its component refs rewritten
    to ``#/$defs/NAME``; the names it refers to are added to ``deps``."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-") or key in _OPENAPI_ONLY:
            continue
        if key == "$ref" and isinstance(value, str) and value.startswith(_REF_PREFIX):
            deps.add(value[len(_REF_PREFIX):])
            out[key] = "#/$defs/" + value[len(_REF_PREFIX):]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _clean(s, deps) for name, s in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_clean(s, deps) for s in value]
        elif key in _SCHEMA_ONE:
            out[key] = [_clean(s, deps) for s in value] if isinstance(value, list) else _clean(value, deps)
        else:
            out[key] = value
    return out


def resolve_component(components: dict[str, Any], name: str) -> dict[str, Any]:
    """``components[name]`` as a self-contained schema: every component it refers to, directly or
    not, under ``$defs`` (itself too, if it is recursive)."""
    deps: set[str] = set()
    root = _clean(components[name], deps)
    defs: dict[str, Any] = {}
    todo = sorted(deps)
    while todo:
        dep = todo.pop()
        if dep in defs:
            continue
        if dep not in components:
            raise KeyError(f"{name} refers to the missing component {dep!r}")
        more: set[str] = set()
        defs[dep] = _clean(components[dep], more)
        todo.extend(sorted(more - defs.keys()))
    if defs:
        root = {**root, "$defs": dict(sorted(defs.items()))}
    return root


def load_openai_schemas(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every schema of the spec's ``components.schemas``, resolved, by name (sorted)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        spec = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    components = spec["components"]["schemas"]
    return {name: resolve_component(components, name) for name in sorted(components)}


# -- compiling -------------------------------------------------------------------------------
def _reason(error: Exception) -> str:
    """A rejection reason that groups alike: its first line, lengths and names blanked."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"is \d+ characters long", "is N characters long", text)
    return text


def compile_scan(engine: Any, schemas: dict[str, tuple[str, dict[str, Any]]]) -> tuple[float, list[dict[str, Any]]]:
    """Compile every schema afresh with a compiler of its own (one grammar cached at a time, so
    nothing is a cache hit), on the engine's tokenizer. Returns the one-off seconds of building
    llguidance's tokenizer, and per schema: its compile time, the time of its first token mask,
    or why it was rejected."""
    from loom.structured import GrammarCompiler, StructuredOutputs, new_bitmask

    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids, cache_size=1)
    t0 = time.perf_counter()
    compiler._llguidance_tokenizer()  # the one-off: every compile after this reuses it
    tokenizer_s = time.perf_counter() - t0
    mask = new_bitmask(1, compiler.vocab_size)
    rows = []
    for name, (source, schema) in schemas.items():
        row: dict[str, Any] = {"name": name, "source": source, "chars": len(json.dumps(schema, separators=(",", ":")))}
        try:
            spec = StructuredOutputs(json=schema)
            compiler.compile(spec)
        except ValueError as e:  # GrammarError, or the engine's size limit
            rows.append(row | {"ok": False, "reason": _reason(e)})
            continue
        compile_s = compiler.compile_seconds[(spec.kind, spec.source)]
        t = time.perf_counter()
        compiler.new_state(spec).fill_bitmask(mask, 0)
        row |= {"ok": True, "compile_ms": compile_s * 1e3, "first_mask_ms": (time.perf_counter() - t) * 1e3}
        try:  # outputs are checked against the schema: the validator must take it too
            validator(schema)
        except Exception as e:  # noqa: BLE001 - jsonschema_rs raises its own types
            row["validator_error"] = str(e).strip().splitlines()[0][:200]
        rows.append(row)
    return tokenizer_s, rows


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max": ordered[-1], "mean": statistics.fmean(ordered)}


def compile_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["ok"]]
    slowest = max(ok, key=lambda r: r["compile_ms"], default=None)
    return {
        "schemas": len(rows),
        "compiled": len(ok),
        "skipped": len(rows) - len(ok),
        "skipped_by_reason": dict(Counter(r["reason"] for r in rows if not r["ok"]).most_common()),
        "compile_ms": _dist([r["compile_ms"] for r in ok]),
        "first_mask_ms": _dist([r["first_mask_ms"] for r in ok]),
        # Compiled, but not valid JSON Schema by the validator's meta-schema (never generated with).
        "validator_rejects": sorted(r["name"] for r in ok if "validator_error" in r),
        "slowest": None if slowest is None else {"name": slowest["name"], "compile_ms": slowest["compile_ms"],
                                                 "chars": slowest["chars"]},
    }


def select_openai(rows: list[dict[str, Any]], count: int, max_chars: int) -> list[str]:
    """``count`` compilable OpenAI schemas of at most ``max_chars`` characters (they go into the
    prompt), evenly spaced over the name-sorted list: the same selection on every run."""
    eligible = [r["name"] for r in rows
                if r["source"] == "openai" and r["ok"] and "validator_error" not in r and r["chars"] <= max_chars]
    if count >= len(eligible):
        return eligible
    return [eligible[(i * len(eligible)) // count] for i in range(count)]


# -- validity --------------------------------------------------------------------------------
VALID, INVALID_JSON, INVALID_SCHEMA, LENGTH, OTHER = "valid", "invalid_json", "schema_mismatch", "length", "other"


def validator(schema: dict[str, Any]) -> Any:
    import jsonschema_rs

    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


def check_output(check: Any, text: str, finish_reason: str | None) -> tuple[str, str | None]:
    """(status, error) of one generated document: ``valid`` only when generation stopped on its
    own ("stop") and the text parses as JSON and validates; ``length`` for output cut by
    max_tokens (never valid, whatever its text); ``other`` for anything else (abort)."""
    if finish_reason == "length":
        return LENGTH, None
    if finish_reason != "stop":
        return OTHER, f"finish_reason {finish_reason!r}"
    try:
        doc = json.loads(text)
    except ValueError as e:
        return INVALID_JSON, str(e)
    errors = list(check.iter_errors(doc))
    if errors:
        return INVALID_SCHEMA, f"{len(errors)} errors, first: {errors[0].message[:200]}"
    return VALID, None


def build_prompt(tokenizer: Any, schema: dict[str, Any]) -> list[int]:
    text = ("Write one example JSON document that matches the following JSON schema. "
            "Reply with the JSON document only.\n\n" + json.dumps(schema, separators=(",", ":")))
    if tokenizer.chat_template is None:
        return tokenizer.encode(text + "\n\nJSON:")
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)


@dataclass
class Case:
    name: str
    source: str  # "openai" or "hand"
    schema: dict[str, Any]
    prompt: list[int]


def run_generation(engine: Any, cases: list[Case], num_samples: int, max_tokens: int, seed: int,
                   progress: bool = False) -> list[dict[str, Any]]:
    """All requests at once (the engine batches them): per case one greedy request and
    ``num_samples`` seeded temperature-1 ones. Per case, each output's status."""
    from loom.sampling import SamplingParams
    from loom.structured import StructuredOutputs

    pending: dict[str, tuple[int, int]] = {}  # request id -> (case, sample)
    for ci, case in enumerate(cases):
        spec = StructuredOutputs(json=case.schema)
        for si in range(1 + num_samples):
            greedy = si == 0
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 1.0,
                                    seed=None if greedy else seed + si, structured_outputs=spec)
            rid = f"g{ci}-{si}"
            engine.add_request(rid, case.prompt, params)
            pending[rid] = (ci, si)
    results = [{"name": c.name, "source": c.source, "prompt_tokens": len(c.prompt), "outputs": [None] * (1 + num_samples)}
               for c in cases]
    checks = [validator(c.schema) for c in cases]
    total, done, t0 = len(pending), 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            ci, si = pending.pop(out.request_id)
            c = out.outputs[0]
            status, error = check_output(checks[ci], c.text, c.finish_reason)
            results[ci]["outputs"][si] = {"sample": "greedy" if si == 0 else f"t1-seed{seed + si}", "status": status,
                                          "finish_reason": c.finish_reason, "tokens": len(c.token_ids),
                                          "error": error, "text": c.text}
            done += 1
            if progress:
                print(f"\r  generated {done}/{total} ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    if progress:
        print()
    return results


def validity_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    outs = [o for r in results for o in r["outputs"]]
    counts = Counter(o["status"] for o in outs)
    stopped = sum(1 for o in outs if o["finish_reason"] == "stop")
    greedy = [r["outputs"][0] for r in results]
    g_stopped = sum(1 for o in greedy if o["finish_reason"] == "stop")
    return {
        "outputs": len(outs),
        "finished_stop": stopped,
        "valid": counts[VALID],
        "invalid_json": counts[INVALID_JSON],
        "schema_mismatch": counts[INVALID_SCHEMA],
        "length_cut": counts[LENGTH],
        "other": counts[OTHER],
        "validity": counts[VALID] / stopped if stopped else None,  # valid / finished with "stop"
        "greedy": {"outputs": len(greedy), "finished_stop": g_stopped,
                   "valid": sum(1 for o in greedy if o["status"] == VALID),
                   "length_cut": sum(1 for o in greedy if o["status"] == LENGTH)},
        "output_tokens": _dist([float(o["tokens"]) for o in outs]),
    }


# -- step-time overhead ----------------------------------------------------------------------
class _MaskTimer:
    """Times the worker's ``_grammar_bitmask`` (the token-mask fill of every constrained row)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.seconds = 0.0
        self._inner = worker._grammar_bitmask

    def __enter__(self) -> _MaskTimer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return self._inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        self.worker._grammar_bitmask = timed  # an instance attribute shadows the static method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.worker._grammar_bitmask


def _decode_steps(engine: Any, prompts: list[list[int]], params: list[Any], steps: int, tag: str) -> list[dict[str, float]]:
    """Add the requests, run their prefills, then time up to ``steps`` decode steps while every
    one of them is still running (a full batch). Per step: wall, mask fill, sample and forward
    seconds. The requests are aborted afterwards."""
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    started: set[str] = set()
    finished: set[str] = set()
    while len(started | finished) < len(ids) and engine.has_unfinished_requests():
        for o in engine.step():
            if o.outputs[0].token_ids:
                started.add(o.request_id)
            if o.finished:
                finished.add(o.request_id)
    rows: list[dict[str, float]] = []
    worker = engine.worker
    with _MaskTimer(worker) as timer:
        while len(rows) < steps and not finished:
            mask0, sample0, fwd0 = timer.seconds, worker.phase_seconds["sample"], worker.phase_seconds["forward"]
            t = time.perf_counter()
            outs = engine.step()
            wall = time.perf_counter() - t
            rows.append({"wall": wall, "mask": timer.seconds - mask0, "sample": worker.phase_seconds["sample"] - sample0,
                         "forward": worker.phase_seconds["forward"] - fwd0})
            finished |= {o.request_id for o in outs if o.finished}
    for rid in ids:
        engine.abort_request(rid)
    return rows


def _median_ms(rows: list[dict[str, float]], key: str) -> float | None:
    return statistics.median(r[key] for r in rows) * 1e3 if rows else None


def measure_overhead(engine: Any, cases: list[Case], batch: int, steps: int, rounds: int) -> dict[str, Any]:
    """Median decode step with all ``batch`` requests constrained (greedy) against the same
    prompts unconstrained (greedy, ``ignore_eos``), over the same number of decode steps: each
    round runs both batches, the constrained one first in even rounds and second in odd ones
    (so drift and warm-up weigh on both alike), and keeps as many steps of each as both ran with
    a full batch. Besides the wall time of the step, the time outside the forward pass (the
    forward pass does the same work with or without a grammar, and is where the noise of a
    shared machine lands)."""
    from loom.sampling import SamplingParams
    from loom.structured import StructuredOutputs

    picked = [cases[i % len(cases)] for i in range(batch)]  # a case may be there more than once
    prompts = [c.prompt for c in picked]
    constrained_rows: list[dict[str, float]] = []
    free_rows: list[dict[str, float]] = []
    cparams = [SamplingParams(max_tokens=steps + 4, temperature=0.0, structured_outputs=StructuredOutputs(json=c.schema))
               for c in picked]
    fparams = [SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)] * batch
    for r in range(rounds):
        runs = {}
        for kind in (("c", "f") if r % 2 == 0 else ("f", "c")):
            runs[kind] = _decode_steps(engine, prompts, cparams if kind == "c" else fparams, steps, f"{kind}{batch}-{r}")
        n = min(len(runs["c"]), len(runs["f"]))
        constrained_rows += runs["c"][:n]
        free_rows += runs["f"][:n]
    for row in constrained_rows + free_rows:
        row["rest"] = row["wall"] - row["forward"]
    c_med, f_med = _median_ms(constrained_rows, "wall"), _median_ms(free_rows, "wall")
    out: dict[str, Any] = {
        "batch": batch,
        "schemas": [c.name for c in picked],
        "steps": len(constrained_rows),
        "free_ms_per_step": f_med,
        "constrained_ms_per_step": c_med,
        "overhead_pct": (c_med / f_med - 1) * 100 if c_med and f_med else None,
    }
    if constrained_rows:
        c_rest, f_rest = _median_ms(constrained_rows, "rest"), _median_ms(free_rows, "rest")
        mask = _median_ms(constrained_rows, "mask")
        out["outside_forward_overhead_pct"] = (c_rest - f_rest) / f_med * 100 if f_med else None
        out["constrained"] = {"mask_fill_ms": mask, "mask_fill_mean_ms": statistics.fmean(r["mask"] for r in constrained_rows) * 1e3,
                              "sample_ms": _median_ms(constrained_rows, "sample"),
                              "sample_without_mask_ms": statistics.median(r["sample"] - r["mask"] for r in constrained_rows) * 1e3,
                              "forward_ms": _median_ms(constrained_rows, "forward"), "outside_forward_ms": c_rest}
        out["free"] = {"sample_ms": _median_ms(free_rows, "sample"), "forward_ms": _median_ms(free_rows, "forward"),
                       "outside_forward_ms": f_rest}
        out["mask_fill_share_of_step"] = mask / c_med if c_med else None
    return out


def overhead_cases(cases: list[Case], results: list[dict[str, Any]], steps: int) -> list[Case]:
    """The cases whose greedy output ran longer than ``steps`` tokens (cut ones too), longest
    first, so that a batch of them stays full for all the timed decode steps; without such cases,
    the longest one. ``measure_overhead`` cycles through them to fill a batch."""
    lengths = {r["name"]: r["outputs"][0]["tokens"] for r in results}
    ordered = sorted(cases, key=lambda c: lengths[c.name], reverse=True)
    return [c for c in ordered if lengths[c.name] > steps + 1] or ordered[:1]


# -- the benchmark ---------------------------------------------------------------------------
def run_benchmark(engine: Any, *, openai: dict[str, dict[str, Any]], hand: dict[str, dict[str, Any]], num_openai: int,
                  max_schema_chars: int, num_samples: int, max_tokens: int, batch_sizes: list[int], decode_steps: int,
                  rounds: int, seed: int = 0, progress: bool = False, log: Any = print) -> dict[str, Any]:
    """The whole benchmark on ``engine``; returns the report (see ``main`` for its printing)."""
    all_schemas = {name: ("hand", s) for name, s in hand.items()} | {name: ("openai", s) for name, s in openai.items()}
    log(f"compiling {len(all_schemas)} schemas ({len(openai)} from the OpenAI spec, {len(hand)} hand-written) ...")
    tokenizer_s, rows = compile_scan(engine, all_schemas)
    report: dict[str, Any] = {
        "llguidance_tokenizer_s": tokenizer_s,
        "compile": {"openai": compile_summary([r for r in rows if r["source"] == "openai"]),
                    "hand": compile_summary([r for r in rows if r["source"] == "hand"])},
        "compile_per_schema": rows,
    }
    by_name = {r["name"]: r for r in rows}
    names = [n for n in hand if by_name[n]["ok"] and "validator_error" not in by_name[n]] + select_openai(rows, num_openai, max_schema_chars)
    cases = [Case(n, all_schemas[n][0], all_schemas[n][1], build_prompt(engine.tokenizer, all_schemas[n][1])) for n in names]
    report["generation_compile"] = compile_summary([by_name[n] for n in names])
    log(f"generating: {len(cases)} schemas x (greedy + {num_samples} samples), max_tokens {max_tokens} ...")
    t0 = time.perf_counter()
    results = run_generation(engine, cases, num_samples, max_tokens, seed, progress)
    for r in results:
        r["compile_ms"] = by_name[r["name"]]["compile_ms"]
        r["chars"] = by_name[r["name"]]["chars"]
    report["generation"] = {"num_schemas": len(cases), "num_openai": sum(c.source == "openai" for c in cases),
                            "num_hand": sum(c.source == "hand" for c in cases), "num_samples": num_samples,
                            "max_tokens": max_tokens, "seconds": time.perf_counter() - t0}
    report["validity"] = validity_summary(results)
    report["per_schema"] = results
    ordered = overhead_cases(cases, results, decode_steps)
    report["overhead"] = []
    for b in batch_sizes:
        log(f"overhead at batch {b} ...")
        report["overhead"].append(measure_overhead(engine, ordered, b, decode_steps, rounds))
    return report


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    print(f"\nllguidance tokenizer (one-off): {report['llguidance_tokenizer_s'] * 1e3:.0f} ms")
    for label, key in (("OpenAI spec", "openai"), ("hand-written", "hand")):
        c = report["compile"][key]
        if not c["schemas"]:
            continue
        print(f"{label}: {c['schemas']} schemas, {c['compiled']} compile, {c['skipped']} skipped")
        for reason, n in c["skipped_by_reason"].items():
            print(f"    {n:5d}  {reason}")
        if c["validator_rejects"]:
            print(f"    {len(c['validator_rejects'])} compile but are no valid JSON Schema to the validator "
                  f"(not generated with): {', '.join(c['validator_rejects'][:5])}")
        if c["compiled"]:
            cm, fm = c["compile_ms"], c["first_mask_ms"]
            print(f"    compile ms: median {cm['median']:.2f}, p90 {cm['p90']:.2f}, max {cm['max']:.2f} ({c['slowest']['name']}); "
                  f"first mask ms: median {fm['median']:.2f}, max {fm['max']:.2f}")
    print(f"\n{'schema':<44} {'src':<6} {'chars':>6} {'compile ms':>10} {'prompt':>6}  outputs (status/tokens)")
    short = {VALID: "ok", INVALID_JSON: "BADJSON", INVALID_SCHEMA: "MISMATCH", LENGTH: "CUT", OTHER: "OTHER"}
    for r in report["per_schema"]:
        outs = "  ".join(f"{short[o['status']]}/{o['tokens']}" for o in r["outputs"])
        print(f"{r['name'][:44]:<44} {r['source']:<6} {r['chars']:>6} {r['compile_ms']:>10.2f} {r['prompt_tokens']:>6}  {outs}")
    v, g = report["validity"], report["generation"]
    gc = report["generation_compile"]["compile_ms"]
    print(f"\nvalidity: {v['valid']} valid / {v['finished_stop']} finished with stop = {_fmt(v['validity'] and 100 * v['validity'], '.1f')}% "
          f"({v['invalid_json']} invalid JSON, {v['schema_mismatch']} schema mismatches); "
          f"{v['length_cut']} of {v['outputs']} cut by max_tokens {g['max_tokens']} (not counted as valid)")
    print(f"greedy only: {v['greedy']['valid']} valid / {v['greedy']['finished_stop']} stopped, {v['greedy']['length_cut']} cut; "
          f"{g['num_schemas']} schemas ({g['num_openai']} OpenAI, {g['num_hand']} hand-written), "
          f"compile ms median {gc.get('median', 0):.2f} max {gc.get('max', 0):.2f}; generation took {g['seconds']:.0f} s")
    print(f"\n{'batch':>5} {'steps':>6} {'free ms/step':>13} {'constr ms/step':>15} {'overhead':>9} "
          f"{'outside fwd ms free/constr':>27} {'(overhead)':>10} {'mask fill ms':>13} {'sample ms free/constr':>22}")
    for o in report["overhead"]:
        c, f = o.get("constrained", {}), o.get("free", {})
        print(f"{o['batch']:>5} {o['steps']:>6} {_fmt(o['free_ms_per_step']):>13} {_fmt(o['constrained_ms_per_step']):>15} "
              f"{_fmt(o['overhead_pct'], '+.1f'):>8}% {_fmt(f.get('outside_forward_ms')):>13}/{_fmt(c.get('outside_forward_ms')):<13} "
              f"{_fmt(o.get('outside_forward_overhead_pct'), '+.1f'):>9}% {_fmt(c.get('mask_fill_ms')):>13} "
              f"{_fmt(f.get('sample_ms')):>11}/{_fmt(c.get('sample_ms'))}")
    print("(overhead: of the median step; in brackets: what the constraint adds outside the forward pass, "
          "relative to the free step; mask fill: the grammars' token masks, inside the sample phase)")


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    import torch

    from loom.engine import Engine, engine_config
    from loom.model.random_model import random_model_dir

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    hand = dict(list(HAND_WRITTEN.items())[: args.num_hand_written])
    openai: dict[str, dict[str, Any]] = {}
    if args.num_openai_schemas:
        path = Path(args.schemas_from)
        if not path.is_file():
            raise ValueError(f"OpenAI spec not found: {path} (pass --schemas-from, or --num-openai-schemas 0)")
        openai = load_openai_schemas(path)
    model = str(random_model_dir(args.random_model)) if args.random_model else args.model
    opts = dict(engine_opts)
    opts["max_num_seqs"] = max(batch_sizes + [opts.get("max_num_seqs") or 0])
    engine = Engine(engine_config(model, **opts))
    info = engine.model_info()
    print(f"model: {model or 'default (SmolLM2-135M-Instruct)'}, {info.dtype} on {info.device}, threads {torch.get_num_threads()}")
    report = run_benchmark(engine, openai=openai, hand=hand, num_openai=args.num_openai_schemas,
                           max_schema_chars=args.max_schema_chars, num_samples=args.num_samples, max_tokens=args.max_tokens,
                           batch_sizes=batch_sizes, decode_steps=args.decode_steps, rounds=args.rounds, seed=args.seed,
                           progress=not args.no_progress)
    report["config"] = {"model": model or "default (SmolLM2-135M-Instruct)", "dtype": info.dtype, "device": info.device,
                        "threads": torch.get_num_threads(), "schemas_from": str(args.schemas_from) if openai else None,
                        "num_openai_schemas": args.num_openai_schemas, "num_hand_written": len(hand),
                        "max_schema_chars": args.max_schema_chars, "num_samples": args.num_samples,
                        "max_tokens": args.max_tokens, "batch_sizes": batch_sizes, "decode_steps": args.decode_steps,
                        "rounds": args.rounds, "seed": args.seed}
    print_report(report)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schemas-from", default=str(OPENAPI_FILE),
                   help="the OpenAI API spec, OpenAPI YAML (default: ../shared/data/openai-openapi/openapi.yaml)")
    p.add_argument("--num-openai-schemas", type=int, default=30,
                   help="OpenAI schemas to generate with, an even spread of the compilable ones by name (0: none)")
    p.add_argument("--num-hand-written", type=int, default=len(HAND_WRITTEN), help="hand-written schemas to use (the first N)")
    p.add_argument("--max-schema-chars", type=int, default=2000,
                   help="largest OpenAI schema (compact JSON characters) to generate with: it goes into the prompt")
    p.add_argument("--num-samples", type=int, default=2, help="seeded temperature-1 samples per schema, besides the greedy one")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--batch-sizes", default="1,16", help="batch sizes of the step-time overhead measurement")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps timed per batch, round and batch size")
    p.add_argument("--rounds", type=int, default=12,
                   help="rounds per batch size, each a constrained and a free batch (their order alternates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-model", default=None, help="benchmark a random-weight preset instead, e.g. llama-58m")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output", "--output-json", dest="output", default=None, help="write all numbers as JSON here")
