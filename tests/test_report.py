"""The report is rendered from results.json only: every printed number traces back to it, no
path is absolute, plots are real PNGs, and a comparison lists exactly the spec keys that differ."""

import copy
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest

from ablate.report import render_comparison, render_report
from ablate.verdict import combine, discriminate, evaluate_spec_rule
from ablate.probe_selection import metric_info
from ablate_builtins.battery import BATTERY_PROBES
from ablate_builtins.probes import BUILTIN_PROBES

PNG = b"\x89PNG\r\n\x1a\n"
NUMBER = re.compile(r"(?<![\w.\-+])[-+]?\d+(?:\.\d+)?(?![\w]|\.\d)")
AGREE = re.compile(r"\S+ \((?P<a>-?[\d.]+)\) and \S+ \((?P<b>-?[\d.]+)\) agree within (?P<tol>[\d.]+) nats")
ABSOLUTE = re.compile(r"(^|[\s(\[`'\"|=:])/[\w.]")

LOG_V = math.log(512)
CELLS = {  # name: (router, oracle, final val_loss)
    "off_real": (False, "real", 4.554601),
    "off_shuf": (False, "shuffled", 4.554377),
    "on_real": (True, "real", 4.563612),
    "on_shuf": (True, "shuffled", 4.563702),
}
THRESHOLDS = [("entropy", "engram_logit_entropy", {"below": "log_vocab - 0.1"}),
              ("alpha", "alpha", {"outside": [0.14, 0.2]}),
              ("cross_run", "cross_run_cos", {"below": 0.7}),
              ("content_gain", "content_gain", {"at_least": 0.001}),
              ("w_align_drift", "w_align_drift", {"above": 2.0})]


def history(router: bool, shift: float) -> list[dict]:
    rows = []
    for step in range(0, 200, 10):
        row = {"step": float(step), "loss": 2.9147 + 0.001 * step / 7 + shift, "ce": 4.6 - step / 1e4}
        if router:
            row.update(kl=1.2697 - 0.05 * step / 199 + shift, alpha=0.1 + 0.0004 * step,
                       w_align_norm=0.0067 * step, router_entropy=LOG_V - 0.0001 * step)
        rows.append(row)
    return rows


