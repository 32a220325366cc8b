#!/usr/bin/env bash
# ZEB-139 at full dimensions on a GPU box that has no real weights or data: a Zipf token stream
# with vocab 32000 stands in for FineWeb-Edu, a randomly initialised `tiny` backbone is saved as
# the checkpoint, and the teacher is the TinyLlama-1.1B ARCHITECTURE with random weights
# (`teacher.random_init = true`; the report says so in a banner). Measures speed and plumbing.
#   usage: scripts/fullscale_random.sh WORKDIR [extra ablate args...]
set -euo pipefail
work=${1:?workdir}; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work/data/fineweb-edu-poc" "$work/checkpoints" "$work/tinyllama-arch" "$work/specs"
cp "$repo/specs/zeb139.toml" "$work/specs/"
sed -i '/^tokenizer = /d' "$work/specs/zeb139.toml"  # Zipf ids come from no tokenizer: nothing to compare
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
import numpy as np, torch
work = Path(sys.argv[1])
rng = np.random.default_rng(0)
ranks = np.arange(1, 32000)
p = ranks ** -1.1; p /= p.sum()
for i in range(2):  # 2 shards × 6M tokens; id 2 = EOS every ~1000 tokens
    toks = rng.choice(ranks, size=6_000_000, p=p).astype(np.int32)
    toks[rng.random(toks.size) < 1e-3] = 2
    np.save(work / f"data/fineweb-edu-poc/shard{i}.npy", toks)
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.checkpoint import save_backbone
torch.manual_seed(0)
save_backbone(Backbone(BackboneConfig()), work / "checkpoints/zeta_ctrl_2048.safetensors")
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
          "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
(work / "tinyllama-arch/config.json").write_text(json.dumps(config, indent=1))
PY
cd "$work"
ablate run specs/zeb139.toml --device cuda \
  --set teacher.plugin=hf-causal-lm --set teacher.model="$work/tinyllama-arch" --set teacher.random_init=true \
  --set axes.teacher=hf-causal-lm \
  "$@"
