"""ablate.pipeline.memory: the per-stage peak-memory estimate against the peaks measured at
reference dimensions, the refusal of specs that cannot fit, and that small specs fit trivially."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ablate.api.plugins import load_registry
from ablate.cli import main as cli
from ablate.config.spec import load_spec
from ablate.errors import SpecError
from ablate.pipeline import memory
from ablate.pipeline.memory import GIB, Limit
from tests.cli_run import ablate_in

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = load_registry([])

# Peaks measured by `ablate run` (meter: torch.cuda.max_memory_allocated / max_memory_reserved per
# stage, allocator cache emptied at each stage's start) at reference dimensions: scripts/fullscale_random.sh
# (specs/zeb139.toml, TinyLlama-1.1B architecture as teacher, 10,000 rows, vocab 32,000, engram_dim 128,
# batch 4 × 2048, bf16, oracle over 4M tokens). The oracle's figures: docs/performance.md, "A measured
# full-scale run", and checks on one H200 (2026-11-29; the oracle after the teacher stopped keeping all of
# its hidden states: 9.66 / 11.29). The probes': scripts/gpu-check.sh's full-dimension run on one H200
# (2026-11-30, commit efe465d: the probes' arithmetic in chunks of 1,024 positions, traces forming only
# the logits a probe reads; 11.69-11.74 / 12.26-15.59 before). The cells' figures are those of the fused loss head (one
# H200, 2026-11-29, commit fcdbca3 with this estimate: scripts/gpu-check.sh's full-dimension run, 200 steps,
# eager under train.compile = "auto", and the same spec with --set train.steps=20 --set train.compile=on;
# per cell from results.json, reserved per cells stage). (low, high) in GiB.
MEASURED = {
    "oracle": {"allocated": (9.66, 9.66), "reserved": (11.29, 11.29)},
    "cells, router on, compiled": {"allocated": (3.77, 3.81), "reserved": (4.19, 4.19)},
    "cells, router off, compiled": {"allocated": (1.95, 2.00)},
    "cells, router on, eager": {"allocated": (5.73, 5.73), "reserved": (6.09, 6.09)},
    "cells, router off, eager": {"allocated": (3.92, 3.95)},
    "probes": {"allocated": (6.34, 6.34), "reserved": (6.59, 6.59)},
}
TOLERANCE = 0.20  # P12: the estimate within ±20 % of the measured peak

TINYLLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                    "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False}


def reference_spec(tmp_path: Path, *extra: str):
    """specs/zeb139.toml as scripts/fullscale_random.sh runs it (a TinyLlama-shaped config.json,
    random weights, the oracle limited to 4M tokens)."""
    arch = tmp_path / "tinyllama-arch"
    arch.mkdir(exist_ok=True)
    (arch / "config.json").write_text(json.dumps(TINYLLAMA_CONFIG))
    overrides = ["oracle.max_tokens=4000000", "teacher.plugin=hf-causal-lm", f'teacher.model="{arch}"',
                 "teacher.random_init=true", "axes.teacher=hf-causal-lm", *extra]
    return load_spec(ROOT / "specs" / "zeb139.toml", overrides, None, REGISTRY)


def _within(estimate_gib: float, measured: tuple[float, float]) -> bool:
    return all(abs(estimate_gib - m) <= TOLERANCE * m for m in measured)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_estimates_within_20_percent_of_the_measured_peaks(tmp_path, compiled):
    spec = reference_spec(tmp_path, f'train.compile="{"on" if compiled else "off"}"', "train.fuse=off")
    stages = {s.stage.split(" ")[0]: s for s in memory.estimate(spec, "cuda", REGISTRY)}
    cells = memory.cell_memory(spec, "cuda", REGISTRY)
    mode = "compiled" if compiled else "eager"
    got = {"oracle": stages["oracle"], "probes": stages["probes"],
           f"cells, router on, {mode}": cells["router_on_real@lambda=0.5"],
           f"cells, router off, {mode}": cells["router_off_real"]}
    assert stages["cells"].allocated_bytes == cells["router_on_real@lambda=0.5"].allocated_bytes  # the largest
    for name, stage in got.items():
        for kind, measured in MEASURED[name].items():
            value = (stage.allocated_bytes if kind == "allocated" else stage.reserved_bytes) / GIB
            assert _within(value, measured), f"{name} {kind}: estimate {value:.2f} GiB, measured {measured}"


def test_reference_fits_a_16_gib_card_but_not_an_8_gib_one(tmp_path):
    """As it stands (2000 steps per cell: compiled, so train.fuse = "auto" fuses the six cells on
    CUDA) the reference fits 16 GiB; under 8 GiB the oracle and the fused group are refused, the
    group naming train.fuse (the probes, 7.2 GiB, fit), and under 6 GiB the probes too."""
    spec = reference_spec(tmp_path)
    memory.check(spec, Limit("cuda", 16 * GIB, "--memory-budget 16 GiB", budget=True), REGISTRY)
    with pytest.raises(SpecError) as err:
        memory.check(spec, Limit("cuda", 8 * GIB, "--memory-budget 8 GiB", budget=True), REGISTRY)
    text = str(err.value)
    assert "the oracle stage" in text and "the probes stage" not in text and "the cells (fused group" in text
    assert "oracle.batch or oracle.seq_len" in text and 'set train.fuse = "off"' in text
    with pytest.raises(SpecError) as err:
        memory.check(spec, Limit("cuda", 6 * GIB, "--memory-budget 6 GiB", budget=True), REGISTRY)
    assert "probes.batch or probes.seq_len" in str(err.value)


def test_a_billion_rows_is_refused_naming_the_oracle_and_its_rows(tmp_path):
    spec = reference_spec(tmp_path, "oracle.rows=1000000000")
    for limit in (Limit("cuda", 141 * GIB, "141 GiB of this GPU", 512 * GIB), Limit("cpu", 64 * GIB, "64 GiB")):
        with pytest.raises(SpecError) as err:
            memory.check(spec, limit, REGISTRY, "zeb139.toml")
        first = err.value.problems[0]
        assert first[0] == "oracle.rows" and first[1].startswith("the oracle stage would need about")
        assert "sidecar sums [1,000,000,001 × 32,000] float32: 119,209.3 GiB" in first[1]
        assert "To fit, lower oracle.rows" in first[1]
        assert len(err.value.problems) == 3  # oracle, cells, probes: one paragraph each
        assert err.value.exit_code == 2


def test_cli_validate_refuses_a_billion_rows_and_checks_the_budget(tmp_path, monkeypatch, capsys):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "zeb139.toml").write_text((ROOT / "specs" / "zeb139.toml").read_text())
    args = ["validate", "specs/zeb139.toml"]
    assert ablate_in(tmp_path, monkeypatch, *args, "--set", "oracle.rows=1000000000") == 2
    err = capsys.readouterr().err
    assert "oracle.rows: the oracle stage would need about" in err and "Traceback" not in err
    assert ablate_in(tmp_path, monkeypatch, *args, "--memory-budget", "16GiB") == 0
    assert ablate_in(tmp_path, monkeypatch, *args, "--memory-budget", "10GiB") == 2
    err = capsys.readouterr().err
    assert "more than the --memory-budget 10.0 GiB" in err and "the oracle stage" in err and "fused group" in err
    with pytest.raises(SystemExit) as bad:
        cli.main([*args, "--memory-budget", "lots"])
    assert bad.value.code == 2


@pytest.mark.parametrize("spec_args", [("demo.toml", "tiny"), ("demo.toml", None), ("zeb139.toml", "smoke")])
def test_small_specs_fit_trivially(spec_args):
    name, profile = spec_args
    spec = load_spec(ROOT / "specs" / name, [], profile, REGISTRY)
    for device in ("cuda", "cpu"):
        stages = memory.check(spec, Limit(device, 3 * GIB, "3 GiB", 3 * GIB), REGISTRY)
        assert all(s.reserved_bytes < 1 * GIB for s in stages)


def test_the_run_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "demo.toml").write_text((ROOT / "specs" / "demo.toml").read_text())
    code = ablate_in(tmp_path, monkeypatch, "run", "demo.toml", "--profile", "tiny", "--device", "cpu", "--quiet",
                     "--set", "oracle.rows=2000000000")
    assert code == 2
    assert "oracle.rows: the oracle stage would need about" in capsys.readouterr().err
    assert not (tmp_path / ".ablate-cache").exists() or not any((tmp_path / ".ablate-cache").iterdir())


def test_plan_prints_the_table_and_does_not_refuse(tmp_path, monkeypatch, capsys):
    (tmp_path / "demo.toml").write_text((ROOT / "specs" / "demo.toml").read_text())
    assert ablate_in(tmp_path, monkeypatch, "plan", "demo.toml", "--profile", "tiny",
                     "--memory-budget", "1MiB") == 0
    out = capsys.readouterr().out
    assert "estimated peak memory of demo on CUDA" in out and "GPU GiB" in out
    assert "does not fit --memory-budget" in out
    out = " ".join(out.split())  # the console wraps long lines
    # the tiny profile's 4 cells train few steps: eager on CUDA, so "auto" fuses nowhere
    assert 'on CUDA: every cell on its own; on the CPU: every cell on its own (train.fuse = "auto"' in out
    assert ablate_in(tmp_path, monkeypatch, "plan", "demo.toml", "--profile", "tiny", "--set", "train.fuse=on") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "on CUDA: [" in out and "] as fused group; on the CPU: [" in out


def test_corpus_tokens_from_shard_headers(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(1000, dtype=np.int32))
    np.save(tmp_path / "b.npy", np.zeros(234, dtype=np.uint16))
    raw_spec = load_spec(ROOT / "specs" / "zeb139.toml", [f'corpus.paths=["{tmp_path}/*.npy"]'], None, REGISTRY)
    assert memory.corpus_tokens(raw_spec) == 1234
    assert memory.corpus_tokens(load_spec(ROOT / "specs" / "zeb139.toml", [], None, REGISTRY)) is None  # no shards here


def test_teacher_size_from_config_or_tinyllama_fallback(tmp_path):
    spec = load_spec(ROOT / "specs" / "zeb139.toml", [], None, REGISTRY)
    shape = memory.teacher_shape(spec, "cuda", 32000)
    assert shape.params == 1_100_048_384 and shape.dtype_bytes == 2 and shape.states == 1  # the hooked layer only
    local = memory.teacher_shape(load_spec(ROOT / "specs" / "demo.toml", [], None, REGISTRY), "cuda", 512)
    assert local.trains and local.dtype_bytes == 4  # llama-local defaults to float32


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * GIB), ("16G", 16 * GIB), ("16 GB", 16 * 10**9),
                                           ("512MiB", 512 * 2**20), ("1.5TiB", int(1.5 * 2**40)), ("24", 24 * GIB)])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "16 parsecs", "-3GiB", "16iB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        memory.parse_size(text)


# One H200, `ablate bench --size full` (2026-11-29, commit fcdbca3's working tree, the fused loss head):
# the six ZEB-139 cells (two router-off CE, four router-on KL+CE, one sidecar) as one fused group,
# compiled, batch 4 × 2048: peak 2.47 GiB allocated, 11.89 GiB reserved (most of it the compiled group's
# CUDA-graph pool, which the allocated figure does not see; docs/performance.md, "Fused cells"). With whole
# logits (commit dc5fd41) it was 7.27 / 21.46.
MEASURED_FUSED_GROUP_RESERVED = 11.89


def test_a_fused_group_is_planned_as_one_stage_within_20_percent_of_the_measured_group(tmp_path):
    """train.fuse = "auto" on CUDA, compiled (2000 steps per cell): the cells stage is the group of all
    six cells (one data seed); it needs
    more than the largest cell alone and less than the six cells' peaks added (the frozen backbone
    and the shared sidecars count once), and its reserved estimate is within ±20 % of the group's
    measured peak."""
    auto = reference_spec(tmp_path, "train.fuse=auto")
    groups = memory.fused_groups(auto, "cuda")
    assert [len(g) for g in groups] == [6]
    assert not memory.fused_groups(auto, "cpu")  # "auto" fuses on CUDA only
    assert not memory.fused_groups(reference_spec(tmp_path, 'numerics="upstream"'), "cuda")  # whole logits
    assert not memory.fused_groups(reference_spec(tmp_path, "train.fuse=auto", "train.steps=200"), "cuda")  # eager
    cells = {s.stage: s for s in memory.estimate(auto, "cuda", REGISTRY)}
    group = next(s for name, s in cells.items() if name.startswith("cells (fused group"))
    alone = memory.cell_memory(auto, "cuda", REGISTRY)
    assert max(s.allocated_bytes for s in alone.values()) < group.allocated_bytes < sum(
        s.allocated_bytes for s in alone.values())
    assert _within(group.reserved_bytes / GIB, (MEASURED_FUSED_GROUP_RESERVED,))
    assert [len(g) for g in memory.fused_groups(reference_spec(tmp_path, "train.fuse=on", "train.steps=200"),
                                                "cpu")] == [6]
    assert not memory.fused_groups(reference_spec(tmp_path, "train.fuse=off"), "cuda")
    assert not memory.fused_groups(reference_spec(tmp_path, "train.fuse=auto", 'executor.plugin="ray"'), "cuda")


def test_a_fused_group_that_cannot_fit_is_refused_naming_train_fuse(tmp_path):
    """The six-cell group (measured 11.89 GiB reserved) fits a 16 GB card; under a 9 GiB budget its
    paragraph names train.fuse first, and with train.fuse = "off" the cells fit that budget (only the
    oracle and the probes are refused)."""
    memory.check(reference_spec(tmp_path, "train.fuse=auto"),
                 Limit("cuda", 16 * GIB, "--memory-budget 16 GiB", budget=True), REGISTRY)
    limit = Limit("cuda", 9 * GIB, "--memory-budget 9 GiB", budget=True)
    with pytest.raises(SpecError) as err:
        memory.check(reference_spec(tmp_path, "train.fuse=auto"), limit, REGISTRY)
    cells = [(knob, text) for knob, text in err.value.problems if text.startswith("the cells")]
    assert len(cells) == 1
    knob, text = cells[0]
    assert knob == "train.fuse" and text.startswith("the cells (fused group: router_off_real")
    assert 'To fit, set train.fuse = "off"' in text
    with pytest.raises(SpecError) as err:
        memory.check(reference_spec(tmp_path, "train.fuse=off"), limit, REGISTRY)
    assert not any(text.startswith("the cells") for _, text in err.value.problems)


def test_an_eager_fused_group_counts_every_members_eager_intermediates(tmp_path):
    """train.fuse = "on" with the cells eager (200 steps per cell: "auto" would not compile them, nor
    fuse them): every member's eager intermediates live until the group's backward, six times one
    cell's extra; such a group does not fit a 16 GiB budget and the refusal names train.fuse."""
    eager = reference_spec(tmp_path, "train.fuse=on", "train.steps=200")
    group = next(s for s in memory.estimate(eager, "cuda", REGISTRY) if s.stage.startswith("cells (fused group"))
    one = memory.cell_memory(eager, "cuda", REGISTRY)["router_on_real@lambda=0.5"]
    extra_one = sum(t.bytes for t in one.device if t.short == "eager extra")
    extra_group = sum(t.bytes for t in group.device if t.short == "eager extra")
    assert extra_one > 0 and extra_group == 6 * extra_one
    assert not any(t.short == "logits" for t in group.device)  # the fused loss head forms no whole logits
    with pytest.raises(SpecError) as err:
        memory.check(eager, Limit("cuda", 16 * GIB, "--memory-budget 16 GiB", budget=True), REGISTRY)
    cells = [(knob, text) for knob, text in err.value.problems if text.startswith("the cells")]
    assert len(cells) == 1 and cells[0][0] == "train.fuse" and "eager execution's intermediates" in cells[0][1]


def test_cells_with_different_seeds_are_separate_groups(tmp_path):
    """Cells of different [sweep] seeds see different windows: they never share a group."""
    spec = load_spec(ROOT / "specs" / "demo.toml", ["train.fuse=on"], "tiny", REGISTRY)
    assert [len(g) for g in memory.fused_groups(spec, "cpu")] == [len(spec.cells)]
    seeded = load_spec(ROOT / "specs" / "demo.toml", ["train.fuse=on", "sweep.seed=[0, 1]"], "tiny", REGISTRY)
    groups = memory.fused_groups(seeded, "cpu")
    assert len(groups) == 2 and all({c.seed for c in g} == {g[0].seed} for g in groups)
