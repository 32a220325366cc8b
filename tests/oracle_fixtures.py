"""The reference's oracle files (§4.4, §11.3) written for a random oracle, and the `--set` flags
that point a spec at them; shared by the oracle-files and upstream-numerics tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ablate.config.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = load_spec(ROOT / "specs" / "demo.toml", [], "tiny")
ROWS, DIM, VOCAB = TINY.oracle.rows, TINY.oracle.engram_dim, TINY.corpus.params()["vocab_size"]


def write_reference_oracle(directory: Path, rows: int = ROWS, dim: int = DIM, vocab: int = VOCAB, seed: int = 0,
                           seeds: list[int] = TINY.oracle.seeds) -> dict[str, Path]:
    """The reference's files for a random oracle with every 7th row unpopulated: table float32,
    sidecar bf16, stats.json and the `_shuffled_seed0` twins (π = randperm(rows), seed 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    populated = torch.arange(rows) % 7 != 3
    table = torch.randn(rows, dim, generator=g) * populated.unsqueeze(1)
    sidecar = (torch.randn(rows, vocab, generator=g) * 3 * populated.unsqueeze(1)).to(torch.bfloat16)
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    f = {"table": directory / "oracle_x.safetensors", "sidecar": directory / "oracle_x_teacher_logits.safetensors",
         "stats": directory / "oracle_x.safetensors.stats.json",
         "shuffled_table": directory / "oracle_x_shuffled_seed0.safetensors",
         "shuffled_sidecar": directory / "oracle_x_teacher_logits_shuffled_seed0.safetensors"}
    save_file({"engram.weight": table.contiguous()}, f["table"])
    save_file({"teacher_logits.weight": sidecar.contiguous()}, f["sidecar"])
    save_file({"engram.weight": table[perm].contiguous()}, f["shuffled_table"])
    save_file({"teacher_logits.weight": sidecar[perm].contiguous()}, f["shuffled_sidecar"])
    n = int(populated.sum())
    f["stats"].write_text(json.dumps({
        "teacher": "TinyLlama/TinyLlama_v1.1", "layer": -2, "total_entries": 123456, "engram_dim": dim,
        "hash_seeds": list(seeds), "populated_rows": n, "populated_fraction": n / rows,
        "pca_explained_variance_ratio_total": 0.9338690864205668, "teacher_logits_sidecar": str(f["sidecar"])}))
    return f


def file_sets(files: dict[str, Path]) -> list[str]:
    return [a for role, p in files.items() for a in ("--set", f'oracle.{role}="{p}"')] + \
        ["--set", 'oracle.source="files"']
