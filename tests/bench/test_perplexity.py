"""`loom bench perplexity`: rolling-window perplexity against transformers on the same windows, the
window arithmetic, and the command end to end on a tiny model."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from loom.bench.perplexity import perplexity, rolling_windows, token_nlls
from loom.cli import main
from loom.engine import LLM

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do shake the "
        "darling buds of May, And summer's lease hath all too short a date. ") * 8


def hf_rolling_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """The Hugging Face sliding-window recipe: a window's labels are -100 over the tokens an earlier
    window scored, and its mean loss is weighed by the tokens it scores."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        inputs = torch.tensor([ids[begin:end]])
        labels = inputs.clone()
        labels[:, : prev_end - begin] = -100
        n = int((labels[:, 1:] != -100).sum())  # the model shifts the labels by one
        with torch.inference_mode():
            nll += model(inputs, labels=labels).loss.item() * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def llama(tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    ref = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return path, ref, LLM(str(path), dtype="float32", quantization="none")


@pytest.mark.parametrize("window,stride", [(300, 299), (128, 48), (100, 99), (32, 20)])
def test_perplexity_matches_transformers_on_the_same_windows(llama, window, stride):
    _, ref, llm = llama
    rng = random.Random(window + stride)
    ids = [rng.randrange(100, ref.config.vocab_size) for _ in range(300)]
    got = perplexity(token_nlls(llm, ids, window, stride))
    assert got == pytest.approx(hf_rolling_perplexity(ref, ids, window, stride), rel=1e-3)
    if window == len(ids):  # one window: the plain perplexity of the whole sequence
        with torch.inference_mode():
            lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1)
        full = math.exp(-lp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item())
        assert got == pytest.approx(full, rel=1e-3)


@pytest.mark.parametrize("n,window,stride", [(300, 128, 48), (300, 128, 127), (300, 300, 150), (300, 512, 256),
                                             (10, 4, 1), (2, 2, 1), (257, 64, 32)])
def test_every_token_after_the_first_is_scored_once(n, window, stride):
    spans = rolling_windows(n, window, stride)
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(1, n))
    assert spans[0][0] == 0 and spans[-1][2] == n
    assert all(0 < end - start <= window and start < first for start, first, end in spans)
    # Past the first window, each has window - stride tokens of context (the last may be shorter).
    assert all(first - start == window - stride for start, first, _ in spans[1:-1])
    assert all(b[0] - a[0] == stride for a, b in zip(spans, spans[1:]))