def make_results(root: Path, name: str = "zeb139", entropy: float = 6.2116, lam: float = 0.5,
                 shift: float = 0.0) -> dict:
    """A results.json as the engine writes it (schema 1), with absolute paths planted in it."""
    cells, metrics = {}, {}
    for cell, (router, oracle, loss) in CELLS.items():
        m = {"val_loss": loss + shift, "val_loss_step0": 4.559617, "gate_L2": -0.1545, "gate_L5": 0.4012,
             "retrieval_unique_frac_L2": 0.1386, "inj_ratio_L5": 0.0095}
        if router:
            m.update(log_alpha=-1.736, alpha=math.exp(-1.736), w_align_norm=1.3461, w_align_drift=1.3461 / math.sqrt(512),
                     engram_logit_entropy=entropy + (0.00003 if oracle == "shuffled" else 0.0), log_vocab=LOG_V,
                     max_lm_head_row_cos=0.7779, kl_first=1.2697, kl_last=1.2212, kl_change=1.2212 - 1.2697)
        metrics[cell] = m
        objective = {"name": "kl_ce", "lambda": lam} if router else {"name": "ce"}
        cells[cell] = {
            "config": {"router": router, "oracle": oracle, "objective": objective, "base": cell, "sweep": ""},
            "objective_formula": f"L = (1−λ)·CE + λ·KL, λ = {lam}" if router else "L = CE",
            "status": "done", "error": None, "metrics": m, "metrics_csv": f"cells/{cell}/metrics.csv",
            "evals": [{"step": 100, "val_loss": 4.5612}, {"step": 200, "val_loss": loss + shift}],
            "history": history(router, shift),
        }
    cells["on_gauss"] = {
        "config": {"router": True, "oracle": "gaussian", "objective": {"name": "kl_ce", "lambda": lam},
                   "base": "on_gauss", "sweep": ""},
        "objective_formula": "", "status": "failed", "metrics": {}, "metrics_csv": "cells/on_gauss/metrics.csv",
        "error": f"non-finite loss at step 17; see {root}/runs/{name}/cells/on_gauss/metrics.csv",
        "evals": [], "history": [],
    }
    pairs = [{"real": "off_real", "shuffled": "off_shuf", "metrics": {"content_gain": 4.554377 - 4.554601}},
             {"real": "on_real", "shuffled": "on_shuf",
              "metrics": {"content_gain": 4.563702 - 4.563612, "cross_run_cos": 0.99991}}]
    for pair in pairs:
        metrics[pair["real"]].update(pair["metrics"])
    meanings = {k: v for probe in BUILTIN_PROBES for k, v in probe.metrics.items()}
    thresholds = []
    for th_name, metric, rule in THRESHOLDS:
        for cell in ("on_real", "on_shuf"):
            if metric in ("cross_run_cos", "content_gain") and cell == "on_shuf":
                continue
            thresholds.append(evaluate_spec_rule(th_name, metric, cell, metrics[cell].get(metric), rule,
                                                 {"log_vocab": LOG_V}, meanings.get(metric, "")))
    combination = {c: combine([t for t in thresholds if t["cell"] == c], strong=["content_gain"])
                   for c in ("on_real", "on_shuf")}
    disc = discriminate(combination["on_real"]["label"] == "broken", combination["on_shuf"]["label"] == "broken")
    spec = {"name": name, "seed": 0, "train": {"steps": 200, "lr": 9e-4, "batch": 4},
            "oracle": {"rows": 10000, "seeds": [42, 99, 137, 251]},
            "cells": [{"name": c, "router": r, "objective": {"name": "kl_ce", "lambda": lam} if r else {"name": "ce"}}
                      for c, (r, _, _) in CELLS.items()]}
    return {
        "schema_version": 1, "name": name,
        "description": "Does a KL+CE objective pull the skip-to-logit router out of the uniform attractor?",
        "conventions": {"content_gain": "content_gain = val_loss(shuffled) − val_loss(real); Δ-diff is its negative.",
                        "w_align_drift": "‖W_align − W_align(init)‖_F / √d (W_align starts at zero)."},
        "spec": spec, "axes": {"objective": "kl_ce", "teacher": "tinyllama"},
        "stages": {"corpus": {"key": "50d7bcddb6b387ff", "cached": True, "seconds": 0.25, "info": {}},
                   "teacher": {"key": "ed22c4043e1cdd87", "cached": False, "seconds": 29.3075,
                               "info": {"path": f"{root}/.ablate-cache/teacher-ed22c4043e1cdd87"}}},
        "teacher": {"val_loss": 2.1034, "ln_vocab": LOG_V, "source": f"{root}/models/tinyllama"},
        "oracle": {"populated_fraction": 1.0, "pca_explained_variance_ratio_total": 0.9338690864205668,
                   "pairwise_abs_cos": {"median": 0.152, "mean": 0.181, "p90": 0.372}, "rows": 10000},
        "cells": cells, "pairs": pairs, "thresholds": thresholds, "combination": combination,
        "discriminator": [{"real": "on_real", "shuffled": "on_shuf", **disc,
                           "real_label": combination["on_real"]["label"],
                           "shuffled_label": combination["on_shuf"]["label"]}],
        "metric_meanings": meanings, "metric_info": metric_info((*BUILTIN_PROBES, *BATTERY_PROBES)),
        "provenance": {"git_sha": "d4c7541d74b2c50f6a9ef281f686a63b826ad911", "git_dirty": True,
                       "versions": {"torch": "2.13.0", "ablate": "0.1.0"}, "plugins": {"probe:gates": "ablate 0.1.0"},
                       "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "seed": 0,
                       "command": f"ablate run {root}/specs/zeb139.toml --set train.steps=200",
                       "started": "2026-04-19T10:00:00Z", "wall_seconds": 1234.5678,
                       "stage_seconds": {"corpus": 0.25, "teacher": 29.3075}},
    }


def render(tmp_path: Path, results: dict) -> tuple[str, Path]:
    report = tmp_path / "reports" / f"{results['name']}.md"
    return render_report(results, tmp_path / "runs" / results["name"], report), report


# --------------------------------------------------------------------------- number tracing


def json_leaves(obj, numbers: list, strings: list) -> None:
    if isinstance(obj, dict):
        strings.extend(str(k) for k in obj)
        for v in obj.values():
            json_leaves(v, numbers, strings)
    elif isinstance(obj, list):
        for v in obj:
            json_leaves(v, numbers, strings)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, (int, float)):
        numbers.append(obj)
    else:
        strings.append(str(obj))


def traceable(token: str, numbers: list, strings: list) -> bool:
    """token is some JSON number rounded at the token's own precision (≥ 4 decimals, or the
    number's JSON literal), an integer-valued JSON number, or a number inside a JSON string."""
    body = token.lstrip("+")
    decimals = len(body.split(".")[1]) if "." in body else None
    for x in numbers:
        if decimals is None:
            if float(x).is_integer() and int(x) == int(body):
                return True
        elif body in (json.dumps(x), repr(x)) or (decimals >= 4 and body == f"{x:.{decimals}f}"):
            return True
    pattern = re.compile(r"(?<![\w.])" + re.escape(token) + r"(?![\w]|\.\d)")
    return any(pattern.search(s) for s in strings)


def untraceable_numbers(text: str, results: dict) -> list[str]:
    numbers, strings = [], []
    json_leaves(results, numbers, strings)
    text = strip_checked_agreements(text, results)
    return [tok for tok in NUMBER.findall(text) if not traceable(tok, numbers, strings)]


