#!/usr/bin/env bash
# lm-evaluation-harness loglikelihood scores with a cold prefix cache, a warm one, and none:
# starts two loom servers (prefix caching on / off), runs a local multiple-choice task three
# times through lm-eval's local-completions model and checks every loglikelihood is identical.
# Installs lm-eval[api] into .venv (pinned to what is already there, so torch stays put).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-$(mktemp -d)}
PY=.venv/bin/python
.venv/bin/pip freeze | grep -v -e '^-e' -e '^loom' > "$WORK/constraints.txt"
.venv/bin/pip install -q 'lm-eval[api]' -c "$WORK/constraints.txt"
$PY benchmarks/lm-eval/make_task.py "$WORK/task"
TOKENIZER=$($PY -c "from loom.config import EngineConfig; from loom.model.files import resolve_model; print(resolve_model(EngineConfig().model))")
.venv/bin/loom serve --port 8101 --uvicorn-log-level warning & CACHED=$!
.venv/bin/loom serve --port 8102 --no-prefix-caching --uvicorn-log-level warning & UNCACHED=$!
trap 'kill $CACHED $UNCACHED' EXIT
for port in 8101 8102; do until curl -sf "localhost:$port/health"; do sleep 2; done; done
run() {  # PORT OUTPUT_DIR
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 .venv/bin/lm_eval --model local-completions \
    --model_args "model=SmolLM2-135M-Instruct,base_url=http://127.0.0.1:$1/v1/completions,tokenizer=$TOKENIZER,tokenizer_backend=huggingface,num_concurrent=4" \
    --tasks loom_mc --include_path "$WORK/task" --output_path "$2" --log_samples | tail -4
}
run 8101 "$WORK/cold"
run 8101 "$WORK/warm"
run 8102 "$WORK/uncached"
$PY benchmarks/lm-eval/compare.py "$WORK/cold" "$WORK/warm" "$WORK/uncached"