def test_cli_end_to_end(tiny_model, tmp_path):
    text, out = tmp_path / "text.txt", tmp_path / "p.json"
    text.write_text(TEXT)
    rc = main(["bench", "perplexity", "--model", str(tiny_model("llama")), "--dtype", "float32", "--modes", "none,int8",
               "--text", str(text), "--window", "128", "--stride", "64", "--agreement-prompts", "3",
               "--agreement-tokens", "8", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["window"] == 128 and r["stride"] == 64 and r["scored_tokens"] == r["tokens"] - 1 > 128
    assert r["agreement_prompts"] == 3 and r["agreement_tokens"] == 8
    ref, none, int8 = r["modes"]
    assert [m["mode"] for m in r["modes"]] == ["reference", "none", "int8"]
    assert (ref["quantization"], ref["dtype"]) == ("none", "float32")
    # The reference against itself, and the same configuration loaded again: identical.
    for same in (ref, none):
        assert same["delta_pct"] == 0 and same["perplexity"] == ref["perplexity"]
        assert same["agreement"] == 3 and same["mean_common_prefix"] == 8
        assert same["weight_bytes"] == ref["weight_bytes"]
    assert none["logprob_mae"] == 0
    assert int8["weight_bytes"] < ref["weight_bytes"] and int8["perplexity"] > 0 and int8["logprob_mae"] > 0
    assert 0 <= int8["agreement"] <= 3 and 0 <= int8["mean_common_prefix"] <= 8


def test_cli_kv_modes_compare_cache_formats_with_the_default_cache(tiny_model, tmp_path):
    text, out = tmp_path / "text.txt", tmp_path / "p.json"
    text.write_text(TEXT)
    rc = main(["bench", "perplexity", "--model", str(tiny_model("llama")), "--dtype", "float32", "--kv-modes",
               "fp32,int8", "--text", str(text), "--window", "128", "--agreement-prompts", "2", "--agreement-tokens",
               "8", "--output-json", str(out)])
    assert rc == 0
    ref, fp32, int8 = json.loads(out.read_text())["modes"]
    assert [m["kv_cache_dtype"] for m in (ref, fp32, int8)] == ["auto", "fp32", "int8"]
    assert fp32["delta_pct"] == 0 and fp32["logprob_mae"] == 0 and fp32["agreement"] == 2  # fp32 is the default here
    assert fp32["weight_bytes"] == int8["weight_bytes"]
    assert int8["kv_bytes_per_token"] < fp32["kv_bytes_per_token"] / 3
    assert 0 < int8["logprob_mae"] < 0.05 and abs(int8["delta_pct"]) < 2


def test_cli_tp_sizes_compare_split_models_with_one_process(tiny_model, tmp_path):
    text, out = tmp_path / "text.txt", tmp_path / "p.json"
    text.write_text(TEXT)
    rc = main(["bench", "perplexity", "--model", str(tiny_model("llama")), "--dtype", "float32", "--quantization",
               "none", "--tp-sizes", "2", "--text", str(text), "--window", "128", "--agreement-prompts", "2",
               "--agreement-tokens", "8", "--output-json", str(out)])
    assert rc == 0
    ref, tp2 = json.loads(out.read_text())["modes"]
    assert [m["mode"] for m in (ref, tp2)] == ["reference", "tp=2"]
    assert tp2["agreement"] == 2 and tp2["logprob_mae"] < 1e-5 and abs(tp2["delta_pct"]) < 1e-3


def test_short_text_has_fewer_agreement_prompts(tiny_model, tmp_path, capsys):
    text, out = tmp_path / "text.txt", tmp_path / "p.json"
    text.write_text("Shall I compare thee to a summer's day?")
    rc = main(["bench", "perplexity", "--model", str(tiny_model("llama")), "--dtype", "float32", "--text", str(text),
               "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["window"] == r["tokens"] and r["agreement_prompts"] == 0
    assert [m["agreement"] for m in r["modes"]] == [None, None]
    assert "holds only 0" in capsys.readouterr().out


@pytest.mark.parametrize("extra,message", [
    (["--modes", "int8,q3_x"], "unknown quantization mode 'q3_x'"),
    (["--kv-modes", "int8,int3"], "unknown KV cache dtype 'int3' in --kv-modes"),
    (["--kv-modes", "int8", "--modes", "int8"], "one of --modes (weight formats), --kv-modes"),
    (["--tp-sizes", "2,x"], "--tp-sizes takes tensor-parallel sizes above 1"),
    (["--kv-modes", "auto"], "names no format besides auto"),
    (["--text", "/nonexistent/text.txt"], "text file not found"),
    (["--window", "64", "--stride", "64"], "--stride must be between 1 and window - 1"),
])  # fmt: skip
def test_bad_arguments_exit_2(tiny_model, tmp_path, extra, message, capsys):
    text = tmp_path / "text.txt"  # a text of its own, so that only `extra` is wrong (a later --text wins)
    text.write_text(TEXT)
    assert main(["bench", "perplexity", "--model", str(tiny_model("llama")), "--text", str(text), *extra]) == 2
    assert message in capsys.readouterr().err


def test_text_of_one_token_exits_2(tiny_model, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("a")
    assert main(["bench", "perplexity", "--model", str(tiny_model("llama")), "--text", str(text)]) == 2
    assert "perplexity needs at least 2" in capsys.readouterr().err


def test_sharegpt_json_gives_its_turns_in_order(tmp_path):
    from loom.bench.perplexity import read_text

    path = tmp_path / "convs.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a b"}, {"from": "gpt", "value": "c"}]},
                                {"conversations": [{"from": "human", "value": "d"}]}]))
    assert read_text(path) == "a b\n\nc\n\nd"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="not a ShareGPT JSON file"):
        read_text(path)
