"""Importing the reference's backbones (zeb139-experiment.md §11.1–11.2) without running its code."""

import dataclasses
import importlib.util
import os
import random
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ablate.errors import InputError
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.checkpoint import checkpoint_format, load_backbone, save_backbone
from ablate.model.reference_import import check_reference, convert_checkpoint, import_reference
from cli_run import ablate_in

# 4 layers in blocks of 1: three BlockAttnRes queries, so their order matters
CFG = BackboneConfig(vocab_size=64, hidden_dim=32, num_layers=4, num_query_heads=2, num_kv_heads=1,
                     head_dim=16, ffn_dim=48, max_seq_len=16, layers_per_block=1)
LEGACY = {"engram_residual.key_proj.weight": (32, 8), "engram_residual.value_proj.weight": (32, 8),
          "engram_residual.gate_norm.weight": (32,), "engram_residual.key_norm.weight": (32,),
          "engram_residual.conv1d.weight": (32, 1, 3)}
ADAPTERS = {"engram_injections.1.alpha": (), "engram_injections.1.engram_xattn.retrieval_query_proj.weight": (8, 32),
            "engram_injections.1.engram_xattn.q_proj.weight": (32, 32),
            "engram_skip_router.W_align.weight": (32, 32), "engram_skip_router.log_alpha": ()}


def backbone(seed=0):
    torch.manual_seed(seed)
    return Backbone(CFG).eval()


def logits(bb):
    x = torch.arange(12).reshape(1, 12) * 5 % 64
    with torch.no_grad():
        return bb.logits(bb(x))


def upstream_state(bb, extras=True) -> OrderedDict:
    """The backbone's weights under the reference's names (§11.2), tied head included."""
    sd = OrderedDict()
    embed = bb.embed.weight.detach()
    sd["embed_tokens.weight"] = embed
    for name, t in bb.state_dict().items():
        if name.startswith("layers."):
            sd[name.replace(".mlp_norm.", ".ffn_norm.")] = t
    sd["final_norm.weight"] = bb.final_norm.weight.detach()
    for j, q in enumerate(bb.block_queries.detach()):
        sd[f"block_attnres.queries.{j}"] = q.reshape(1, 1, -1).clone()
    if extras:
        sd.update({k: torch.randn(shape) for k, shape in {**LEGACY, **ADAPTERS}.items()})
    sd["lm_head.weight"] = embed  # the same tensor: tied
    return sd


@pytest.fixture
def ct87(monkeypatch):
    """A stand-in `ct87.model` holding HarmonyModelConfig, present only while the test saves."""
    package, module = types.ModuleType("ct87"), types.ModuleType("ct87.model")

    @dataclasses.dataclass
    class HarmonyModelConfig:
        num_layers: int
        hidden_dim: int
        num_query_heads: int
        num_kv_heads: int
        head_dim: int
        ffn_dim: int
        vocab_size: int
        max_seq_len: int
        rope_theta: float
        rms_norm_eps: float
        layers_per_block: int
        engram_injection_layer: int
        engram_dim: int
        tie_embeddings: bool
        engram_inject_layers: tuple = (1,)
        ffn_dim_overrides: dict | None = None

    HarmonyModelConfig.__module__, HarmonyModelConfig.__qualname__ = "ct87.model", "HarmonyModelConfig"
    module.HarmonyModelConfig, package.model = HarmonyModelConfig, module
    monkeypatch.setitem(sys.modules, "ct87", package)
    monkeypatch.setitem(sys.modules, "ct87.model", module)
    return HarmonyModelConfig


def reference_config(cls, **changes):
    fields = dict(num_layers=4, hidden_dim=32, num_query_heads=2, num_kv_heads=1, head_dim=16, ffn_dim=48,
                  vocab_size=64, max_seq_len=16, rope_theta=1e6, rms_norm_eps=1e-6, layers_per_block=1,
                  engram_injection_layer=2, engram_dim=8, tie_embeddings=True)
    return cls(**{**fields, **changes})


