#!/usr/bin/env bash
# Install OpenVINO GenAI into its own venv outside the repo (it pulls no torch).
#
# Usage: benchmarks/peers/install_openvino.sh   (prints the venv's python path)
# Env:   LOOM_PEERS_DIR (default ~/.cache/loom/peers), OPENVINO_GENAI_VERSION,
#        PYTHON (interpreter for the venv, default python3.11 or python3)
set -euo pipefail
source "$(dirname "$0")/peer_venv.sh"

VERSION="${OPENVINO_GENAI_VERSION:-2026.4.1.0}"
peer_venv openvino "$VERSION"
"$VENV/bin/python" -m pip install -q "openvino-genai==$VERSION" >&2
peer_venv_done
