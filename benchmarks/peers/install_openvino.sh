#!/usr/bin/env bash
# Install OpenVINO GenAI into its own venv outside the repo (it pulls no torch).
#
# Usage: benchmarks/peers/install_openvino.sh   (prints the venv's python path)
# Env:   LOOM_PEERS_DIR (default ~/.cache/loom/peers), OPENVINO_GENAI_VERSION,
#        PYTHON (interpreter for the venv, default python3.11 or python3)
set -euo pipefail

PEERS_DIR="${LOOM_PEERS_DIR:-$HOME/.cache/loom/peers}"
VERSION="${OPENVINO_GENAI_VERSION:-2026.4.1.0}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV="$PEERS_DIR/openvino/venv"
STAMP="$VENV/.loom-openvino-$VERSION"

if [[ -f "$STAMP" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
mkdir -p "$PEERS_DIR/openvino"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "openvino-genai==$VERSION" >&2
touch "$STAMP"
echo "$VENV/bin/python"
