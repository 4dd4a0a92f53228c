"""`loom bench kv-sensitivity`: the plan's knapsack against brute force, and the command end to end
on a tiny model: one engine per layer and format, a plan within the budget that the engine loads."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from loom.bench.kv_sensitivity import FORMAT_BITS, choose_plan
from loom.cli import main
from loom.engine import LLM
from loom.sampling import SamplingParams
from tests.bench.test_perplexity import TEXT


def brute_force(deltas, bits, budget):
    best = None
    for plan in itertools.product(*[list(d) for d in deltas]):
        if sum(bits[f] for f in plan) <= budget:
            loss = sum(max(d[f], 0.0) for d, f in zip(deltas, plan))
            if best is None or loss < best[0]:
                best = (loss, list(plan))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_choose_plan_is_the_least_loss_within_the_budget(seed):
    rng = random.Random(seed)
    bits = {**FORMAT_BITS, "auto": 16}
    deltas = [{"auto": 0.0, "int8": rng.uniform(-0.001, 0.01), "int4": rng.uniform(0, 0.05), "int2": rng.uniform(0, 0.5)}
              for _ in range(6)]
    budget = rng.choice([12, 24, 30, 48, 96])
    plan = choose_plan(deltas, bits, budget)
    assert sum(bits[f] for f in plan) <= budget
    loss = sum(max(d[f], 0.0) for d, f in zip(deltas, plan))
    assert loss == pytest.approx(brute_force(deltas, bits, budget)[0])
    with pytest.raises(ValueError, match="no plan fits"):
        choose_plan(deltas, bits, 11)


def test_kv_sensitivity_end_to_end(tiny_model, tmp_path, capsys):
    model = str(tiny_model("llama"))
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    plan_file = tmp_path / "plan.json"
    rc = main(["bench", "kv-sensitivity", "--model", model, "--dtype", "float32", "--formats", "int8,int2",
               "--budget-bits", "5", "--text", str(text), "--max-tokens", "300", "--window", "128",
               "--kv-residual-tokens", "16", "--output", str(plan_file)])
    assert rc == 0
    plan = json.loads(plan_file.read_text())
    layers = plan["kv_cache_layers"]
    num_layers = LLM(model).engine.model_config.num_layers
    assert len(layers) == num_layers and set(layers) <= {"auto", "int8", "int2"}
    assert sum({"auto": 32, "int8": 8, "int2": 2}[f] for f in layers) <= 5 * num_layers
    assert len(plan["perplexity_change"]["int2"]) == num_layers and plan["mean_bits"] <= 5
    assert "layer   0:" in capsys.readouterr().out
    # The engine serves the plan, and the perplexity bench measures it as one more mode.
    llm = LLM(model, dtype="float32", kv_cache_layers=str(plan_file), kv_residual_tokens=16)
    assert llm.engine.worker.kv.spec.layer_dtypes == tuple(layers)
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0]
               .outputs[0].token_ids) == 20
    rc = main(["bench", "perplexity", "--model", model, "--dtype", "float32", "--kv-modes", "int8", "--text",
               str(text), "--max-tokens", "200", "--window", "100", "--agreement-prompts", "1",
               "--kv-cache-layers", str(plan_file), "--kv-residual-tokens", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "layers:" in out and "int8:" in out


@pytest.mark.parametrize("content,match", [
    ("not json", "not JSON"), ('{"layers": []}', "expected an object with 'kv_cache_layers'"),
    ('{"kv_cache_layers": ["int4"]}', "1 formats for a model of"), ('{"kv_cache_layers": ["int3", "int4"]}', None),
])
def test_bad_plan_files_are_rejected_by_name(tiny_model, tmp_path, content, match):
    model = str(tiny_model("llama"))
    n = LLM(model).engine.model_config.num_layers
    if match is None:
        content = json.dumps({"kv_cache_layers": ["int3"] + ["int4"] * (n - 1)})
        match = "unknown format 'int3'"
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        LLM(model, kv_cache_layers=str(path))
    with pytest.raises(ValueError, match="cannot read it"):
        LLM(model, kv_cache_layers=str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"kv_cache_layers": ["int8"] * n}))
    with pytest.raises(ValueError, match="not both"):
        LLM(model, kv_cache_layers=str(path), kv_cache_dtype="int4")
