"""Names that become paths stay single path components, and no recursive delete leaves the
directory it belongs to (issue P8.7: a cell named `..` used to delete the whole run directory)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from ablate.training import cells

from ablate.pipeline import store
from ablate.errors import AblateError, SpecError
from ablate.config.spec import PathName, spec_from_dict
from cli_run import ablate_in

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
PATH_NAME = TypeAdapter(PathName)
BAD_NAMES = ["..", ".", "...", "a/b", "../x", "a\\b", "a\x00b", "", "-rf", ".hidden", "a b", "x" * 201]


def hostile_spec(cwd: Path, cell: str | None = None, spec: str | None = None) -> None:
    """demo.toml with its first cell (router_off_real) and/or the spec itself renamed."""
    text = DEMO.read_text()
    if cell is not None:
        text = text.replace('name = "router_off_real"', f"name = {json.dumps(cell)}", 1)
    if spec is not None:
        text = text.replace('name = "demo"', f"name = {json.dumps(spec)}", 1)
    (cwd / "demo.toml").write_text(text)


@pytest.mark.parametrize("name", ["..", ".", "a/b"])
def test_a_cell_name_that_is_no_plain_file_name_is_refused_at_validate(name, tmp_path, monkeypatch, capsys):
    hostile_spec(tmp_path, cell=name)
    assert ablate_in(tmp_path, monkeypatch, "validate", "demo.toml") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cells[0].name" in err and "one plain file name" in err and "Traceback" not in err


def test_a_spec_named_dot_dot_is_refused(tmp_path, monkeypatch, capsys):
    hostile_spec(tmp_path, spec="..")
    assert ablate_in(tmp_path, monkeypatch, "validate", "demo.toml") == 2
    assert "- name:" in capsys.readouterr().err


@pytest.mark.parametrize("hostile", [{"cell": ".."}, {"spec": ".."}])
def test_a_hostile_run_deletes_nothing(hostile, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "demo"
    finished = run / "cells" / "router_on_real"
    finished.mkdir(parents=True)
    (finished / "checkpoint.safetensors").write_bytes(b"weights")
    store.mark_done(finished)
    (run / "results.json").write_text("{}")
    (run / "notes.txt").write_text("kept by the user")
    hostile_spec(tmp_path, **hostile)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert ablate_in(tmp_path, monkeypatch, "run", "demo.toml", "--profile", "tiny", "--device", "cpu", "--quiet") == 2
    assert "one plain file name" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert store.is_done(finished) and (run / "notes.txt").read_text() == "kept by the user"


def test_prepare_dir_refuses_a_cell_dir_outside_cells_even_without_validation(tmp_path):
    run = tmp_path / "runs" / "demo"
    (run / "cells").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    with pytest.raises(AblateError, match="Refusing to delete"):
        cells.prepare_dir(run / "cells" / "..", {"key": "k", "inputs": {}}, warn=print)
    assert (run / "results.json").is_file()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere_a_name_becomes_a_path(name):
    with pytest.raises(ValidationError):
        PATH_NAME.validate_python(name)
    for where in ("name", "cell", "profile"):
        bad = tomllib.loads(DEMO.read_text())
        if where == "name":
            bad["name"] = name
        elif where == "cell":
            bad["cells"][0]["name"] = name
        else:
            bad["profiles"][name] = {}
        with pytest.raises(SpecError):
            spec_from_dict(bad)


def test_sweep_names_are_checked_after_expansion():
    raw = tomllib.loads(DEMO.read_text())
    raw["sweep"] = {"cells": ["router_on_real"], "objective.lambda": [0.5, 0.9], "oracle": ["real", "shuffled"]}
    names = [c.name for c in spec_from_dict(raw).cells]
    assert "router_on_real@lambda=0.9,oracle=shuffled" in names  # a two-axis label is a plain name
    raw["sweep"] = {"cells": ["router_on_real"], "objective.note": ["../../x", "y"]}  # unchecked without plugins
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    (loc, msg), = info.value.problems
    assert "router_on_real@note=../../x" in loc and "one plain file name" in msg and "sweep values" in msg
    raw["sweep"] = {"cells": ["router_on_real"], "objective.lambda": [0.5, 0.5]}
    with pytest.raises(SpecError, match="two cells are named 'router_on_real@lambda=0.5'"):
        spec_from_dict(raw)


@given(st.one_of(st.text(alphabet="a1_.,=@+-/\\ \x00~", max_size=10), st.text(max_size=10)))
def test_an_accepted_name_is_a_direct_child_of_its_base(name):
    try:
        PATH_NAME.validate_python(name)
    except ValidationError:
        return
    base = Path("/nonexistent-base/runs")
    assert (base / name).resolve().parent == base.resolve() and (base / name).name == name


# ------------------------------------------------------------------------------ remove_tree


def _tree(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "f").write_text("x")
    return path


def test_remove_tree_deletes_only_strictly_inside(tmp_path):
    inside = tmp_path / "run"
    target = _tree(inside / "cells")
    sibling = _tree(tmp_path / "other")
    for bad in (sibling, inside, inside / "cells" / "..", inside / "cells" / ".." / ".." / "other"):
        with pytest.raises(AblateError, match="Refusing to delete"):
            store.remove_tree(bad, inside)
    assert (sibling / "sub" / "f").is_file() and (target / "sub" / "f").is_file()
    store.remove_tree(target, inside)
    assert not target.exists() and inside.is_dir()


def test_remove_tree_refuses_a_link_escaping_its_directory(tmp_path):
    inside = tmp_path / "cache"
    inside.mkdir()
    outside = _tree(tmp_path / "precious")
    os.symlink(outside, inside / "entry")
    with pytest.raises(AblateError, match="precious"):
        store.remove_tree(inside / "entry", inside)
    os.symlink(tmp_path, inside / "up")
    with pytest.raises(AblateError):
        store.remove_tree(inside / "up" / "precious", inside)
    assert (outside / "sub" / "f").is_file()


def test_remove_temps_keeps_a_linked_temp_directory_outside(tmp_path):
    outside = _tree(tmp_path / "precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / ".x.tmp")
    with pytest.raises(AblateError):
        store.remove_temps(run)
    assert (outside / "sub" / "f").is_file()
