#!/usr/bin/env bash
# Install Hugging Face transformers with its `serve` command into its own venv
# outside the repo, on the same CPU torch as loom (2.13.0).
#
# Usage: benchmarks/peers/install_transformers.sh   (prints the venv's python path)
# Env:   LOOM_PEERS_DIR (default ~/.cache/loom/peers), TRANSFORMERS_VERSION,
#        PYTHON (interpreter for the venv, default python3.11 or python3)
set -euo pipefail
source "$(dirname "$0")/peer_venv.sh"

VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
peer_venv transformers "$VERSION"
# torch first and pinned, so nothing pulls another build.
nice -n 10 "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
nice -n 10 "$VENV/bin/python" -m pip install -q "transformers[serving]==$VERSION" accelerate gguf "torch==2.13.0" >&2
"$VENV/bin/python" -c "import torch, transformers; print('transformers', transformers.__version__, 'torch', torch.__version__)" >&2
peer_venv_done
