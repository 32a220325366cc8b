"""The report is rendered from results.json only: every printed number traces back to it, no
path is absolute, plots are real PNGs, and a comparison lists exactly the spec keys that differ."""

import copy
import json
import re
from fractions import Fraction
from pathlib import Path
import pytest
from ablate.report.markdown import render_comparison
from report_fixtures import PNG, AGREE, ABSOLUTE, make_results, render, untraceable_numbers, flat_keys, listed_spec_keys, seeded_results, summary_lines


def test_every_number_in_the_report_comes_from_results(tmp_path):
    results = make_results(tmp_path)
    text, _ = render(tmp_path, results)
    assert AGREE.search(text)  # the agreement sentences exist and were checked
    assert untraceable_numbers(text, results) == []



def test_the_number_tracer_catches_invented_numbers(tmp_path):
    results = make_results(tmp_path)
    assert untraceable_numbers("val_loss 4.554602 and 3.14159 and 77", results) == ["4.554602", "3.14159", "77"]
    assert untraceable_numbers("val_loss 4.5546 and 4.554601", results) == []



def test_report_sections_and_generated_sentences(tmp_path):
    results = make_results(tmp_path)
    text, report = render(tmp_path, results)
    assert report.read_text() == text
    assert text.startswith("# zeb139\n")
    assert results["description"] in text
    for heading in ("## Conventions", "## Validation loss", "## Fingerprint and probe metrics", "## Thresholds",
                    "## Combination per cell", "## Discriminator", "## KL trajectory", "## Plots",
                    "## Teacher and oracle health", "## Objectives and logs per cell", "## Provenance"):
        assert heading in text, heading
    for th in results["thresholds"]:  # each threshold's line ends in the verdict its rule gives, recomputed here
        line = next(l for l in text.splitlines() if l.startswith(f"- **{th['name']}** ({th['cell']}"))
        value, bounds = th["value"], th["rule"]["bounds"]
        crossed = {"below": lambda: value < bounds[0], "above": lambda: value > bounds[0],
                   "at_least": lambda: value >= bounds[0],
                   "outside": lambda: value < bounds[0] or value > bounds[1]}[th["rule"]["kind"]]()
        assert line.endswith("→ BREAK" if crossed else "→ HOLD") and th["metric"] in line
    # the fixture's router-off validation losses, 4.554601 and 4.554377: shown to 4 places, their
    # gap (0.000224) rounded up, and content_gain = shuffled − real
    assert "off_real (4.5546) and off_shuf (4.5544) agree within 0.0003 nats" in text
    assert "content_gain = -0.000224 nats (real content raised the loss)" in text
    for cell, comb in results["combination"].items():
        assert f"| {cell} | {comb['crossed']} | {comb['undecided']} | {comb['total']} |" in text
    assert results["discriminator"][0]["meaning"] in text
    assert "d4c7541d74b2c50f6a9ef281f686a63b826ad911" in text and "uncommitted changes: yes" in text
    assert "NVIDIA H100 80GB HBM3" in text and "--set train.steps=200" in text
    assert "**Cell on_gauss failed**" in text
    assert "| entropy" not in text  # thresholds are listed by metric, not by name, in the fingerprint table
    assert "| engram_logit_entropy | — | — | 6.2116 | 6.21163 |" not in text  # row shares one precision
    assert "| engram_logit_entropy | — | — | 6.21160 | 6.21163 |" in text



def test_kl_trajectory_shows_seven_evenly_spaced_steps(tmp_path):
    results = make_results(tmp_path)
    text, _ = render(tmp_path, results)
    section = text.split("### on_real\n")[1].split("###")[0]
    steps = [int(line.split("|")[1]) for line in section.splitlines() if re.match(r"\| \d", line)]
    logged = [int(r["step"]) for r in results["cells"]["on_real"]["history"]]
    assert len(steps) == 7 and steps[0] == logged[0] and steps[-1] == logged[-1]
    assert set(steps) <= set(logged) and steps == sorted(steps)
    assert "### off_real" not in text.split("## KL trajectory")[1].split("## Plots")[0]  # no KL column



def test_no_absolute_path_anywhere(tmp_path):
    results = make_results(tmp_path)
    text, report = render(tmp_path, results)
    assert str(tmp_path) not in text
    for line in text.splitlines():
        assert not ABSOLUTE.search(line), line
    # the rewritten paths still point at the right place, relative to the report's folder
    assert "../specs/zeb139.toml" in text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all(not Path(link).is_absolute() for link in links)
    assert "../runs/zeb139/cells/on_real/metrics.csv" in links



def test_plots_are_png_files_linked_relative_to_the_report(tmp_path):
    results = make_results(tmp_path)
    text, report = render(tmp_path, results)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 4
    for rel in images:
        path = report.parent / rel
        assert path.parent == report.parent / "zeb139"
        assert path.read_bytes()[:8] == PNG



