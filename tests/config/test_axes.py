"""`[axes]` labels are checked (issue P8.8): `objective` names an objective some cell runs,
`teacher` the teacher plugin in use or a label it declares; a typo lists the allowed values."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from ablate.errors import SpecError
from ablate.api.plugins import load_registry
from ablate.config.spec import load_spec, spec_from_dict
from cli_run import ablate_in

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
REGISTRY = load_registry()


def axes_problems(raw) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, registry=REGISTRY)
    return dict(info.value.problems)


@pytest.mark.parametrize("axis, typo, allowed", [("objective", "kl-ce", "allowed: ce, kl_ce, unspecified"),
                                                 ("teacher", "llama_local", "allowed: llama-local, unspecified")])
def test_an_axis_typo_is_a_spec_error_listing_the_allowed_values(axis, typo, allowed, tmp_path, monkeypatch, capsys):
    shutil.copy(DEMO, tmp_path / "demo.toml")
    assert ablate_in(tmp_path, monkeypatch, "validate", "demo.toml", "--set", f'axes.{axis}="{typo}"') == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"axes.{axis}: '{typo}'" in err and allowed in err


def test_unspecified_and_declared_teacher_labels_are_allowed(monkeypatch):
    raw = tomllib.loads(DEMO.read_text())
    raw["axes"] = {"objective": "unspecified", "teacher": "unspecified"}
    spec_from_dict(raw, registry=REGISTRY)
    raw["axes"]["teacher"] = "llama-125m"
    assert "axes.teacher" in axes_problems(raw)
    monkeypatch.setattr(REGISTRY.get("teacher", "llama-local"), "axis_labels", ("llama-125m",))
    assert spec_from_dict(raw, registry=REGISTRY).axes.teacher == "llama-125m"


def test_a_swept_objective_replaces_the_cells_own():
    raw = tomllib.loads(DEMO.read_text())
    raw["sweep"] = {"cells": ["router_on_real", "router_on_shuf"], "objective": [{"name": "jsd", "lambda": 0.5}]}
    raw["axes"]["objective"] = "jsd"
    spec_from_dict(raw, registry=REGISTRY)
    raw["axes"]["objective"] = "kl_ce"  # no cell runs kl_ce once the sweep replaced it
    assert axes_problems(raw)["axes.objective"].endswith("allowed: ce, jsd, unspecified")


def test_a_switched_teacher_needs_its_axis_label_switched_too():
    raw = tomllib.loads(DEMO.read_text())
    raw["teacher"] = {"plugin": "same-arch"}
    assert "axes.teacher" in axes_problems(raw)
    raw["axes"]["teacher"] = "same-arch"
    spec_from_dict(raw, registry=REGISTRY)


SPECS = sorted((ROOT / "specs").glob("*.toml")) + sorted((ROOT / "specs" / "calibration").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_the_shipped_specs_validate_with_every_profile(path):
    for profile in [None, *tomllib.loads(path.read_text()).get("profiles", {})]:
        load_spec(path, profile=profile, registry=REGISTRY)
