"""The spec loader: schema, overrides, profiles, sweeps, plugin checks, and a fuzz that never
produces a traceback."""

import copy
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ablate.cli import main as cli
from ablate.errors import SpecError
from ablate.api.plugins import load_registry
from ablate.config.spec import apply_override, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
RAW = tomllib.loads(DEMO.read_text())
REGISTRY = load_registry()


def problems_of(raw, **kw):
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, registry=REGISTRY, **kw)
    return info.value.problems


def test_demo_spec_is_valid():
    spec = load_spec(DEMO, registry=REGISTRY)
    assert [c.name for c in spec.cells] == ["router_off_real", "router_off_shuf", "router_on_real", "router_on_shuf"]
    assert spec.cells[2].objective.params() == {"lambda": 0.5}


def test_every_problem_reported_at_once_with_location():
    raw = copy.deepcopy(RAW)
    raw["train"]["steps"] = "many"
    raw["oracle"]["rowz"] = 3
    raw["cells"][1]["router"] = "maybe"
    locs = [loc for loc, _ in problems_of(raw)]
    assert "train.steps" in locs and "oracle.rowz" in locs and "cells[1].router" in locs


def test_unknown_objective_lists_available():
    raw = copy.deepcopy(RAW)
    raw["cells"][2]["objective"] = {"name": "kl_cee", "lambda": 0.5}
    (loc, msg), = problems_of(raw)
    assert loc == "cells[2].objective" and "kl_cee" in msg and "kl_ce" in msg and "Available" in msg


def test_plugin_params_validated_by_plugin():
    raw = copy.deepcopy(RAW)
    raw["cells"][2]["objective"] = {"name": "kl_ce", "lambda": 1.5}
    raw["cells"][3]["objective"] = {"name": "kl_ce", "lambda": 0.5, "lamda": 2}
    probs = problems_of(raw)
    assert any(loc == "cells[2].objective.lambda" for loc, _ in probs)
    assert any(loc == "cells[3].objective.lamda" and "accepts" in msg for loc, msg in probs)


def test_kl_without_router_is_an_error():
    raw = copy.deepcopy(RAW)
    raw["cells"][2]["router"] = False
    assert any("router = true" in msg for _, msg in problems_of(raw))


@pytest.mark.parametrize("similarity", ["auto", "float32", "bf16-rerank"])
def test_similarity_is_a_model_key_refused_under_upstream_numerics(similarity):
    raw = copy.deepcopy(RAW)
    raw.setdefault("model", {})["similarity"] = similarity
    assert spec_from_dict(raw, registry=REGISTRY).model.similarity == similarity
    raw["numerics"] = "upstream"
    assert any("model.similarity" in msg and "upstream" in msg for _, msg in problems_of(raw))
    del raw["model"]["similarity"]
    assert spec_from_dict(raw, registry=REGISTRY).model.similarity == "auto"


def test_duplicate_cells_and_unknown_threshold_metric():
    raw = copy.deepcopy(RAW)
    raw["cells"][1]["name"] = "router_off_real"
    raw["thresholds"][0]["metric"] = "entropy_of_nothing"
    msgs = " ".join(msg for _, msg in problems_of(raw))
    assert "duplicate cell name 'router_off_real'" in msgs and "no probe produces metric 'entropy_of_nothing'" in msgs


def test_override_type_checked_and_unknown_key():
    raw = copy.deepcopy(RAW)
    with pytest.raises(ValueError):
        apply_override(raw, "train.steps=lots")
    assert any(loc == "train.stepz" for loc, _ in problems_of(RAW, overrides=["train.stepz=3"]))
    spec = spec_from_dict(RAW, overrides=["train.steps=7", "cells.0.router=false"], registry=REGISTRY)
    assert spec.train.steps == 7


def test_profile_merges_and_unknown_profile_lists_names():
    spec = spec_from_dict(RAW, profile="tiny", registry=REGISTRY)
    assert spec.train.steps == 20 and spec.train.lr == RAW["train"]["lr"]
    with pytest.raises(SpecError, match="tiny"):
        spec_from_dict(RAW, profile="nope", registry=REGISTRY)


def test_sweep_expands_named_cells():
    raw = copy.deepcopy(RAW)
    raw["sweep"] = {"cells": ["router_on_real", "router_on_shuf"], "objective.lambda": [0.5, 0.9]}
    spec = spec_from_dict(raw, registry=REGISTRY)
    names = [c.name for c in spec.cells]
    assert names == ["router_off_real", "router_off_shuf", "router_on_real@lambda=0.5", "router_on_real@lambda=0.9",
                     "router_on_shuf@lambda=0.5", "router_on_shuf@lambda=0.9"]
    assert spec.cells[3].objective.params()["lambda"] == 0.9


