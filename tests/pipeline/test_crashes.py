"""Whatever fails, no traceback reaches the user: a probe that raises is that probe's failure, an
objective that raises fails only its cells, an unexpected exception becomes one paragraph (where,
what is kept, how to resume) with the traceback in a log file, and a report the run could not
replace is marked stale."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from cli_run import MICRO_DEMO, ablate_in, demo_dir

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
SPEC_ARGS = [*MICRO_DEMO, "--set", "train.steps=6", "--set", "train.checkpoint_every=2", "--device", "cpu", "--quiet"]

CRASHING_PLUGINS = '''
"""Test plugins written from the docs: each fails in its own way."""
from ablate import hookimpl
from ablate.training import losses
from ablate.api.components import Objective, ObjectiveResult, Params, Probe


class RaisesInConstructor(Objective):
    name = "raises_in_constructor"

    def __init__(self, params, ctx):
        raise ValueError("this objective cannot be built")


class RaisesAtStep(Objective):
    name = "raises_at_step"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.calls = 0

    def formula(self):
        return "CE until the 4th call"

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("objective broke mid-training")
        ce = losses.cross_entropy(batch.logits, batch.targets)
        return ObjectiveResult(ce, {"ce": ce.detach()})


class RaisesOnOneCell(Probe):
    name = "raises_on_one_cell"
    scope = "cell"
    metrics = {"probe_ok": "1 where this test probe ran"}

    def run(self, cell):
        if cell.name == "router_on_real":
            raise KeyError("no such hook point")
        return {"probe_ok": 1.0}


@hookimpl
def ablate_objectives(register):
    register(RaisesInConstructor)
    register(RaisesAtStep)


@hookimpl
def ablate_probes(register):
    register(RaisesOnOneCell)
'''


@pytest.fixture(scope="module")
def crashing_run(tmp_path_factory, micro_stages):
    """One run: cell 0's objective raises in its constructor, cell 1's at its 4th step, and a probe
    raises on router_on_real. An earlier report is in place. → (directory, exit code, output)."""
    cwd = demo_dir(tmp_path_factory.mktemp("crashes"), micro_stages)
    (cwd / "crashing.py").write_text(CRASHING_PLUGINS)
    (cwd / "reports").mkdir()
    (cwd / "reports" / "demo.md").write_text("# demo\n\nan earlier report\n")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = ablate_in(cwd, mp, "run", *SPEC_ARGS, "--plugin", str(cwd / "crashing.py"),
                         "--set", 'cells.0.objective={ name = "raises_in_constructor" }',
                         "--set", 'cells.1.objective={ name = "raises_at_step" }',
                         "--set", 'probes.use=["builtins", "raises_on_one_cell"]')
    return cwd, code, printed.getvalue()


@pytest.mark.slow
def test_raising_objectives_fail_only_their_cells(crashing_run):
    cwd, code, printed = crashing_run
    assert code == 1 and "Traceback" not in printed
    cells = json.loads((cwd / "runs" / "demo" / "results.json").read_text())["cells"]
    assert [c["status"] for c in cells.values()] == ["failed", "failed", "done", "done"]
    ctor, step = cells["router_off_real"], cells["router_off_shuf"]
    assert "raises_in_constructor" in ctor["error"] and "ValueError" in ctor["error"]
    assert "in its constructor" in ctor["error"] and "this objective cannot be built" in ctor["error"]
    assert "raises_at_step" in step["error"] and "RuntimeError" in step["error"]
    assert step["failed_at_step"] == 3 and step["checkpoint_step"] == 2  # 4th call = step 3; saved at step 2
    assert "last good checkpoint: step 2" in step["error"]


@pytest.mark.slow
def test_a_raising_probe_loses_only_its_own_metric(crashing_run):
    cwd, code, printed = crashing_run
    results = json.loads((cwd / "runs" / "demo" / "results.json").read_text())
    assert results["failed_probes"] == [{"probe": "raises_on_one_cell", "source": str(cwd / "crashing.py"),
                                         "cells": ["router_on_real"], "error": "KeyError: 'no such hook point'"}]
    on_real, on_shuf = results["cells"]["router_on_real"]["metrics"], results["cells"]["router_on_shuf"]["metrics"]
    assert "probe_ok" not in on_real and on_shuf["probe_ok"] == 1.0
    assert "engram_logit_entropy" in on_real  # a built-in probe's metric on the same cell landed
    assert any(t["value"] is not None for t in results["thresholds"])  # verdicts not needing it landed
    assert "raises_on_one_cell failed" in printed
    report = (cwd / "reports" / "demo.md").read_text()
    assert "## Failed probes" in report and "no such hook point" in report and "STALE" not in report
    assert not (cwd / "runs" / "demo" / "probes.json").exists()  # not cached: the next run retries the probe


def test_an_unexpected_exception_is_one_paragraph_with_a_log_and_a_stale_report(tmp_path, monkeypatch, capsys):
    from ablate.pipeline import stages

    def broken_oracle(*args, **kwargs):
        raise RuntimeError("simulated failure inside the oracle pass")

    monkeypatch.setattr(stages, "oracle_stage", broken_oracle)
    shutil.copy(DEMO, tmp_path / "demo.toml")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "demo.md").write_text("# demo\n\nan earlier report\n")
    code = ablate_in(tmp_path, monkeypatch, "run", *SPEC_ARGS)
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 1 and "Traceback" not in err
    assert "unexpected RuntimeError while the oracle stage" in err and "simulated failure" in err
    assert "stages kept in the cache: corpus, backbone, teacher" in err
    assert "resume with: ablate run demo.toml --profile tiny" in err
    (log,) = (tmp_path / "runs" / "demo" / "logs").glob("crash-*.log")
    assert "Traceback" in log.read_text() and "broken_oracle" in log.read_text() and str(log.name) in err
    report = (tmp_path / "reports" / "demo.md").read_text()
    assert report.startswith("<!-- ablate: stale -->\n> **STALE REPORT.**") and "an earlier report" in report
    assert "unexpected RuntimeError while the oracle stage" in report


def test_debug_shows_the_original_traceback(tmp_path, monkeypatch, capsys):
    from ablate.api import plugins

    def broken(*args, **kwargs):
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(plugins, "load_registry", broken)
    assert ablate_in(tmp_path, monkeypatch, "plugins") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected RuntimeError: registry exploded" in err
    log = Path(err.split("The traceback is in ")[1].split(";")[0].replace("\n", ""))
    assert "def broken" in log.read_text() or "broken" in log.read_text()
    assert ablate_in(tmp_path, monkeypatch, "plugins", "--debug") == 1
    assert "Traceback" in capsys.readouterr().err


def test_mark_stale_replaces_an_older_banner(tmp_path):
    from ablate.report.markdown import mark_stale

    report = tmp_path / "r.md"
    assert not mark_stale(report, "nothing to mark")
    report.write_text("# r\n\nbody\n")
    mark_stale(report, "first failure")
    mark_stale(report, "second failure")
    text = report.read_text()
    assert text.count("STALE REPORT") == 1 and "second failure" in text and text.endswith("# r\n\nbody\n")
