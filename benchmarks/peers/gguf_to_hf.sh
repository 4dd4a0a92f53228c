#!/usr/bin/env bash
# Convert a GGUF model into a Hugging Face directory (config.json, safetensors,
# tokenizer.json) for the peers that cannot load GGUF: vLLM and transformers
# serve. Weights are dequantized and saved as float32, so nothing is lost; each
# server then casts to its --dtype. Cached by the GGUF's hash.
#
# Usage: GGUF=/path/model.gguf PYTHON=/venv/bin/python benchmarks/peers/gguf_to_hf.sh
#        (prints the directory; PYTHON needs transformers; gguf and accelerate are added if missing)
set -euo pipefail

PEERS_DIR="${LOOM_PEERS_DIR:-$HOME/.cache/loom/peers}"
: "${GGUF:?set GGUF to the model file}"
PYTHON="${PYTHON:-python3}"
[[ -f "$GGUF" ]] || { echo "no GGUF file at $GGUF" >&2; exit 1; }

HASH=$(sha256sum "$GGUF" | cut -c1-12)
OUT="$PEERS_DIR/models/$(basename "$GGUF" .gguf)-$HASH"
if [[ -f "$OUT/.complete" ]]; then
    echo "$OUT"
    exit 0
fi
# Reading GGUF in transformers needs gguf and accelerate; neither touches torch.
"$PYTHON" -c "import gguf, accelerate" 2>/dev/null || "$PYTHON" -m pip install -q gguf accelerate >&2
mkdir -p "$OUT"
"$PYTHON" - "$GGUF" "$OUT" >&2 <<'PY'
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
d, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
# The weights are already dequantized; only the GGUF marker blocks saving.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"saved {model.config.model_type} model to {out}")
PY
touch "$OUT/.complete"
echo "$OUT"
