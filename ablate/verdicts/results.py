"""results.json: the run's metrics, thresholds, verdicts, combinations and costs, assembled from
the stages, cells and probes; and what a finished run's exit code is."""

from __future__ import annotations

import itertools
import math
import statistics

import torch

from ablate.pipeline import meter

from ablate.report import provenance

from ablate.pipeline import stages
from ablate.config.spec import SEED_KEY, Spec, cells_for, seed_groups
from ablate.verdicts.schema import RESULTS_SCHEMA_VERSION, validated
from ablate.verdicts.verdict import rubric_text


CONVENTIONS = {
    "content_gain": "content_gain = val_loss(shuffled-oracle cell) − val_loss(real-oracle cell), in nats: "
                    "POSITIVE when the real oracle content lowers the loss. The reference's Δ-diff is the "
                    "opposite sign (real − shuffled); convert before comparing with upstream numbers.",
    "w_align_drift": "w_align_drift = ‖W_align − W_align(init)‖_F / √(d/3), W_align(init) = 0. The reference's "
                     "'> 2× init' is undefined for a zero init (its §10.2), so the unit is the init W_align would "
                     "have had as a default nn.Linear(d, d): entries U(−1/√d, 1/√d), variance 1/(3d), so "
                     "E‖W‖_F² = d/3 and ‖W‖_F ≈ √(d/3) (13.0639 at d = 512). The zeb136/138/139 threshold 0.3 (‖W_align‖_F > "
                     "3.9192 at d = 512) is about 2× the drift of the CE-only router (ZEB-136: ‖W_align‖_F "
                     "1.9108 → 0.1463): '2× init' read as '2× the CE attractor's own drift', the comparison the "
                     "reference's findings made; ZEB-139's 1.3461 and 0.5786 read 0.1030 and 0.0443 (HOLD, as "
                     "recorded upstream).",
    "strong_result": "A strong result is a bound of its own in [combine] strong (reference §7.3: content_gain ≥ "
                     "0.005), never counted as a threshold crossing; the combination records it per cell.",
    "battery_rubric": rubric_text(),
    "cross_run_cos": "cross_run_cos = mean over positions of cos(z_r(real), z_r(shuffled)) on the raw router "
                     "logits (not probabilities, not centred), same validation tokens for both cells.",
    "alpha": "α = exp(log_alpha), the router's logit scale (added in logit space, not a probability mixture).",
}


def build_results(ctx, corpus, r_teacher, oracle, records, cell_metrics, pairs, failed_probes, t_start) -> dict:
    """results.json: every metric, threshold, verdict and cost of the run (ctx: the Experiment)."""
    from ablate.verdicts import verdict

    spec = ctx.spec
    metrics = {name: dict(m) for name, m in cell_metrics.items()}
    pairs = attribute_pairs(pairs, discriminated_pairs(spec))
    for pair in pairs:  # the attributed pair's metrics are the real cell's
        if pair["attributed"]:
            metrics.setdefault(pair["real"], {}).update(pair["metrics"])
    names = {"log_vocab": math.log(corpus.vocab_size), "vocab_size": float(corpus.vocab_size),
             "rows": float(spec.oracle.rows), "log_rows": math.log(spec.oracle.rows),
             "unigram_entropy": unigram_entropy(corpus.frequencies)}
    from ablate.pipeline import probe_selection

    probes = probe_selection.selected_probes(spec, ctx.registry)
    meanings = probe_selection.metric_meanings(probes)

    thresholds, combination, discriminator = judge(spec, metrics, names, meanings)
    noise = noise_floor(spec, pairs, thresholds)

    cells_out = {}
    for cell in spec.cells:
        rec = records.get(cell.name, {"status": "skipped"})
        outcome = rec.get("outcome", {})
        cells_out[cell.name] = {
            "config": {"router": cell.router, "oracle": cell.oracle,
                       "objective": {"name": cell.objective.name, **cell.objective.params()},
                       "uses_sidecar": bool(ctx.registry.get("objective", cell.objective.name).needs_sidecar),
                       "base": cell.base_name, "sweep": cell.sweep_label, "seed": cell.seed,
                       "seed_group": cell.seed_group},
            "objective_formula": outcome.get("objective_formula", ""),
            "status": rec.get("status", "skipped"), "error": rec.get("error"), "cached": rec.get("cached", False),
            "failed_at_step": rec.get("step"), "checkpoint_step": rec.get("checkpoint_step"),
            "metrics": metrics.get(cell.name, {}),
            "metrics_csv": f"cells/{cell.name}/metrics.csv",
            "evals": rec.get("evals", []),
            "history": _thin(rec.get("history", []), 200),
            "seconds": outcome.get("seconds"), "tokens_per_s": outcome.get("tokens_per_s"),
            "peak_gpu_allocated_gib": outcome.get("peak_gpu_allocated_gib"), "compiled": outcome.get("compiled"),
            "fused": outcome.get("fused"), **step_times(rec.get("history", [])),
        }
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "name": spec.name, "description": spec.description, "numerics": spec.numerics,
        "conventions": CONVENTIONS,
        "spec": spec.model_dump(mode="json", by_alias=True, exclude={"profiles", "loggers"}),  # loggers change nothing
        "axes": spec.axes.model_dump(),
        "stages": {n: {"key": r.key, "cached": r.cached, "seconds": r.seconds, "tokens": r.tokens,
                       "tokens_per_s": meter.rate(r.tokens, r.seconds), **r.peaks, "info": stages.json_safe(r.info)}
                   for n, r in ctx.stage_results.items()},
        "teacher": stages.json_safe(r_teacher.info),
        "oracle": stages.json_safe(oracle.stats),
        "cells": cells_out, "pairs": pairs, "failed_probes": failed_probes,
        "thresholds": thresholds, "combination": combination, "discriminator": discriminator,
        "seeds": seed_axis(spec), "noise_floor": noise,
        "metric_meanings": meanings, "metric_info": probe_selection.metric_info(probes), "bound_names": names,
        "provenance": provenance.collect(ctx.registry, ctx.device, spec.seed, ctx.command, t_start,
                                         {n: r.seconds for n, r in ctx.stage_results.items()}),
    }
    results["reading"] = verdict.run_reading(results)
    if spec.expect is not None:
        from ablate.verdicts.expect import check_expectations

        results["expectations"] = check_expectations(spec.expect, results, names)
    return validated(results)


