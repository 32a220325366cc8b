"""The objective family end to end: a sweep over five objectives, and the plugin guide's own
example loaded with --plugin. Both run the whole pipeline at the `tiny` size."""

import json
import re
import shutil
from pathlib import Path

import pytest

from ablate.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.seconds(23)]


def _workdir(tmp_path, monkeypatch, spec):
    (tmp_path / "specs").mkdir()
    shutil.copy(ROOT / "specs" / spec, tmp_path / "specs" / spec)
    monkeypatch.chdir(tmp_path)


def test_sweep_over_five_objectives_reports_each_formula(tmp_path, monkeypatch):
    _workdir(tmp_path, monkeypatch, "objectives.toml")
    assert cli.main(["run", "specs/objectives.toml", "--profile", "tiny", "--device", "cpu", "--quiet"]) == 0
    results = json.loads((tmp_path / "runs/objectives/results.json").read_text())
    report = (tmp_path / "reports/objectives.md").read_text()
    names = {c["config"]["objective"]["name"] for c in results["cells"].values()}
    assert names == {"kl_ce", "temperature_kl", "masked_kl", "jsd"}
    directions = {c["config"]["objective"].get("direction") for c in results["cells"].values()}
    assert {"forward", "reverse"} <= directions
    assert len(results["cells"]) == 10 and all(c["status"] == "done" for c in results["cells"].values())
    for cell in results["cells"].values():
        assert cell["objective_formula"] and cell["objective_formula"] in report
        assert cell["metrics"]["val_loss"] == cell["metrics"]["val_loss"]  # finite, not NaN
    assert "KL(P_router‖P_teacher)" in report and "KL(P_teacher‖P_router)" in report and "T = 2.0" in report
    assert len(results["discriminator"]) == 5


def test_plugin_guide_example_runs_with_plugin_flag(tmp_path, monkeypatch):
    guide = (ROOT / "docs" / "plugins.md").read_text()
    section = guide.split("## A complete minimal example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    _workdir(tmp_path, monkeypatch, "demo.toml")
    (tmp_path / "my_objective.py").write_text(code)
    args = ["run", "specs/demo.toml", "--profile", "tiny", "--device", "cpu", "--quiet", "--plugin", "my_objective.py",
            "--set", 'cells.2.objective={name="router_l2", mu=0.05}']
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "runs/demo/results.json").read_text())
    cell = results["cells"]["router_on_real"]
    assert cell["status"] == "done" and "μ = 0.05" in cell["objective_formula"]
    assert "router_l2" in (tmp_path / "runs/demo/cells/router_on_real/metrics.csv").read_text().splitlines()[0]