def save_reference_pt(path, bb, config=None, protocol=2, **extra):
    """A checkpoint.pt with the payload of §11.1 (the real optimiser's state, numpy/python RNG)."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.full((3,), 0.5)
    opt.step()  # a real optimiser state: tensors, floats, bools, None
    payload = {"step": 2048, "model_state_dict": upstream_state(bb), "optimizer_state_dict": opt.state_dict(),
               "last_val_loss": 4.5423,
               "rng_state": {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch_cpu": torch.get_rng_state()},
               "dynamic_entropy_lambda": np.float64(0.25), **extra}
    if config is not None:
        payload["config"] = config
    torch.save(payload, path, pickle_protocol=protocol)
    return path


def forget_ct87():
    for name in ("ct87.model", "ct87"):
        sys.modules.pop(name, None)
    assert importlib.util.find_spec("ct87") is None  # the reference's package is not installed


@pytest.mark.parametrize("protocol", [2, 4])
def test_checkpoint_pt_imports_with_logits_identical_to_native(ct87, tmp_path, protocol):
    bb = backbone()
    src = save_reference_pt(tmp_path / "checkpoint.pt", bb, reference_config(ct87), protocol)
    forget_ct87()
    save_backbone(bb, tmp_path / "native.safetensors")
    native = load_backbone(tmp_path / "native.safetensors", expected=CFG).eval()

    assert checkpoint_format(src) == "torch-pickle"
    imported, report = import_reference(src, expected=CFG)
    assert torch.equal(logits(imported.eval()), logits(native))
    assert torch.equal(logits(load_backbone(src).eval()), logits(native))  # config from the pickle
    assert report.step == 2048 and report.reference_config["engram_dim"] == 8
    assert report.reference_config["engram_inject_layers"] == [1]
    dropped = [n for names in report.dropped.values() for n in names]
    assert sorted(dropped) == sorted({**LEGACY, **ADAPTERS})
    assert any("legacy" in why and "engram_residual.conv1d.weight" in names for why, names in report.dropped.items())

    dst = tmp_path / "out" / "bb.safetensors"
    convert_checkpoint(src, dst)  # architecture from the pickled config alone
    assert checkpoint_format(dst) == "ablate"
    converted = load_backbone(dst, expected=CFG).eval()
    assert converted.config == CFG and torch.equal(logits(converted), logits(native))


@pytest.mark.parametrize("kept", ["embed_tokens.weight", "lm_head.weight"])
def test_model_step_safetensors_needs_the_spec_and_imports(tmp_path, kept):
    bb = backbone(1)
    sd = upstream_state(bb)
    sd.pop({"embed_tokens.weight": "lm_head.weight", "lm_head.weight": "embed_tokens.weight"}[kept])
    src = tmp_path / "model_step_2000.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src), metadata={"format": "pt"})
    assert checkpoint_format(src) == "reference-safetensors"
    with pytest.raises(InputError, match="no architecture config.*--spec"):
        import_reference(src)
    arch = {k: v for k, v in CFG.to_dict().items() if k != "vocab_size"}  # as a spec gives it
    imported, report = import_reference(src, expected=arch)
    assert imported.config == CFG and report.step is None
    assert torch.equal(logits(imported.eval()), logits(bb))


def test_stored_config_is_checked_against_the_spec(ct87, tmp_path):
    src = save_reference_pt(tmp_path / "checkpoint.pt", backbone(), reference_config(ct87, engram_dim=999))
    forget_ct87()
    wrong = dataclasses.replace(CFG, ffn_dim=40, rope_theta=1e4, vocab_size=65)
    with pytest.raises(InputError) as err:
        import_reference(src, expected=wrong)
    msg = str(err.value)
    for part in ("ffn_dim: checkpoint 48, spec 40", "rope_theta: checkpoint 1000000.0, spec 10000.0",
                 "vocab_size: checkpoint 64, corpus 65"):
        assert part in msg
    assert "engram_dim" not in msg  # only the dropped engram tensors depend on it
    with pytest.raises(InputError, match="ffn_dim: checkpoint 48, spec 40"):
        check_reference(src, {k: v for k, v in wrong.to_dict().items() if k != "vocab_size"})  # preflight
    import_reference(src, expected=CFG)  # engram_dim differs, nothing else: accepted


def test_config_without_a_tied_head_or_with_ffn_overrides_is_refused(ct87, tmp_path):
    untied = save_reference_pt(tmp_path / "a.pt", backbone(), reference_config(ct87, tie_embeddings=False))
    overrides = save_reference_pt(tmp_path / "b.pt", backbone(), reference_config(ct87, ffn_dim_overrides={1: 64}))
    forget_ct87()
    with pytest.raises(InputError, match="untied LM head"):
        import_reference(untied)
    with pytest.raises(InputError, match="ffn_dim_overrides"):
        import_reference(overrides)


def test_every_tensor_is_accounted_for(tmp_path):
    bb = backbone()
    cases = {"unknown": ({"mystery.weight": torch.zeros(2)}, None, "mystery.weight"),
             "missing": ({}, "final_norm.weight", r"lacks backbone tensor\(s\) \['final_norm.weight'\]"),
             "untied": ({"lm_head.weight": torch.zeros(64, 32)}, None, "differs from embed_tokens"),
             "query gap": ({}, "block_attnres.queries.1", "without gaps"),
             "wrong shape": ({"layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}, None, "wrong shape")}
    for name, (add, remove, match) in cases.items():
        sd = upstream_state(bb, extras=False)
        sd.update(add)
        sd.pop(remove, None)
        torch.save({"model_state_dict": sd}, tmp_path / f"{name}.pt")
        with pytest.raises(InputError, match=match):
            import_reference(tmp_path / f"{name}.pt", expected=CFG)


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    bb = backbone()
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "model_state_dict": upstream_state(bb), "config": Evil(marker)}, evil)
    torch.save({"model_state_dict": upstream_state(bb), "x": [EvalEvil()]}, tmp_path / "eval.pt")
    system = f"{os.system.__module__}.system"  # posix.system on Linux
    with pytest.raises(InputError, match=rf"refused: its pickle asks to call {system}\(\.\.\.\).*Nothing was executed"):
        import_reference(evil, expected=CFG)
    with pytest.raises(InputError, match=r"call builtins\.eval"):
        load_backbone(tmp_path / "eval.pt", expected=CFG)
    with pytest.raises(InputError, match=system):
        check_reference(evil, {})  # the preflight refuses it too, without reading any weights
    assert ablate_in(tmp_path, monkeypatch, "convert-checkpoint", "evil.pt", "out.safetensors") == 2
    assert system in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_checkpoint_command(ct87, tmp_path, monkeypatch, capsys):
    bb = backbone()
    save_reference_pt(tmp_path / "checkpoint.pt", bb, reference_config(ct87))
    torch.save({"model_state_dict": upstream_state(bb)}, tmp_path / "old.pt")  # predates config persistence
    forget_ct87()
    assert ablate_in(tmp_path, monkeypatch, "convert-checkpoint", "checkpoint.pt", "bb.safetensors") == 0
    out = capsys.readouterr().out
    assert "step 2048" in out and "engram_residual.conv1d.weight" in out and "wrote bb.safetensors" in out
    assert torch.equal(logits(load_backbone(tmp_path / "bb.safetensors", expected=CFG).eval()), logits(bb))
    assert ablate_in(tmp_path, monkeypatch, "convert-checkpoint", "old.pt", "old.safetensors") == 2
    assert "--spec" in capsys.readouterr().err and not (tmp_path / "old.safetensors").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"hello world, not a checkpoint")
    assert checkpoint_format(tmp_path / "junk.pt") == "ablate"  # left to the safetensors reader
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_backbone(tmp_path / "junk.pt", expected=CFG)
    with pytest.raises(InputError, match="not a reference checkpoint"):
        import_reference(tmp_path / "junk.pt")
    torch.save({"model_state_dict": upstream_state(backbone())}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable torch.save checkpoint"):
        import_reference(tmp_path / "trunc.pt", expected=CFG)
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy"):
        load_backbone(tmp_path / "legacy.pt", expected=CFG)
    ablate_named = {k: v.contiguous() for k, v in backbone().state_dict().items()}
    save_file({**ablate_named, "lm_head.weight": torch.zeros(3)}, str(tmp_path / "mixed.safetensors"))
    assert checkpoint_format(tmp_path / "mixed.safetensors") == "ablate"  # ablate's names win


def test_backbone_stage_imports_a_reference_checkpoint_once(ct87, tmp_path):
    from ablate.pipeline import stages
    from ablate.api.components import TokenCorpus
    from ablate.api.plugins import load_registry
    from ablate.config.spec import load_spec
    from ablate.pipeline.ui import QuietUI

    demo = Path(__file__).resolve().parents[2] / "specs" / "demo.toml"
    spec = load_spec(demo, ['backbone.source="checkpoint"', f'backbone.checkpoint="{tmp_path / "checkpoint.pt"}"'],
                     "tiny", load_registry())
    config = stages.backbone_config(spec, 256)
    torch.manual_seed(3)
    bb = Backbone(config).eval()
    fields = {**config.to_dict(), "rms_norm_eps": config.norm_eps, "engram_injection_layer": 2, "engram_dim": 32,
              "tie_embeddings": True}
    del fields["norm_eps"]
    save_reference_pt(tmp_path / "checkpoint.pt", bb, ct87(**fields))
    forget_ct87()
    stages.check_backbone_checkpoint(spec)  # preflight: safe pickle, config matches [backbone]
    corpus = TokenCorpus(train=torch.arange(300) % 256, val=torch.arange(100) % 256, vocab_size=256, eos_id=0)
    r_corpus = stages.StageResult("corpus", "corpus-key", tmp_path, True, 0.0, {}, "corpus-digest")
    results = [stages.backbone_stage(stages.StageContext(tmp_path / "cache", spec, "cpu", QuietUI()), r_corpus, corpus) for _ in range(2)]
    assert [r.cached for r in results] == [False, True] and results[0].path == results[1].path
    assert results[0].info["step"] == 2048 and "engram_residual.conv1d.weight" in str(results[0].info)
    loaded = load_backbone(results[0].path, expected=config).eval()  # what the cells load
    x = torch.arange(12).reshape(1, 12) * 7 % 256
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(x)), bb.logits(bb(x)))

    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": upstream_state(backbone()), "x": Evil(tmp_path / "pwned")}, evil)
    bad = load_spec(demo, ['backbone.source="checkpoint"', f'backbone.checkpoint="{evil}"'], "tiny", load_registry())
    with pytest.raises(InputError, match="refused"):
        stages.check_backbone_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_init_adapters_starts_the_cells_from_the_checkpoints_adapters(ct87, tmp_path):
    """With [backbone] init_adapters = true every injection and router parameter of a cell starts
    from the reference checkpoint's tensors (§11.2 names); without it the adapters start fresh."""
    from ablate.training import cells
    from ablate.pipeline import stages
    from ablate.api.components import TokenCorpus
    from ablate.api.plugins import load_registry
    from ablate.config.spec import load_spec
    from ablate.pipeline.ui import QuietUI

    demo = Path(__file__).resolve().parents[2] / "specs" / "demo.toml"
    src = [f'backbone.source="checkpoint"', f'backbone.checkpoint="{tmp_path / "checkpoint.pt"}"']
    spec = load_spec(demo, [*src, "backbone.init_adapters=true"], "tiny", load_registry())
    fresh_spec = load_spec(demo, src, "tiny", load_registry())
    config = stages.backbone_config(spec, 256)
    bb = Backbone(config).eval()
    state = upstream_state(bb, extras=False)
    d, e = spec.backbone.hidden_dim, spec.oracle.engram_dim
    upstream_names = {"alpha": (), "engram_xattn.retrieval_query_proj.weight": (e, d),
                      "engram_xattn.retrieval_norm.weight": (e,), "engram_xattn.retrieval_norm.bias": (e,),
                      "engram_xattn.q_proj.weight": (d, d), "engram_xattn.k_proj.weight": (d, e),
                      "engram_xattn.v_proj.weight": (d, e), "engram_xattn.o_proj.weight": (d, d),
                      "engram_xattn.q_norm.weight": (d // spec.model.num_heads,),
                      "engram_xattn.k_norm.weight": (d // spec.model.num_heads,)}
    g = torch.Generator().manual_seed(5)
    for layer in spec.model.inject_layers:
        state.update({f"engram_injections.{layer}.{n}": torch.randn(s, generator=g) for n, s in upstream_names.items()})
    state["engram_skip_router.W_align.weight"] = torch.randn(d, d, generator=g)
    state["engram_skip_router.log_alpha"] = torch.tensor(-1.5)
    torch.save({"step": 100, "model_state_dict": state}, tmp_path / "checkpoint.pt")
    corpus = TokenCorpus(train=torch.arange(300) % 256, val=torch.arange(100) % 256, vocab_size=256, eos_id=0)
    r_corpus = stages.StageResult("corpus", "corpus-key", tmp_path, True, 0.0, {}, "corpus-digest")
    r_bb = stages.backbone_stage(stages.StageContext(tmp_path / "cache", spec, "cpu", QuietUI()), r_corpus, corpus)
    table = torch.randn(spec.oracle.rows, e)
    router_cell = next(c for c in spec.cells if c.router)
    student = cells.build_student(spec, router_cell, r_bb.path, 256, table, "cpu")
    params = dict(student.named_parameters())
    layer = spec.model.inject_layers[-1]
    assert torch.equal(params[f"engram_injections.{layer}.gate"], state[f"engram_injections.{layer}.alpha"])
    assert torch.equal(params[f"engram_injections.{layer}.xattn.W_k.weight"],
                       state[f"engram_injections.{layer}.engram_xattn.k_proj.weight"])
    assert torch.equal(params[f"engram_injections.{layer}.xattn.row_norm.bias"],
                       state[f"engram_injections.{layer}.engram_xattn.retrieval_norm.bias"])
    assert torch.equal(params["engram_skip_router.W_align.weight"], state["engram_skip_router.W_align.weight"])
    assert params["engram_skip_router.log_alpha"].item() == -1.5
    fresh = cells.build_student(fresh_spec, router_cell, r_bb.path, 256, table, "cpu")
    assert not fresh.engram_skip_router.W_align.weight.any()  # fresh: W_align starts at zero
    assert cells.cell_key(spec, router_cell, {}, type(student)) != cells.cell_key(fresh_spec, router_cell, {}, type(student))

    del state[f"engram_injections.{layer}.engram_xattn.v_proj.weight"]
    torch.save({"step": 100, "model_state_dict": state}, tmp_path / "checkpoint.pt")
    r_bb = stages.backbone_stage(stages.StageContext(tmp_path / "cache2", spec, "cpu", QuietUI()), r_corpus, corpus)
    with pytest.raises(InputError, match="lacks or mis-shapes adapter tensors"):
        cells.build_student(spec, router_cell, r_bb.path, 256, table, "cpu")
