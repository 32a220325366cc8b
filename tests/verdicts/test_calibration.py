"""Calibration (docs/calibration.md): the three calibration specs produce their expected verdicts
through the CLI; the generator's uniform background; the report's control-validity statement; the
oracle-rows sweep summary."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from ablate.report import rows_sweep

from ablate_builtins import synthetic
from ablate.report.markdown import render_report
from report_fixtures import make_results, untraceable_numbers

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = ROOT / "specs" / "calibration"


# ------------------------------------------------------------------ generator: flat background


def test_zero_zipf_exponent_is_the_uniform_background():
    pi = synthetic.background_distribution(33, 0.0)
    assert pi[0] == 0.0 and np.allclose(pi[1:], 1 / 32, rtol=0, atol=1e-15)
    spec = synthetic.SyntheticSpec(vocab_size=17, n_tokens=200_000, seed=2, zipf_a=0.0, structure="none")
    x = synthetic.generate(spec)
    content = x[x != 0]
    freq = np.bincount(content, minlength=17)[1:] / content.size
    assert np.abs(freq - 1 / 16).max() < 5 * math.sqrt((1 / 16) / content.size)  # 5 binomial standard errors
    # entropy rate: a document of L content tokens and one EOS, content entropy ln 16 (closed form)
    q, L = 1 / spec.doc_len, spec.doc_len
    h_q = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    expected = math.log(16) / (L + 1) + L / (L + 1) * (h_q + (1 - q) * math.log(16))
    assert synthetic.entropy_rate(spec) == pytest.approx(expected, abs=1e-8)


# ------------------------------------------------------------------- report: control validity


def with_retrieval_control(tmp_path, diffs: dict[str, dict[int, float]], noop: dict[str, dict[int, float]]) -> dict:
    """make_results (test_report) plus retrieval-control metrics per pair, keyed by real cell."""
    results = make_results(tmp_path)
    for pair in results["pairs"]:
        for layer, diff in diffs[pair["real"]].items():
            pair["metrics"][f"retrieval_control_max_diff_L{layer}"] = diff
            pair["metrics"][f"retrieval_control_noop_L{layer}"] = noop[pair["real"]][layer]
    return results


def control_lines(text: str) -> dict[str, str]:
    section = text.split("## Control validity\n")[1].split("\n## ")[0]
    return {line.split("**")[1]: line for line in section.splitlines() if line.startswith("- **")}


def test_report_states_whether_each_control_is_a_retrieval_no_op(tmp_path):
    results = with_retrieval_control(tmp_path, diffs={"off_real": {2: 0.0, 5: 0.0}, "on_real": {2: 0.0, 5: 0.0731}},
                                     noop={"off_real": {2: 1.0, 5: 1.0}, "on_real": {2: 1.0, 5: 0.0}})
    text = render_report(results, tmp_path / "runs" / "zeb139", tmp_path / "reports" / "zeb139.md")
    lines = control_lines(text)
    off, on = lines["off_real vs off_shuf"], lines["on_real vs on_shuf"]
    assert "a no-op for retrieval" in off and "L2 0.0000, L5 0.0000" in off
    assert "nothing the objective reads" in off  # CE: no `kl` column, so the pair measures noise
    assert "changes retrieval** at L5:" in on and "L2" not in on.split("changes retrieval** at ")[1].split(":")[0]
    assert "L5 0.0731" in on and "kl_ce(lambda=0.5)" in on  # the router cells log `kl`
    assert "**What differs:** the retrieved content, and the KL target" in on
    assert untraceable_numbers(text, results) == []


def test_report_says_when_retrieval_was_not_compared(tmp_path):
    results = make_results(tmp_path)  # no retrieval_control metrics at all
    text = render_report(results, tmp_path / "runs" / "zeb139", tmp_path / "reports" / "zeb139.md")
    assert all("retrieval was not compared" in line for line in control_lines(text).values())
    results["pairs"] = []
    assert "## Control validity" not in render_report(results, tmp_path / "runs" / "zeb139",
                                                       tmp_path / "reports" / "zeb139.md")


# ------------------------------------------------------------------------- oracle-rows sweep


def sweep_run(tmp_path, rows: int, cross: float, entropy: float, outcome: str) -> dict:
    results = make_results(tmp_path, name=f"rows_sweep_rows{rows}", entropy=entropy)
    results["spec"]["oracle"]["rows"] = rows
    results["oracle"]["observations_per_row"] = {"mean": 17.0 * 4096 / rows, "min": 1, "max": 99}
    results["pairs"][1]["metrics"]["cross_run_cos"] = cross
    results["discriminator"][0]["outcome"] = outcome
    return results


def table_rows(text: str) -> dict[int, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return {int(line.split("|")[1]): [c.strip() for c in line.strip("|").split("|")] for line in lines}


def test_rows_sweep_table_plot_and_onset(tmp_path):
    points = [(16, 0.999, 6.0, "cheap_win"), (64, 0.97, 6.1, "cheap_win"), (256, 0.93, 6.2, "clean_positive"),
              (1024, 0.96, 6.3, "clean_positive"), (4096, 0.41, 6.4, "clean_positive")]
    runs = [sweep_run(tmp_path, *p) for p in reversed(points)]  # order of the runs does not matter
    report = tmp_path / "reports" / "rows_sweep.md"
    text = rows_sweep.summarise(runs, report)
    assert report.read_text() == text and report.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # onset: walking up from the fewest rows, the last size before the first cross_run < 0.95
    assert "sets in at 64 rows and below" in text and "from 256 rows up they differ" in text
    rows = table_rows(text)
    assert list(rows) == [16, 64, 256, 1024, 4096]
    for rows_value, cross, entropy, outcome in points:
        cells = rows[rows_value]
        assert float(cells[2]) == pytest.approx(cross, abs=5e-5) and cells[-2] == outcome
        assert float(cells[3]) == pytest.approx(entropy, abs=5e-5)  # engram_logit_entropy of the real cell
        assert cells[-1] == ("yes" if cross >= 0.95 else "no")
        assert float(cells[1]) == pytest.approx(17.0 * 4096 / rows_value, abs=5e-5)
    assert untraceable_numbers(text.replace("0.95", ""), {"runs": runs}) == []


def test_rows_sweep_onset_edges(tmp_path):
    apart = [sweep_run(tmp_path, r, 0.5, 6.0, "clean_positive") for r in (16, 64)]
    assert "does not set in within this range" in rows_sweep.summarise(apart, tmp_path / "a.md")
    together = [sweep_run(tmp_path, r, 0.99, 6.0, "cheap_win") for r in (16, 64)]
    assert "At every swept size, up to 64 rows" in rows_sweep.summarise(together, tmp_path / "b.md")


# ------------------------------------------------------------------------------ end to end


def start_ablate(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ablate.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def ablate_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = start_ablate(args, cwd)
    out, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def expected_rows(spec_path: Path) -> dict[str, str]:
    """The [expect] block of a spec as {what: expected}, read with tomllib (independently of ablate)."""
    expect = tomllib.loads(spec_path.read_text())["expect"]
    out = {f"threshold {k}": v for k, v in expect.get("thresholds", {}).items()}
    out |= {f"combination {k}": v for k, v in expect.get("combination", {}).items()}
    out |= {f"discriminator {k}": v for k, v in expect.get("discriminator", {}).items()}
    out |= {f"metric {k}": next(iter(rule)) for k, rule in expect.get("metrics", {}).items()}
    return out



@pytest.mark.slow
@pytest.mark.seconds(80)  # the suite's longest test: three runs at once
def test_calibration_specs_meet_their_expectations(tmp_path):
    """positive → clean_positive, null → holds everywhere, cheap_win → cheap_win;
    each run exits 0 and prints every expectation as met. The three runs share one cache, as in
    docs/calibration.md, and run at the same time (one thread each: the suite's longest test)."""
    (tmp_path / "specs").mkdir()
    names = ("positive", "null", "cheap_win")
    for name in names:
        shutil.copy(CALIBRATION / f"{name}.toml", tmp_path / "specs" / f"{name}.toml")
    runs = {name: start_ablate(["run", f"specs/{name}.toml", "--quiet", "--device", "cpu"], tmp_path) for name in names}
    for name, proc in runs.items():
        spec = tmp_path / "specs" / f"{name}.toml"
        stdout, stderr = proc.communicate(timeout=900)
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert out.returncode == 0, out.stdout + out.stderr
        results = json.loads(next((tmp_path / "runs").glob(f"calibration_{name}/results.json")).read_text())
        got = {e["what"]: e for e in results["expectations"]}
        want = expected_rows(spec)
        assert set(got) == set(want) and want
        for what, expected in want.items():
            assert got[what]["met"] is True, (name, got[what])
            assert got[what]["expected"].startswith(expected)
            assert f"expect ✓ {what}: expected {got[what]['expected']}, got {got[what]['got']}" in out.stdout
        assert "expect ✗" not in out.stdout
    report = (tmp_path / "reports" / "calibration_positive.md").read_text()
    assert "**kl_real vs kl_shuf** (control oracle: shuffled): the control is **a no-op for retrieval**" in report

    # an expectation the run does not meet: exit code 1 and a ✗ line (everything else is cached)
    out = ablate_cli(["run", "specs/positive.toml", "--quiet", "--device", "cpu",
                      "--set", "expect.discriminator.kl_real=cheap_win"], tmp_path)
    assert out.returncode == 1
    assert "expect ✗ discriminator kl_real: expected cheap_win, got clean_positive" in out.stdout
