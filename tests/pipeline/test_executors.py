"""Cells as jobs: a job carries everything its cell needs (it survives JSON), executors are
plugins chosen by [executor] or --executor, and a cell's numbers do not depend on which executor
ran it or in which order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_run import MICRO_DEMO, ablate_in, demo_dir

ROOT = Path(__file__).resolve().parents[2]
SPEC_ARGS = [*MICRO_DEMO, "--set", "train.steps=4", "--device", "cpu", "--quiet"]

REVERSED_EXECUTOR = '''
"""Test executor: runs the jobs last to first, each from its JSON form, and keeps that JSON."""
import json
from pathlib import Path

from ablate import hookimpl
from ablate.pipeline.cell_job import CellJob, run_cell
from ablate.pipeline.executors import Executor


class Reversed(Executor):
    name = "reversed"

    def run(self, jobs, device, stop, registry, ui):
        records = {}
        for job in reversed(jobs):
            text = job.model_dump_json()
            (Path(job.cell_dir).parent.parent / f"job-{job.cell}.json").write_text(text)
            records[job.cell] = run_cell(CellJob.model_validate_json(text), device, stop, registry, ui)
        return {job.cell: records[job.cell] for job in jobs}


@hookimpl
def ablate_executors(register):
    register(Reversed)
'''


def run(cwd: Path, monkeypatch, *extra: str) -> dict:
    assert ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *extra) == 0
    return json.loads((cwd / "runs" / "demo" / "results.json").read_text())


@pytest.mark.slow
def test_a_cell_gives_the_same_numbers_whichever_executor_runs_it_in_whatever_order(tmp_path, monkeypatch,
                                                                                     micro_stages, capsys):
    """...and train.fuse = "on" under another executor than local trains the cells on their own,
    saying so."""
    for d in ("local", "reversed"):
        demo_dir(tmp_path / d, micro_stages)
    (tmp_path / "reversed" / "executor.py").write_text(REVERSED_EXECUTOR)
    local = run(tmp_path / "local", monkeypatch)
    capsys.readouterr()
    loud = [a for a in SPEC_ARGS if a != "--quiet"]  # --quiet drops warnings
    assert ablate_in(tmp_path / "reversed", monkeypatch, "run", *loud, "--executor", "reversed",
                     "--plugin", str(tmp_path / "reversed" / "executor.py"), "--set", "train.fuse=on") == 0
    other = json.loads((tmp_path / "reversed" / "runs" / "demo" / "results.json").read_text())
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert 'train.fuse = "on" fuses cells in the local executor only; the reversed executor' in err
    assert all(cell["fused"] is None for cell in other["cells"].values())
    assert list(other["cells"]) == list(local["cells"])
    for name, cell in local["cells"].items():
        assert other["cells"][name]["evals"] == cell["evals"], name  # every evaluation, bit for bit on the CPU
        assert other["cells"][name]["metrics"] == cell["metrics"], name
    assert other["spec"]["executor"] == {"plugin": "reversed"}
    job = json.loads((tmp_path / "reversed" / "runs" / "demo" / "job-router_on_real.json").read_text())
    assert job["cell"] == "router_on_real" and job["oracle"]["digest"] and job["backbone"]["path"].endswith(".safetensors")


def test_an_unknown_executor_is_a_spec_error_listing_the_available_ones(tmp_path, monkeypatch, capsys):
    shutil.copy(ROOT / "specs" / "demo.toml", tmp_path / "demo.toml")
    assert ablate_in(tmp_path, monkeypatch, "run", *SPEC_ARGS, "--executor", "nope") == 2
    err = capsys.readouterr().err
    assert "Unknown executor plugin 'nope'" in err and "local" in err
    assert not (tmp_path / ".ablate-cache").exists()


def test_control_seeds_change_only_the_control_cells_keys_not_the_oracles():
    """Changing gaussian_seed or shuffle_seed re-draws a control from the loaded oracle: the teacher
    pass (the oracle's key) and the real-oracle cells are reused."""
    from ablate.training.cells import cell_key
    from ablate.api.plugins import load_registry
    from ablate.config.spec import load_spec
    from ablate.pipeline.stages import oracle_key

    registry = load_registry()
    base = load_spec(ROOT / "specs" / "demo.toml", [], "tiny", registry)
    other = load_spec(ROOT / "specs" / "demo.toml", ["oracle.gaussian_seed=7", "oracle.shuffle_seed=3"], "tiny", registry)
    assert oracle_key(base, "t", "c") == oracle_key(other, "t", "c")
    objective = registry.get("objective", "ce")
    for a, b in zip(base.cells, other.cells):
        same = cell_key(base, a, {}, objective) == cell_key(other, b, {}, objective)
        assert same == (a.oracle == "real"), a.name