def test_minimal_results_render(tmp_path):
    results = make_results(tmp_path)
    for key in ("pairs", "thresholds", "discriminator"):
        results[key] = []
    results["combination"] = {}
    for cell in results["cells"].values():
        cell["history"] = []
    text, report = render(tmp_path, results)
    assert "## Thresholds" not in text and "## KL trajectory" not in text
    assert untraceable_numbers(text, results) == []
    assert not (report.parent / "zeb139" / "thresholds.png").exists()



def test_comparison_lists_exactly_the_differing_spec_keys(tmp_path):
    a = make_results(tmp_path, "zeb139")
    b = make_results(tmp_path, "zeb139_l09", entropy=6.0, lam=0.9, shift=0.02)
    b["spec"]["train"]["steps"] = 400
    b["spec"]["train"]["warmup"] = 100  # only in b
    del b["spec"]["train"]["batch"]  # only in a
    b["spec"]["oracle"]["seeds"] = [42, 99]
    fa, fb = flat_keys(a["spec"]), flat_keys(b["spec"])
    expected = {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}
    assert {"name", "train.steps", "train.warmup", "train.batch", "oracle.seeds", "cells.2.objective.lambda"} <= expected

    text = render_comparison([a, b], tmp_path / "reports" / "zeb139-vs-zeb139_l09.md")
    assert listed_spec_keys(text) == expected
    assert (tmp_path / "reports" / "zeb139-vs-zeb139_l09.md").read_text() == text
    assert str(tmp_path) not in text