def judge(spec: Spec, metrics: dict[str, dict[str, float]], names: dict[str, float],
          meanings: dict[str, str]) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """Thresholds, combinations and discriminator outcomes, each read per seed group (a cell over
    its seeds, `CellSpec.seed_group`; a cell without a seed axis is its own group of one):
    every threshold over its group's seeds (verdict.evaluate_over_seeds: a t-interval, or the
    single seed's value), each group's thresholds combined, each discriminated pair of groups
    read from the two combinations; per-seed labels and outcomes are kept beside them."""
    from ablate.verdicts import verdict

    thresholds = []
    for th in spec.thresholds:
        members = list({c.name: c for name in th.cells for c in cells_for(spec, name)}.values())
        for group, cells in seed_groups(members).items():
            per_seed = [(c.seed, c.name, metrics.get(c.name, {}).get(th.metric)) for c in cells]
            thresholds.append(verdict.evaluate_over_seeds(th.name, th.metric, group, per_seed, th.break_if, names,
                                                          meanings.get(th.metric, "")))
    soft_at, broken_at = spec.combine.soft_at, spec.combine.broken_at
    strong_bounds = [(b, {c.name for n in b.cells for c in cells_for(spec, n)})
                     for b in spec.combine.strong_bounds(spec.thresholds)]
    groups = seed_groups(spec.cells)
    combination = {}
    for group, cells in groups.items():
        own = [t for t in thresholds if t["cell"] == group]
        strong = [verdict.strong_over_seeds(b.metric, group, [(c.seed, c.name, metrics.get(c.name, {}).get(b.metric))
                                                              for c in cells if c.name in members], b.strong_if, names)
                  for b, members in strong_bounds if any(c.name in members for c in cells)]
        if own or strong:
            combination[group] = {**verdict.combine(own, soft_at, broken_at, strong), "n_seeds": len(cells),
                                  "per_seed": verdict.per_seed_labels(own, soft_at, broken_at)}
    discriminator = []
    by_name = {c.name: c for c in spec.cells}
    for real, shuf in dict.fromkeys((by_name[r].seed_group, by_name[s].seed_group) for r, s in discriminated_pairs(spec)):
        if real not in combination or shuf not in combination:
            continue
        rc, sc = combination[real], combination[shuf]
        shuf_seeds = {p["seed"]: p for p in sc["per_seed"]}
        per_seed = [{"seed": p["seed"], **verdict.discriminate(p["broken"], shuf_seeds[p["seed"]]["broken"])}
                    for p in rc["per_seed"] if p["seed"] in shuf_seeds]
        d = {"real": real, "shuffled": shuf, "real_label": rc["label"], "shuffled_label": sc["label"],
             **verdict.discriminate(rc["broken"], sc["broken"]), "n_seeds": len(groups[real]),
             "per_seed": [{"seed": p["seed"], "outcome": p["outcome"]} for p in per_seed]}
        d["sentence"] = verdict.discriminator_sentence(d, rc, sc, len(groups[real]))
        discriminator.append(d)
    return thresholds, combination, discriminator