def test_sweep_values_validated_by_plugin():
    raw = copy.deepcopy(RAW)
    raw["sweep"] = {"cells": ["router_on_real"], "objective.lambda": [0.5, 2.0]}
    assert any(loc.startswith("sweep.objective.lambda") for loc, _ in problems_of(raw))


def test_threshold_expression_names_checked():
    raw = copy.deepcopy(RAW)
    raw["thresholds"][0]["break_if"] = {"below": "__import__('os')"}
    raw["thresholds"][1]["break_if"] = {"below": "log_vocabulary - 1"}
    locs = [loc for loc, _ in problems_of(raw)]
    assert "thresholds[0].break_if" in locs and "thresholds[1].break_if" in locs


def test_expected_metrics_name_a_produced_metric_and_a_cell():
    raw = copy.deepcopy(RAW)
    raw["expect"] = {"metrics": {"cross_run_cos@router_on_real": {"above": 0.5},
                                 "cross_run_cos@router_on_reel": {"above": 0.5},
                                 "cross_run_cosine@router_on_real": {"above": 0.5}}}
    probs = dict(problems_of(raw))
    assert set(probs) == {"expect.metrics.cross_run_cos@router_on_reel", "expect.metrics.cross_run_cosine@router_on_real"}
    assert "naming a metric and a cell" in probs["expect.metrics.cross_run_cos@router_on_reel"]
    assert "no probe produces metric 'cross_run_cosine'" in probs["expect.metrics.cross_run_cosine@router_on_real"]


def test_unigram_entropy_is_a_bound_name():
    raw = copy.deepcopy(RAW)
    raw["thresholds"][0]["break_if"] = {"below": "unigram_entropy - 0.1"}
    spec_from_dict(raw, registry=REGISTRY)


# --------------------------------------------------------------------------------- fuzzing

PATHS = [("train", "steps"), ("train", "lr"), ("oracle", "rows"), ("corpus", "vocab_size"), ("model", "top_k"),
         ("backbone", "hidden_dim"), ("teacher", "plugin"), ("corpus", "plugin"), ("train", "precision")]
JUNK = st.one_of(st.none(), st.integers(-10, 10), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def mutated_specs(draw):
    raw = copy.deepcopy(RAW)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "rename", "retype", "cell", "threshold"]))
        section, key = draw(st.sampled_from(PATHS))
        if action == "drop":
            raw[section].pop(key, None)
        elif action == "rename":
            raw[section][key + "_x"] = raw[section].pop(key, 1)
        elif action == "retype":
            raw[section][key] = draw(JUNK)
        elif action == "cell":
            i = draw(st.integers(0, len(raw["cells"]) - 1))
            field = draw(st.sampled_from(["name", "router", "oracle", "objective", "extra"]))
            raw["cells"][i][field] = draw(st.one_of(JUNK, st.sampled_from(["kl_ce", "nope", "real"])))
        else:
            i = draw(st.integers(0, len(raw["thresholds"]) - 1))
            raw["thresholds"][i]["break_if"] = draw(st.one_of(JUNK, st.fixed_dictionaries({"below": JUNK})))
    return raw


def _write_toml(raw: dict, path: Path) -> bool:
    """Serialise with a tiny writer good enough for the fuzz (None values are dropped)."""
    import json

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items() if x is not None) + "}"
        raise TypeError(v)

    lines = []
    for k, v in raw.items():
        if v is None:
            continue
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                lines.append(f"[[{k}]]")
                lines += [f"{json.dumps(a)} = {value(b)}" for a, b in item.items() if b is not None]
        elif isinstance(v, dict):
            lines.append(f"[{k}]")
            lines += [f"{json.dumps(a)} = {value(b)}" for a, b in v.items() if b is not None]
        else:
            lines.insert(0, f"{json.dumps(k)} = {value(v)}")
    path.write_text("\n".join(lines) + "\n")
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated_specs())
def test_fuzzed_specs_never_traceback(raw, tmp_path, capsys):
    path = tmp_path / "fuzz.toml"
    _write_toml(raw, path)
    code = cli.main(["validate", str(path)])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    try:
        spec_from_dict(tomllib.loads(path.read_text()), registry=REGISTRY)
        valid = True
    except (SpecError, tomllib.TOMLDecodeError):
        valid = False
    assert code == (0 if valid else 2)


def test_validate_broken_spec_exits_2_naming_key(tmp_path, capsys):
    bad = DEMO.read_text().replace("steps = 200", "steps = -4")
    (tmp_path / "bad.toml").write_text(bad)
    assert cli.main(["validate", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "greater than or equal to 1" in err and "Traceback" not in err


def test_validate_missing_file_and_bad_toml(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "none.toml")]) == 2
    (tmp_path / "x.toml").write_text("name = [unclosed")
    assert cli.main(["validate", str(tmp_path / "x.toml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "TOML syntax error" in err
