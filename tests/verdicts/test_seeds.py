"""Seeds as a sweep axis: `[sweep] seed = [...]` expands every cell into `cell@...,seed=N`, each
seed trains with its own adapter init and training batches, pairs and discriminators are formed
within a seed, and every threshold is read over its seed group (verdict tests: test_verdict.py)."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from ablate.training import cells as cellmod
from ablate.pipeline import probing
from ablate.errors import SpecError
from ablate.api.plugins import load_registry
from ablate.verdicts.results import discriminated_pairs
from ablate.config.spec import load_spec, seed_groups, spec_from_dict
from cli_run import ablate_in

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
REGISTRY = load_registry()
SEEDS = "sweep.seed=[0,1,2]"


def test_the_seed_axis_expands_every_cell_and_comes_last():
    spec = load_spec(DEMO, [SEEDS], "tiny", REGISTRY)
    assert [c.name for c in spec.cells] == [f"{name}@seed={s}" for name in
                                            ("router_off_real", "router_off_shuf", "router_on_real", "router_on_shuf")
                                            for s in (0, 1, 2)]
    assert [c.seed for c in spec.cells] == [0, 1, 2] * 4
    # with another axis on some cells: that axis first, the seed on every cell
    spec = load_spec(ROOT / "specs" / "zeb139.toml", ["sweep.seed=[3,4]"], "smoke", REGISTRY)
    names = [c.name for c in spec.cells]
    assert "router_on_real@lambda=0.9,seed=4" in names and "router_off_real@seed=3" in names
    by_name = {c.name: c for c in spec.cells}
    swept = by_name["router_on_real@lambda=0.9,seed=4"]
    assert (swept.base_name, swept.sweep, swept.seed_group) == ("router_on_real", {"lambda": "0.9", "seed": "4"},
                                                              "router_on_real@lambda=0.9")
    assert swept.objective.params()["lambda"] == 0.9 and swept.seed == 4  # the values themselves, as fields
    assert by_name["router_off_real@seed=3"].seed_group == "router_off_real"
    plain = load_spec(ROOT / "specs" / "zeb139.toml", [], "smoke", REGISTRY).cells[0]
    assert (plain.base_name, plain.sweep_label, plain.seed_group) == (plain.name, "", plain.name)
    groups = seed_groups(spec.cells)
    assert groups["router_on_real@lambda=0.9"][1].name == "router_on_real@lambda=0.9,seed=4"
    assert all(len(cells) == 2 for cells in groups.values())


def test_pairs_and_discriminators_are_formed_within_a_seed():
    spec = load_spec(DEMO, [SEEDS], "tiny", REGISTRY)
    pairs = probing.pairs(spec)
    assert len(pairs) == 6
    for real, control in pairs:
        assert real.split("@")[1] == control.split("@")[1]  # same seed
    assert discriminated_pairs(spec) == [(f"router_on_real@seed={s}", f"router_on_shuf@seed={s}") for s in (0, 1, 2)]


def test_a_seed_changes_the_adapters_init_and_training_batches_only():
    spec = load_spec(DEMO, [SEEDS], "tiny", REGISTRY)
    plain = load_spec(DEMO, [], "tiny", REGISTRY)
    t = spec.train
    by_name = {c.name: c for c in spec.cells}
    assert cellmod.training_seeds(spec, by_name["router_on_real@seed=0"]) == (t.model_seed, t.data_seed)
    assert cellmod.training_seeds(spec, by_name["router_on_real@seed=2"]) == (t.model_seed + 2, t.data_seed + 2)
    assert cellmod.training_seeds(plain, plain.cells[0]) == (t.model_seed, t.data_seed)
    cfg0 = cellmod.train_config(spec, by_name["router_on_real@seed=0"], None)
    cfg2 = cellmod.train_config(spec, by_name["router_on_real@seed=2"], None)
    assert cfg2.data_seed == cfg0.data_seed + 2 and cfg2.val_seed == cfg0.val_seed  # same validation windows


def test_a_cell_without_a_seed_keeps_its_cache_key(monkeypatch):
    """The new field is left out of the key of a cell that has no seed, so cached cells stay valid."""
    import ablate.pipeline.stages as stages

    seen = []
    monkeypatch.setattr(stages, "component_stage_key", lambda kind, config, *a: seen.append(config) or "k")
    plain = load_spec(DEMO, [], "tiny", REGISTRY)
    seeded = load_spec(DEMO, [SEEDS], "tiny", REGISTRY)
    obj = REGISTRY.get("objective", "ce")
    cellmod.cell_key(plain, plain.cells[0], {}, obj)
    cellmod.cell_key(seeded, seeded.cells[1], {}, obj)
    assert "seed" not in seen[0]["cell"] and seen[1]["cell"]["seed"] == 1


@pytest.mark.parametrize("value, fragment", [("[0,0]", "distinct"), ("[-1]", "non-negative"), ("[0.5]", "integers"),
                                             ("[]", "non-empty")])
def test_bad_seed_axes_are_spec_errors(value, fragment):
    with pytest.raises(SpecError) as err:
        spec_from_dict(tomllib.loads(DEMO.read_text()), [f"sweep.seed={value}"], "tiny", REGISTRY)
    assert "sweep.seed" in str(err.value) and fragment in str(err.value)


@pytest.mark.slow
def test_demo_over_three_seeds_records_intervals(tmp_path, monkeypatch):
    """The demo (tiny, a few steps) over seeds 0, 1, 2: every threshold carries n_seeds, mean, ci_low,
    ci_high and a verdict read on the interval; combinations and discriminators are per seed group;
    the report opens with its summary and shows the intervals."""
    shutil.copy(DEMO, tmp_path / "demo.toml")
    code = ablate_in(tmp_path, monkeypatch, "run", "demo.toml", "--profile", "tiny", "--set", "backbone.pretrain.steps=2",
                     "--set", "teacher.steps=2", "--set", "train.steps=6", "--set", SEEDS, "--device", "cpu", "--quiet")
    assert code == 0
    r = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    assert r["seeds"]["seeds"] == [0, 1, 2] and "Student-t" in r["seeds"]["method"]
    assert {p["real"].split("@")[1] for p in r["pairs"]} == {"seed=0", "seed=1", "seed=2"}
    assert all(p["real"].split("@")[1] == p["shuffled"].split("@")[1] for p in r["pairs"])
    assert {t["cell"] for t in r["thresholds"]} == {"router_on_real", "router_on_shuf"}
    for t in r["thresholds"]:
        assert t["n_seeds"] == 3 and [s["seed"] for s in t["seeds"]] == [0, 1, 2]
        assert t["ci_low"] <= t["mean"] <= t["ci_high"] and t["value"] == t["mean"]
        assert t["verdict"] in ("HOLD", "BREAK", "UNDECIDED")
        values = [s["value"] for s in t["seeds"]]
        assert t["mean"] == pytest.approx(sum(values) / 3)
    assert set(r["combination"]) == {"router_on_real", "router_on_shuf"}
    assert [len(c["per_seed"]) for c in r["combination"].values()] == [3, 3]
    (d,) = r["discriminator"]
    assert (d["real"], d["shuffled"], d["n_seeds"]) == ("router_on_real", "router_on_shuf", 3)
    assert [p["seed"] for p in d["per_seed"]] == [0, 1, 2]
    assert r["noise_floor"] and r["noise_floor"][0]["real"] == "router_off_real"
    assert r["noise_floor"][0]["seeds"] == [0, 1, 2]
    report = (tmp_path / "reports" / "demo.md").read_text()
    assert report.index("## Summary") < report.index("## Conventions")
    assert "router_on_real vs router_on_shuf: **" in report.split("## Conventions")[0]
    assert "95% t-interval [" in report and "**Seed 0 alone vs all seeds:**" in report
    assert "noise floor: router-off content_gain" in report


def test_verdicts_re_read_on_subsets_of_seeds(tmp_path):
    """read_subset (the calibration rates of docs/calibration.md) on all seeds gives the run's own
    verdicts, and on one seed that seed's own verdicts and outcome."""
    from ablate.verdicts.results import read_subset, seed_rates
    from report_fixtures import seeded_results

    r = seeded_results(tmp_path)
    whole = read_subset(r, {0, 1, 2})
    assert {k: v for k, v in whole.items() if k[0] != "discriminator"} == {(t["name"], t["cell"]): t["verdict"]
                                                                          for t in r["thresholds"]}
    assert whole[("discriminator", "router_on_real")] == r["discriminator"][0]["outcome"] == "undecided"
    for seed in (0, 1, 2):
        one = read_subset(r, {seed})
        assert all(one[(t["name"], t["cell"])] == t["seeds"][seed]["verdict"] for t in r["thresholds"])
        assert one[("discriminator", "router_on_real")] == r["discriminator"][0]["per_seed"][seed]["outcome"]
    text = seed_rates(r, k=2)
    assert "cross_run@router_on_real: single seeds BREAK 1/3, HOLD 2/3; 2-seed intervals" in text
    assert "discriminator@router_on_real: single seeds clean_positive 1/3, holds 2/3" in text