def seed_axis(spec: Spec) -> dict:
    """results.json `seeds`: the seed axis (None without `[sweep] seed`) and how verdicts use it."""
    from ablate.verdicts.verdict import INTERVAL_METHOD, SINGLE_SEED

    seeds = (spec.sweep.axes().get(SEED_KEY) if spec.sweep is not None else None) or None

    return {"seeds": seeds, "n_seeds": len(seeds) if seeds else 1,
            "method": INTERVAL_METHOD if seeds and len(seeds) > 1 else f"{SINGLE_SEED}: verdicts read the value itself, "
                                                                       "with no interval ([sweep] seed = [0, 1, 2] gives one)",
            "semantics": "seed s trains a cell with train.model_seed + s (the adapters' init) and train.data_seed + s "
                         "(its training batches); corpus, backbone, teacher, oracle, shuffle permutation, validation "
                         "windows and probe batches are the same for every seed, so real and control cells of one "
                         "seed are paired"}


NOISE_SIDES = 2.0  # the noise band is ± NOISE_SIDES × the RMS of the router-off differences


def noise_floor(spec: Spec, pairs: list[dict], thresholds: list[dict]) -> list[dict]:
    """The measured noise of each thresholded pair metric (content_gain): its value on the
    router-off real-vs-shuffled pairs, where the control is a no-op for retrieval and the objective
    reads no sidecar, so any difference is training noise. Per router-off seed group: the values
    over seeds, their RMS about zero, the band ± NOISE_SIDES × RMS, and the thresholds on that metric
    with a bound inside the band (a bound a no-effect pair can reach)."""
    from ablate.verdicts.verdict import fmt, uncertainty_decimals

    by_name = {c.name: c for c in spec.cells}
    off = [p for p in pairs if p["real"] in by_name and p["shuffled"] in by_name
           and not by_name[p["real"]].router and by_name[p["shuffled"]].oracle == "shuffled"]
    metrics = list(dict.fromkeys(t["metric"] for t in thresholds))
    out = []
    for metric in metrics:
        groups: dict[tuple[str, str], list[tuple]] = {}
        for p in off:
            if p["metrics"].get(metric) is not None:
                key = (by_name[p["real"]].seed_group, by_name[p["shuffled"]].seed_group)
                groups.setdefault(key, []).append((by_name[p["real"]].seed, float(p["metrics"][metric])))
        for (real, shuf), values in groups.items():
            rms = math.sqrt(math.fsum(v * v for _, v in values) / len(values))
            band = NOISE_SIDES * rms
            inside = [{"threshold": t["name"], "cell": t["cell"], "bound": b} for t in thresholds
                      if t["metric"] == metric for b in t["rule"]["bounds"] if abs(b) <= band]
            d = uncertainty_decimals(band)
            listed = ", ".join(fmt(v, max(d, 4), sign=True) for _, v in values)
            seeds = f"over {len(values)} seeds" if len(values) > 1 else "single seed"
            sentence = (f"router-off {metric} ({real} vs {shuf}; no oracle content reaches these cells, so it is "
                        f"training noise) {seeds}: {listed}; noise band ±{fmt(band, d)} ({NOISE_SIDES:g} × RMS "
                        f"{fmt(rms, max(d, uncertainty_decimals(rms)))})")
            if inside:
                sentence += "; WARNING: " + "; ".join(
                    f"the bound {fmt(i['bound'], max(d, 4))} of {i['threshold']} ({i['cell']}) lies inside the noise"
                    for i in inside)
            out.append({"metric": metric, "real": real, "shuffled": shuf, "values": [v for _, v in values],
                        "seeds": [s for s, _ in values], "rms": rms, "band": band, "inside": inside,
                        "sentence": sentence})
    return out