def test_comparison_deltas_verdict_changes_and_sanity(tmp_path):
    a = make_results(tmp_path, "zeb139")
    b = make_results(tmp_path, "zeb139_l09", entropy=6.0, lam=0.9, shift=0.02)
    text = render_comparison([a, b], tmp_path / "reports" / "cmp.md")
    # val_loss of on_real: 4.563612 → 4.583612, delta +0.02 upward
    section = text.split("### on_real\n")[1]
    row = next(line for line in section.splitlines() if line.startswith("| val_loss |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    first, later, delta = Fraction(cells[1]), Fraction(cells[2]), cells[3]
    assert delta.endswith("↑") and Fraction(delta.split()[0]) == later - first == Fraction("0.02")
    # entropy 6.2116 → 6.0 crosses log_vocab − 0.1 = 6.1383: HOLD → BREAK
    assert "threshold entropy @ on_real: HOLD (zeb139) → BREAK (zeb139_l09)" in text
    # the router-off baselines moved by 0.02: the agreement sentence says so, computed
    m = re.search(r"router-off baseline off_real: zeb139 \((?P<a>[\d.]+)\) and zeb139_l09 \((?P<b>[\d.]+)\) "
                  r"agree within (?P<tol>[\d.]+) nats", text)
    assert m and Fraction(m["tol"]) >= abs(Fraction(4.554601) - Fraction(4.554601 + 0.02))
    assert "oracle statistics are identical across runs" in text

    b["oracle"]["pca_explained_variance_ratio_total"] = 0.9
    text = render_comparison([a, b], tmp_path / "reports" / "cmp.md")
    assert "oracle statistics differ" in text and "| pca_explained_variance_ratio_total |" in text



def test_comparison_of_identical_runs_reports_no_change(tmp_path):
    a = make_results(tmp_path, "zeb139")
    text = render_comparison([a, copy.deepcopy(a)], tmp_path / "reports" / "same.md")
    assert "The resolved specs are identical." in text
    assert "No threshold verdict, combination label or discriminator outcome changed." in text
    assert "zeb139 #1" in text and "zeb139 #2" in text
    assert "+0.0000 =" in text



@pytest.mark.parametrize("drop", ["provenance", "teacher", "oracle", "stages"])
def test_report_tolerates_missing_optional_blocks(tmp_path, drop):
    results = make_results(tmp_path)
    results.pop(drop)
    text, _ = render(tmp_path, results)
    assert text.startswith("# zeb139")



def test_cells_meet_their_counterparts_across_sweeps():
    from ablate.report.markdown import cell_matches

    def run(**cells):  # as results.json records them: each cell's spec cell in config.base
        return {"cells": {n: {"config": {"router": r, "oracle": o, "base": n.split("@")[0]}} for n, (r, o) in cells.items()}}

    swept = run(off_real=(False, "real"), **{"on_real@lambda=0.5": (True, "real"), "on_real@lambda=0.9": (True, "real"),
                                             "on_shuf@lambda=0.5": (True, "shuffled")})
    plain = run(off_real=(False, "real"), on_real=(True, "real"), on_shuf=(True, "shuffled"), on_gauss=(True, "gaussian"))
    assert cell_matches([swept, plain]) == [("off_real", "off_real"), ("on_real@lambda=0.5", "on_real"),
                                            ("on_real@lambda=0.9", "on_real"), ("on_shuf@lambda=0.5", "on_shuf")]
    assert cell_matches([plain, swept]) == [("off_real", "off_real"), ("on_real", "on_real@lambda=0.5"),
                                            ("on_real", "on_real@lambda=0.9"), ("on_shuf", "on_shuf@lambda=0.5")]
    # the same base name with another role is not a counterpart
    assert cell_matches([run(on_real=(True, "real")), run(**{"on_real@x": (False, "real")})]) == []



def test_comparison_sets_swept_cells_beside_their_unswept_counterpart(tmp_path):
    a = make_results(tmp_path, "zeb139")
    b = make_results(tmp_path, "zeb136")
    a["cells"]["on_real@lambda=0.9"] = a["cells"].pop("on_real")
    text = render_comparison([a, b], tmp_path / "reports" / "cmp.md")
    assert "### on_real@lambda=0.9 (zeb139) ↔ on_real (zeb136)" in text
    assert "no counterpart" not in text



def test_the_report_opens_with_its_answer_over_seeds(tmp_path):
    results = seeded_results(tmp_path)
    text, _ = render(tmp_path, results)
    assert text.index("## Summary") < text.index("## Conventions") < text.index("## Thresholds")
    lines = summary_lines(text)
    assert 3 <= len(lines) <= 6 and lines[0].startswith("**Question.**")
    assert lines[1].startswith("- router_on_real vs router_on_shuf: **undecided between clean_positive and holds** "
                               "(over 3 seeds, 95% t-intervals)")
    assert "per seed: holds (seeds 0, 1), clean_positive (seed 2)" in lines[1]
    assert lines[2].startswith("- **Outer 2×2**") and "reads **undecided (breaks or soft)**" in lines[2]
    assert lines[3].startswith("- **Noise:** router-off content_gain") and "lies inside the noise" in lines[3]
    cross = next(t for t in results["thresholds"] if t["name"] == "cross_run")
    assert cross["verdict"] == "UNDECIDED" and cross["sentence"] in text
    assert "Per seed: HOLD (seeds 0, 1), BREAK (seed 2)" in text and "Per seed: HOLD at all 3 seeds" in text
    assert "cross_run (router_on_real) HOLD → UNDECIDED" in text  # seed 0 alone vs the three seeds
    assert "  - noise floor: router-off content_gain" in text  # beside content_gain's threshold
    assert "| router_on_real | 1 | 1 | 5 | 0 | **undecided** (soft signal or broken) |" in text
    assert untraceable_numbers(text, results) == []



def test_a_single_seed_run_says_so_and_its_summary_stays_short(tmp_path):
    results = make_results(tmp_path)
    text, _ = render(tmp_path, results)
    lines = summary_lines(text)
    assert 3 <= len(lines) <= 6 and lines[1].startswith("- on_real vs on_shuf: **holds**")
    assert "Single seed: each verdict reads the value itself" in text
    assert "**Outer 2×2**" in lines[2] and "reads **holds**" in lines[2] and "structural ceiling" in lines[2]



def test_outer_two_by_two_from_two_runs(tmp_path, monkeypatch):
    from cli_run import ablate_in

    a = make_results(tmp_path, "zeb139")
    b = make_results(tmp_path, "zeb138")
    b["axes"] = {"objective": "ce", "teacher": "same-arch"}
    b["combination"]["on_real"]["label"] = "broken"
    text = render_comparison([a, b], tmp_path / "reports" / "outer.md", outer=True)
    section = text.split("## Outer 2×2")[1].split("\n## ")[0]
    assert "zeb139 (objective kl_ce, teacher tinyllama) reads **holds**" in section
    assert "zeb138 (objective ce, teacher same-arch) reads **broken**" not in section  # readings, not labels
    assert "reads **breaks** (on_real: broken)" in section
    assert "**Reading:** teacher architecture dominates → same-arch teacher as substrate, drop KL focus." in section
    marked = [line for line in section.splitlines() if line.endswith("◀ |")]
    assert len(marked) == 1 and marked[0].startswith("| holds (zeb139) | breaks (zeb138) |")
    # through the CLI: `ablate report A B --outer`, written into the comparison report
    for run in (a, b):
        (tmp_path / "runs" / run["name"]).mkdir(parents=True)
        (tmp_path / "runs" / run["name"] / "results.json").write_text(json.dumps(run))
    assert ablate_in(tmp_path, monkeypatch, "report", "zeb139", "zeb138", "--outer") == 0
    written = (tmp_path / "reports" / "zeb139-vs-zeb138.md").read_text()
    assert "**Reading:** teacher architecture dominates" in written
    assert ablate_in(tmp_path, monkeypatch, "report", "zeb139", "--outer") == 2
    assert ablate_in(tmp_path, monkeypatch, "report", "zeb139", "zeb138") == 2



def test_the_seed_note_says_why_no_reading_differs(tmp_path):
    results = seeded_results(tmp_path, cross=(0.98, 0.99, 0.97))
    text, _ = render(tmp_path, results)
    note = next(line for line in text.splitlines() if line.startswith("**Seed 0 alone vs all seeds:**"))
    assert "no reading differs" in note and "the interval nearest its bound, counted in half-widths, is" in note
    near = min((t for t in results["thresholds"] if t["half_width"]), key=lambda t: t["margin"] / t["half_width"])
    assert f"{near['name']} ({near['cell']})'s" in note
    assert untraceable_numbers(text, results) == []