def strip_checked_agreements(text: str, results: dict) -> str:
    """Verify each agreement tolerance against the two values it compares, then drop it."""
    values = [float(v) for v in re.findall(r"-?\d+\.\d+", json.dumps(results))]
    for m in AGREE.finditer(text):
        a, b, tol = (Fraction(m[k]) for k in ("a", "b", "tol"))
        unit = Fraction(1, 10 ** len(m["tol"].split(".")[1]))
        exact = [(x, y) for x in values for y in values
                 if f"{x:.{len(m['a'].split('.')[1])}f}" == m["a"] and f"{y:.{len(m['b'].split('.')[1])}f}" == m["b"]]
        assert exact, m[0]
        x, y = exact[0]
        gap = abs(Fraction(x) - Fraction(y))
        assert gap <= tol < gap + unit, m[0]  # the tolerance is |a − b| rounded up, never looser
    return AGREE.sub(lambda m: m[0].replace(f"within {m['tol']}", "within"), text)


def test_every_number_in_the_report_comes_from_results(tmp_path):
    results = make_results(tmp_path)
    text, _ = render(tmp_path, results)
    assert AGREE.search(text)  # the agreement sentences exist and were checked
    assert untraceable_numbers(text, results) == []


def test_the_number_tracer_catches_invented_numbers(tmp_path):
    results = make_results(tmp_path)
    assert untraceable_numbers("val_loss 4.554602 and 3.14159 and 77", results) == ["4.554602", "3.14159", "77"]
    assert untraceable_numbers("val_loss 4.5546 and 4.554601", results) == []


# ------------------------------------------------------------------------------- contents


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
    for th in results["thresholds"]:
        assert th["sentence"] in text
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


# ------------------------------------------------------------------------------ comparison


def flat_keys(d, prefix=""):
    """Independent flattening: dict keys and list indices joined with dots, plain lists are leaves."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flat_keys(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flat_keys(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(d, sort_keys=True)
    return out


def listed_spec_keys(text: str) -> set[str]:
    section = text.split("## Spec keys that differ")[1].split("\n## ")[0]
    return {m for m in re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)}


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
    from ablate.report import cell_matches

    def run(**cells):
        return {"cells": {n: {"config": {"router": r, "oracle": o}} for n, (r, o) in cells.items()}}

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


# ------------------------------------------------------------------------ seeds and the summary


def seeded_results(root: Path, cross: tuple = (0.978, 0.995, 0.41), off_gain: tuple = (0.0008, -0.0012, 0.0005)) -> dict:
    """make_results with the verdict blocks of the demo over seeds 0, 1, 2, computed by ablate.results
    from synthetic per-seed metrics: the real router's entropy breaks at every seed, cross_run_cos
    straddles its bound over the seeds (seed 0 alone holds), so the real cell is soft or broken;
    the router-off content_gain noise spreads past content_gain's bound 0.001."""
    import tomllib

    from ablate.plugins import load_registry
    from ablate.results import judge, noise_floor, seed_axis
    from ablate.spec import spec_from_dict
    from ablate.verdict import run_reading

    demo = Path(__file__).resolve().parents[1] / "specs" / "demo.toml"
    spec = spec_from_dict(tomllib.loads(demo.read_text()), ["sweep.seed=[0,1,2]"], "tiny", load_registry())
    metrics = {c.name: ({"engram_logit_entropy": math.log(256) - 0.01 * c.seed - (0.2 if c.oracle == "real" else 0),
                         "alpha": 0.17 + 0.001 * c.seed,
                         "w_align_drift": 0.01} if c.router else {}) for c in spec.cells}
    for s in (0, 1, 2):
        metrics[f"router_on_real@seed={s}"].update(cross_run_cos=cross[s], content_gain=0.0001 * (s + 1))
    pairs = [{"real": f"router_off_real@seed={s}", "shuffled": f"router_off_shuf@seed={s}",
              "metrics": {"content_gain": off_gain[s]}} for s in (0, 1, 2)]
    thresholds, combination, discriminator = judge(spec, metrics, {"log_vocab": math.log(256)}, {})
    results = make_results(root)
    results.update(thresholds=thresholds, combination=combination, discriminator=discriminator,
                   noise_floor=noise_floor(spec, pairs, thresholds), seeds=seed_axis(spec),
                   axes={"objective": "kl_ce", "teacher": "llama-local"}, bound_names={"log_vocab": math.log(256)},
                   spec=spec.model_dump(mode="json", by_alias=True, exclude={"profiles"}))
    results["reading"] = run_reading(results)
    return results


def summary_lines(text: str) -> list[str]:
    block = text.split("## Summary\n")[1].split("\nAxes:")[0]
    return [line for line in block.splitlines() if line.strip()]


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
