"""Results built by hand and the number tracer, shared by the report and calibration tests."""

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from ablate.report.markdown import render_report
from ablate.verdicts.verdict import combine, discriminate, evaluate_spec_rule
from ablate.pipeline.probe_selection import metric_info
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


def seeded_results(root: Path, cross: tuple = (0.978, 0.995, 0.41), off_gain: tuple = (0.0008, -0.0012, 0.0005)) -> dict:
    """make_results with the verdict blocks of the demo over seeds 0, 1, 2, computed by ablate.verdicts.results
    from synthetic per-seed metrics: the real router's entropy breaks at every seed, cross_run_cos
    straddles its bound over the seeds (seed 0 alone holds), so the real cell is soft or broken;
    the router-off content_gain noise spreads past content_gain's bound 0.001."""
    import tomllib

    from ablate.api.plugins import load_registry
    from ablate.verdicts.results import judge, noise_floor, seed_axis
    from ablate.config.spec import spec_from_dict
    from ablate.verdicts.verdict import run_reading

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


ZEB136_L2_REAL = {  # reference §8.5, ZEB-136 router-off pair, L2 real, and the pair's cross-run C
    "retrieval_unique_frac_L2": 0.13860, "attn_entropy_L2": 0.6310, "retrieval_gap_L2": 0.0387,
    "inj_ratio_L2": 0.0484, "inj_axis_rms_L2": 0.0897, "inj_hidden_abs_cos_L2": 0.0384,
    "content_swap_abs_cos_L2": 0.2060, "topk_jaccard_mean_L2": 0.0008, "row_usage_cv_L2": 0.7842,
    "v_rank_hard_ratio_L2": 1.0, "cross_run_inj_cos_L2": 0.8730, "cross_run_inj_abs_cos_L2": 0.8730,
}
