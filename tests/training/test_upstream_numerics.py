"""`numerics = "upstream"`: each choice of reference §11.4, pinned against an independent
computation (the float32 Muon is pinned in test_optim.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from ablate.model.logits import as_tensor
from ablate.model.backbone import Backbone, BackboneConfig, rope_tables
from ablate.model.engram import EngramCrossAttention
from ablate.model.student import EngramConfig, Student

SMALL = dict(vocab_size=64, hidden_dim=32, num_layers=4, num_query_heads=4, num_kv_heads=2, head_dim=8,
             ffn_dim=48, max_seq_len=64)


def test_upstream_rope_tables_are_computed_in_float32():
    cos, sin = rope_tables(8, 2048, 1e6, torch.float32)
    pos = torch.arange(2048, dtype=torch.float32)
    inv = torch.tensor([1e6 ** (-j / 8) for j in range(0, 8, 2)], dtype=torch.float32)
    angles = pos[:, None] * inv[None, :]  # the float32 product, as the reference forms it
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    cos64, _ = rope_tables(8, 2048, 1e6)
    assert 0 < (cos - cos64).abs().max() < 1e-3  # far positions: float32 angles drift


def test_upstream_retrieval_ranks_cosines_in_the_autocast_dtype():
    torch.manual_seed(0)
    xa = EngramCrossAttention(32, 16, num_heads=4, top_k=4, similarity="autocast")
    h, table = torch.randn(2, 64, 32), torch.randn(500, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices, sims = xa.retrieve(h, table)
    # by hand: r = W_r h in bf16, both sides L2-normalised, one bf16 product, top-k of it
    r = (h.bfloat16() @ xa.W_r.weight.bfloat16().T).float()
    rn = (r / r.norm(dim=-1, keepdim=True).clamp_min(1e-8)).bfloat16()
    tn = (table / table.norm(dim=-1, keepdim=True).clamp_min(1e-8)).bfloat16()
    expected = (rn @ tn.T).float()
    picked = expected.gather(-1, indices)
    assert torch.allclose(sims.float(), picked, atol=1e-2)
    kth = expected.topk(4, dim=-1).values[..., -1:]
    assert (picked >= kth - 1e-2).all()  # the k chosen are the k best bf16 cosines (ties within rounding)
    fp32 = EngramCrossAttention(32, 16, num_heads=4, top_k=4)
    fp32.load_state_dict(xa.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_indices, _ = fp32.retrieve(h, table)
    assert not torch.equal(indices.sort(-1).values, fp32_indices.sort(-1).values)  # the choice matters


def small_student(numerics: str) -> Student:
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(**SMALL))
    student = Student(backbone, EngramConfig(inject_layers=(1, 3), engram_dim=8, num_heads=4, top_k=3, router=True,
                                             numerics=numerics), torch.randn(50, 8))
    with torch.no_grad():
        for inj in student.engram_injections.values():
            inj.gate.fill_(0.5)
        student.engram_skip_router.W_align.weight.normal_()
    return student


def test_upstream_skips_the_router_at_zero_injection():
    tokens = torch.randint(0, 64, (2, 16))
    up, ab = small_student("upstream"), small_student("ablate")
    out = up(tokens, inject_mult=0.0)
    assert out.router_logits is None
    assert torch.equal(as_tensor(out.logits), up.backbone.logits(up.backbone(tokens)))
    kept = ab(tokens, inject_mult=0.0)
    assert kept.router_logits is not None and not torch.equal(as_tensor(kept.logits), as_tensor(out.logits))
    assert up(tokens).router_logits is not None  # only at zero injection


def test_upstream_init_draws_the_backbone_before_the_adapters(tmp_path):
    """The reference seeds once and builds the whole model: the adapters' initial weights are those
    drawn after a full backbone init, not right after the seed."""
    from ablate.training import cells
    from ablate.model.checkpoint import save_backbone
    from ablate.api.plugins import load_registry
    from ablate.config.spec import spec_from_dict
    from ablate.pipeline.stages import backbone_config

    raw = tomllib.loads((Path(__file__).resolve().parents[2] / "specs" / "demo.toml").read_text())
    registry = load_registry()
    specs = {n: spec_from_dict(raw, overrides=[f"numerics={n}"], profile="tiny", registry=registry)
             for n in ("ablate", "upstream")}
    spec = specs["upstream"]
    vocab = 64
    torch.manual_seed(123)
    saved = Backbone(backbone_config(spec, vocab))
    save_backbone(saved, tmp_path / "bb.safetensors")
    table = torch.randn(spec.oracle.rows, spec.oracle.engram_dim)
    cell = spec.cells[0]
    up = cells.build_student(spec, cell, tmp_path / "bb.safetensors", vocab, table, "cpu")
    ab = cells.build_student(specs["ablate"], cell, tmp_path / "bb.safetensors", vocab, table, "cpu")

    torch.manual_seed(spec.train.model_seed)  # by hand: seed, a full backbone init, then the adapters
    by_hand = Student(Backbone(backbone_config(spec, vocab)), cells.engram_config(spec, cell), table)
    for name, p in up.trainable_named_parameters():
        assert torch.equal(p, dict(by_hand.named_parameters())[name]), name
    name = f"engram_injections.{spec.model.inject_layers[0]}.xattn.W_r.weight"
    assert not torch.equal(dict(up.named_parameters())[name], dict(ab.named_parameters())[name])
    for (n, p), (_, q) in zip(up.backbone.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(p, q), n  # the checkpoint's weights, whatever the init drew
    assert torch.equal(up.backbone.rope_cos, rope_tables(spec.backbone.head_dim, spec.backbone.max_seq_len,
                                                         spec.backbone.rope_theta, torch.float32)[0])


def test_upstream_pca_is_incremental_pca_fed_as_the_reference_feeds_it():
    """Fed by hand: the same default_rng(42) subset as float32, partial fits of 512 rows in subset
    order, the final chunk (88 rows < 128 components) dropped; every row projected by its transform."""
    import numpy as np
    from sklearn.decomposition import IncrementalPCA

    from ablate.oracle.build import fit_incremental_pca, fit_pca

    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    scales = 0.9 ** torch.arange(256, dtype=torch.float64)  # a decaying spectrum, like hidden-state means
    rows = ((torch.randn(3000, 256, generator=g, dtype=torch.float64) * scales) @ basis.T).float()
    pca = fit_incremental_pca(rows, 128, sample_min=512, sample_frac=0.2, seed=42)  # subset: 600 rows
    pick = np.random.default_rng(42).choice(3000, size=600, replace=False)
    by_hand = IncrementalPCA(n_components=128)
    by_hand.partial_fit(rows.numpy()[pick][:512])  # 512 rows; the next 88 are fewer than 128: dropped
    assert torch.equal(pca.components, torch.from_numpy(by_hand.components_.astype(np.float64)))
    assert pca.explained_variance_ratio_total == pytest.approx(float(by_hand.explained_variance_ratio_.sum()), rel=1e-12)
    assert torch.equal(pca.project(rows[:10]), torch.from_numpy(by_hand.transform(rows.numpy()[:10])))
    exact = fit_pca(rows, 128, sample_min=512, sample_frac=0.2, seed=42)  # an exact SVD of all 600 rows
    cos = (exact.components @ pca.components.T).diagonal().abs()
    assert cos[:8].min() > 0.95 and cos.min() < 0.9  # leading components agree, trailing ones move


def test_chunk_aligned_split_keeps_the_last_whole_chunks():
    from ablate_builtins.corpora import SplitParams, split_chunks

    stream = np.arange(10 * 2048 * 10 + 777)  # 100 whole chunks and a 777-token tail
    train, val = split_chunks(stream, 0.01, 2048, "toy")
    assert train.size == 99 * 2048 and val.size == 2048  # ⌊1% of 100⌋ = 1 chunk
    assert val[0] == 99 * 2048 and val[-1] == 100 * 2048 - 1  # the tail beyond the last chunk is dropped
    train, val = split_chunks(stream, 0.025, 2048, "toy")
    assert val.size == 2 * 2048  # ⌊2.5⌋ = 2
    with pytest.raises(Exception, match="too few for a chunk-aligned split"):
        split_chunks(np.arange(50 * 2048), 0.01, 2048, "toy")  # ⌊0.5⌋ = 0 validation chunks
    tail = SplitParams(val_fraction=0.01).split_stream(stream, eos_id=-1, what="toy")
    assert tail[1].size == round(stream.size * 0.01)  # ablate's tail cut differs


def test_upstream_numerics_default_the_corpus_to_the_chunk_split_unless_set():
    from ablate.pipeline.preflight import corpus_params
    from ablate.api.plugins import load_registry
    from ablate.config.spec import spec_from_dict

    registry = load_registry()
    token_files = registry.get("corpus", "token-files")
    raw = tomllib.loads((Path(__file__).resolve().parents[2] / "specs" / "zeb139.toml").read_text())
    raw["corpus"].pop("tokenizer")
    for numerics, given, expected in (("upstream", None, "chunks"), ("upstream", "tail", "tail"), ("ablate", None, None)):
        r = {**raw, "numerics": numerics, "corpus": {**raw["corpus"], **({"val_split": given} if given else {})}}
        spec = spec_from_dict(r)
        assert corpus_params(spec, token_files).get("val_split") == expected


def test_a_run_with_upstream_numerics_records_and_reports_them(tmp_path, monkeypatch):
    import json
    import shutil

    from cli_run import ablate_in

    shutil.copy(Path(__file__).resolve().parents[2] / "specs" / "demo.toml", tmp_path / "demo.toml")
    code = ablate_in(tmp_path, monkeypatch, "run", "demo.toml", "--profile", "tiny", "--set", "numerics=upstream",
                     "--set", "backbone.pretrain.steps=2", "--set", "teacher.steps=2", "--set", "train.steps=4",
                     "--device", "cpu", "--quiet")
    assert code == 0
    results = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    assert results["numerics"] == "upstream" and all(c["status"] == "done" for c in results["cells"].values())
    assert "Numerics: **upstream**" in (tmp_path / "reports" / "demo.md").read_text()


def test_the_upstream_spec_shape_runs_on_the_references_own_artifacts(tmp_path, monkeypatch):
    """specs/zeb139-upstream.toml in miniature: a reference checkpoint.pt as the backbone, the
    reference's oracle files, numerics = "upstream"; no teacher pass runs."""
    import json
    import shutil

    from cli_run import ablate_in
    from oracle_fixtures import file_sets, write_reference_oracle

    from ablate.config.spec import load_spec
    from ablate.pipeline.stages import backbone_config

    demo = Path(__file__).resolve().parents[2] / "specs" / "demo.toml"
    shutil.copy(demo, tmp_path / "demo.toml")
    spec = load_spec(demo, [], "tiny")
    vocab = spec.corpus.params()["vocab_size"]
    torch.manual_seed(0)
    bb = Backbone(backbone_config(spec, vocab))
    state = {"embed_tokens.weight": bb.embed.weight.detach(), "lm_head.weight": bb.embed.weight.detach(),
             "final_norm.weight": bb.final_norm.weight.detach()}
    state.update({n.replace(".mlp_norm.", ".ffn_norm."): t for n, t in bb.state_dict().items() if n.startswith("layers.")})
    state.update({f"block_attnres.queries.{j}": q.reshape(1, 1, -1) for j, q in enumerate(bb.block_queries.detach())})
    torch.save({"step": 2048, "model_state_dict": state}, tmp_path / "checkpoint.pt")
    files = write_reference_oracle(tmp_path / "oracle")
    code = ablate_in(tmp_path, monkeypatch, "run", "demo.toml", "--profile", "tiny", "--set", "numerics=upstream",
                     "--set", 'backbone.source="checkpoint"', "--set", f'backbone.checkpoint="{tmp_path / "checkpoint.pt"}"',
                     *file_sets(files), "--set", "train.steps=4", "--device", "cpu", "--quiet")
    assert code == 0
    results = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    assert results["numerics"] == "upstream" and results["oracle"]["origin"] == "files"
    assert results["stages"]["backbone"]["info"]["step"] == 2048
    assert results["stages"]["teacher"]["info"] == {"skipped": "oracle from files"}
    assert not list((tmp_path / ".ablate-cache").glob("teacher-*"))  # no teacher was prepared
    assert all(c["status"] == "done" for c in results["cells"].values())