def read_subset(results: dict, seeds: set) -> dict:
    """A seed-swept run's verdicts re-read on a subset of its seeds, from results.json alone:
    {(threshold, cell): verdict, ..., ("discriminator", real): outcome} (docs/calibration.md)."""
    from ablate.verdicts.verdict import combine, discriminate, evaluate_over_seeds

    spec = results["spec"]
    rules = {t["name"]: {k: v for k, v in t["break_if"].items() if v is not None} for t in spec["thresholds"]}
    out: dict[tuple[str, str], str] = {}
    for t in results["thresholds"]:
        per_seed = [(s["seed"], s["cell"], s["value"]) for s in t["seeds"] if s["seed"] in seeds]
        out[(t["name"], t["cell"])] = evaluate_over_seeds(t["name"], t["metric"], t["cell"], per_seed, rules[t["name"]],
                                                          results["bound_names"])["verdict"]
    broken = {cell: combine([{"name": n, "verdict": v} for (n, c), v in out.items() if c == cell],
                            spec["combine"]["soft_at"], spec["combine"]["broken_at"])["broken"]
              for cell in results["combination"]}
    for d in results["discriminator"]:
        out[("discriminator", d["real"])] = discriminate(broken[d["real"]], broken[d["shuffled"]])["outcome"]
    return out


def seed_rates(results: dict, k: int = 3) -> str:
    """How often each threshold and discriminator reads each verdict: at every single seed, on the
    t-interval of every k-subset of the seeds, and over all seeds. `python -c 'import sys; from
    ablate.verdicts.results import seed_rates; from ablate.verdicts.schema import read_results; print(seed_rates(read_results(sys.argv[1])))' runs/X/results.json`."""
    seeds = [s["seed"] for s in results["thresholds"][0]["seeds"]]
    subsets = [set(c) for c in itertools.combinations(seeds, k)]
    readings = {"single seeds": [read_subset(results, {s}) for s in seeds],
                f"{k}-seed intervals": [read_subset(results, c) for c in subsets]}
    whole = read_subset(results, set(seeds))
    lines = [f"{results['name']}: {len(seeds)} seeds, {len(subsets)} subsets of {k}"]
    for key in whole:
        counts = {what: {v: [r[key] for r in rs].count(v) for v in sorted({r[key] for r in rs})}
                  for what, rs in readings.items()}
        lines.append(f"  {key[0]}@{key[1]}: " + "; ".join(
            f"{what} " + ", ".join(f"{v} {n}/{len(readings[what])}" for v, n in c.items()) for what, c in counts.items())
            + f"; all {len(seeds)} seeds {whole[key]}")
    return "\n".join(lines)


def discriminated_pairs(spec: Spec) -> list[tuple[str, str]]:
    """(real, shuffled) cell names of every [[discriminator]] entry, sweeps expanded and matched
    by sweep label."""
    out = []
    for d in spec.discriminator:
        for real in cells_for(spec, d.real):
            shuf = next((c.name for c in cells_for(spec, d.shuffled) if c.sweep == real.sweep), None)
            if shuf is not None:
                out.append((real.name, shuf))
    return out


def attribute_pairs(pairs: list[dict], discriminated: list[tuple[str, str]]) -> list[dict]:
    """Copies of `pairs` with `attributed` set: per real cell exactly one pair lends its metrics to
    the real cell (and so to thresholds and expectations): the pair a discriminator names, else
    the first (shuffled before Gaussian). The others stay readable under results["pairs"]."""
    chosen: dict[str, str] = {}
    for p in pairs:
        chosen.setdefault(p["real"], p["shuffled"])
    present = {(p["real"], p["shuffled"]) for p in pairs}
    for real, control in discriminated:
        if (real, control) in present:
            chosen[real] = control
    return [{**p, "attributed": chosen[p["real"]] == p["shuffled"]} for p in pairs]


def unigram_entropy(frequencies: torch.Tensor) -> float:
    """Entropy in nats of the corpus's unigram distribution (frequencies [V], counts)."""
    p = frequencies.double() / frequencies.double().sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def step_times(history: list[dict]) -> dict[str, float | None]:
    """The first training step's time and the median of the later logged intervals' per-step
    times (ms), from a cell's logged rows: step 0 is always logged alone, so its dt_ms is that one
    step, with what only the first step pays (compilation on CUDA, kernel selection, the
    allocator's warm-up). None where the rows do not say (no step-0 row, or no later row)."""
    first = next((r["dt_ms"] for r in history[:1] if r.get("step") == 0 and "dt_ms" in r), None)
    later = [r["dt_ms"] for r in history if r.get("step", 0) > 0 and "dt_ms" in r]
    return {"first_step_ms": first, "median_step_ms": statistics.median(later) if later else None}


def _thin(rows: list[dict], n: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    picked = [rows[int(i * step)] for i in range(n)]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return picked


def failed_cells(results: dict) -> list[str]:
    return [n for n, c in results["cells"].items() if c["status"] != "done"]


def unmet_expectations(results: dict) -> list[dict]:
    return [e for e in results.get("expectations", []) if not e["met"]]


def exit_code(results: dict) -> int:
    return 1 if failed_cells(results) or unmet_expectations(results) or results.get("failed_probes") else 0

