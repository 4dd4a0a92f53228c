"""``loom bench throughput``: offline batch throughput of the engine (like ``vllm bench throughput``).

All prompts are submitted at once and run to completion through ``LLM.generate``; optionally the
same prompts go through Hugging Face transformers' ``generate`` in the same invocation, so the
ratio between the two is measured side by side on the same machine state."""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loom.bench.loader import SHAREGPT_FILE



@dataclass
class ThroughputResult:
    engine: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    def line(self) -> str:
        return (f"{self.engine:>13}: {self.requests_per_s:7.2f} requests/s, {self.output_tokens_per_s:8.1f} output tokens/s, "
                f"{self.total_tokens_per_s:8.1f} total tokens/s ({self.num_requests} requests, {self.seconds:.2f} s)")


def make_prompts(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request."""
    rng = random.Random(args.seed)
    if args.dataset == "random":
        # Random ids below the model's vocabulary, away from the special tokens at the start.
        return [([rng.randrange(100, vocab_size) for _ in range(args.input_len)], args.output_len)
                for _ in range(args.num_prompts)]
    path = Path(args.dataset_path or SHAREGPT_FILE)
    if not path.is_file():
        raise ValueError(f"ShareGPT file not found: {path} (pass --dataset-path)")
    rows = json.loads(path.read_text())
    texts = [c["value"] for r in rows for c in r.get("conversations", [])[:1] if c.get("value")]
    rng.shuffle(texts)
    out = []
    for text in texts:
        ids = tokenizer.encode(text)[: args.max_input_len]
        ids = [t for t in ids if t < vocab_size]
        if len(ids) >= 4:
            out.append((ids, args.output_len))
        if len(out) == args.num_prompts:
            break
    return out


def run_loom(args: argparse.Namespace, model: str | None, engine_opts: dict[str, Any]) -> tuple[ThroughputResult, Any]:
    from loom.engine import LLM
    from loom.sampling import SamplingParams

    llm = LLM(model, **engine_opts)
    requests = make_prompts(args, llm.tokenizer, llm.model_info().vocab_size)
    # As vllm bench throughput: random sampling at temperature 1, fixed output lengths.
    params = [SamplingParams(max_tokens=n, temperature=1.0, top_p=1.0, ignore_eos=True) for _, n in requests]
    warm = SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate([requests[0][0]], warm, use_tqdm=False)  # builds kernels, touches the weights
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params, use_tqdm=not args.no_progress)
    dt = time.perf_counter() - t0
    result = ThroughputResult("loom", len(outs), sum(len(p) for p, _ in requests),
                              sum(len(o.outputs[0].token_ids) for o in outs), dt)
    return result, (llm, requests, before)


def step_split(phases: dict[str, float]) -> dict[str, float]:
    """Fractions of step time: schedule, the worker's prepare / forward / sample, and update
    (bookkeeping, detokenizing, outputs). Whatever else ``execute`` spent (block copies) counts
    with prepare."""
    total = (phases["schedule"] + phases["execute"] + phases["update"]) or 1.0
    other = phases["execute"] - phases["forward"] - phases["sample"]
    return {"schedule": phases["schedule"] / total, "prepare": other / total, "forward": phases["forward"] / total,
            "sample": phases["sample"] / total, "update": phases["update"] / total}


def run_hf(model_dir: Path, requests: list[tuple[list[int], int]], dtype: str, batch_size: int) -> ThroughputResult:
    """The same prompts through transformers' generate, left-padded batches of ``batch_size``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.bfloat16 if dtype in ("auto", "bfloat16") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    pad = 0
    t0 = time.perf_counter()
    out_tokens = 0
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            chunk = requests[i : i + batch_size]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
            n = max(o for _, o in chunk)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad)
            out_tokens += (gen.shape[1] - width) * len(chunk)
    dt = time.perf_counter() - t0
    return ThroughputResult("transformers", len(requests), sum(len(p) for p, _ in requests), out_tokens, dt)


def main(args: argparse.Namespace, engine_opts: dict[str, Any]) -> int:
    from loom.model.files import resolve_model
    from loom.model.random_model import random_model_dir

    model = str(random_model_dir(args.random_model)) if args.random_model else args.model
    loom_result, (llm, requests, before) = run_loom(args, model, engine_opts)
    stats = llm.stats()
    print(f"model: {model or 'default (SmolLM2-135M-Instruct)'}; {len(requests)} requests, "
          f"{args.dataset} prompts, output {args.output_len} tokens, threads {engine_opts.get('num_threads') or 'all'}")
    print(loom_result.line())
    steps = stats.steps - before.steps
    phases = {k: v - before.phase_seconds.get(k, 0.0) for k, v in stats.phase_seconds.items()}
    split = step_split(phases)
    total = phases["schedule"] + phases["execute"] + phases["update"]
    print("   step split: " + ", ".join(f"{k} {v:5.1%}" for k, v in split.items())
          + f" ({steps} steps, {1000 * total / max(steps, 1):.1f} ms/step; python work outside the forward pass "
          f"{1 - split['forward']:.1%})")
    report: dict[str, Any] = {"loom": asdict(loom_result) | {"output_tokens_per_s": loom_result.output_tokens_per_s},
                              "step_split": split, "steps": steps}
    if "all_reduce" in phases:  # tensor parallel: rank 0's time in all-reduces, waiting for the others included
        per_step = phases["all_reduce"] / max(steps, 1)
        print(f"   all-reduce: {1000 * per_step:.2f} ms/step, {phases['all_reduce'] / (phases['forward'] or 1):.1%} of "
              f"the forward pass")
        report["all_reduce_ms_per_step"] = 1000 * per_step
    if args.compare_hf:
        del llm
        hf = run_hf(resolve_model(model), requests, engine_opts.get("dtype", "auto"), args.hf_batch_size)
        print(hf.line())
        ratio = loom_result.output_tokens_per_s / hf.output_tokens_per_s
        print(f"        ratio: loom / transformers = {ratio:.2f}x output tokens/s")
        report["transformers"] = asdict(hf) | {"output_tokens_per_s": hf.output_tokens_per_s}
        report["ratio"] = ratio
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64, help="requests, all submitted at once")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON (default: ../shared/data/sharegpt)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random dataset)")
    p.add_argument("--max-input-len", type=int, default=1024, help="cap on ShareGPT prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--random-model", default=None, help="benchmark a random-weight preset instead, e.g. llama-58m")
    p.add_argument("--compare-hf", action="store_true", help="also run the prompts through transformers and print the ratio")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output-json", default=None)

