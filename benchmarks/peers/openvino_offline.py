"""OpenVINO GenAI's offline pipeline on a GGUF file: output tok/s for batches of prompts sent at once.

OpenVINO GenAI has no OpenAI server, so it is not a `loom bench peers` peer; this is its offline
counterpart of `loom bench throughput --num-prompts N --input-len 13 --output-len 128`. Run it
with the venv that install_openvino.sh prints (it imports openvino_genai, not loom):

    $(benchmarks/peers/install_openvino.sh) benchmarks/peers/openvino_offline.py --gguf FILE --batch-sizes 1,16,64

Every prompt is about 13 tokens, every answer exactly --output-len tokens (ignore_eos), greedy.
"""

from __future__ import annotations

import argparse
import time

import openvino_genai as ov_genai

PROMPT = "Write a short story about a robot who learns to paint."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="the model (OpenVINO GenAI reads GGUF files directly)")
    p.add_argument("--batch-sizes", default="1,16,64", help="prompts per generate call (default 1,16,64)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--device", default="CPU")
    args = p.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if any(b < 1 for b in batches) or args.output_len < 1:
        raise SystemExit("batch sizes and --output-len must be >= 1")

    started = time.perf_counter()
    pipe = ov_genai.LLMPipeline(args.gguf, args.device)
    print(f"openvino-genai {ov_genai.__version__}: loaded {args.gguf} in {time.perf_counter() - started:.1f} s")
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = args.output_len
    config.ignore_eos = True
    for n in batches:
        prompts = [f"{i}: {PROMPT}" for i in range(n)]
        pipe.generate(prompts[:1], config)  # warm-up
        started = time.perf_counter()
        pipe.generate(prompts, config)
        elapsed = time.perf_counter() - started
        print(f"batch {n:>4}: {n * args.output_len / elapsed:8.1f} output tok/s ({elapsed:.2f} s)")


if __name__ == "__main__":
    main()
