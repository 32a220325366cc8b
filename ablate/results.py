"""results.json: the run's metrics, thresholds, verdicts, combinations and costs, assembled from
the stages, cells and probes; and what a finished run's exit code is."""

from __future__ import annotations

import math

import torch

from ablate import meter, provenance, stages
from ablate.spec import Spec, base_name, cells_for, sweep_label
from ablate.verdict import rubric_text

RESULTS_SCHEMA_VERSION = 1

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
    from ablate import verdict

    spec = ctx.spec
    metrics = {name: dict(m) for name, m in cell_metrics.items()}
    pairs = attribute_pairs(pairs, discriminated_pairs(spec))
    for pair in pairs:  # the attributed pair's metrics are the real cell's
        if pair["attributed"]:
            metrics.setdefault(pair["real"], {}).update(pair["metrics"])
    names = {"log_vocab": math.log(corpus.vocab_size), "vocab_size": float(corpus.vocab_size),
             "rows": float(spec.oracle.rows), "log_rows": math.log(spec.oracle.rows),
             "unigram_entropy": unigram_entropy(corpus.frequencies)}
    meanings = {}
    for probe in ctx.registry.components["probe"].values():
        meanings.update(probe.cls.metrics)

    thresholds = []
    for th in spec.thresholds:
        for cell in [c.name for name in th.cells for c in cells_for(spec, name)]:
            value = metrics.get(cell, {}).get(th.metric)
            thresholds.append(verdict.evaluate_spec_rule(th.name, th.metric, cell, value, th.break_if, names,
                                                         meanings.get(th.metric, "")))
    combination = {}
    strong_bounds = [(b, {c.name for n in b.cells for c in cells_for(spec, n)})
                     for b in spec.combine.strong_bounds(spec.thresholds)]
    for cell in spec.cells:
        own = [t for t in thresholds if t["cell"] == cell.name]
        strong = [verdict.strong_result(b.metric, cell.name, metrics.get(cell.name, {}).get(b.metric), b.strong_if,
                                        names) for b, cells in strong_bounds if cell.name in cells]
        if own or strong:
            combination[cell.name] = verdict.combine(own, spec.combine.soft_at, spec.combine.broken_at, strong)
    discriminator = []
    for real, shuf in discriminated_pairs(spec):
        if real not in combination or shuf not in combination:
            continue
        rl, sl = combination[real]["label"], combination[shuf]["label"]
        out = verdict.discriminate(rl == "broken", sl == "broken")
        discriminator.append({"real": real, "shuffled": shuf, "real_label": rl, "shuffled_label": sl, **out})

    cells_out = {}
    for cell in spec.cells:
        rec = records.get(cell.name, {"status": "skipped"})
        outcome = rec.get("outcome", {})
        cells_out[cell.name] = {
            "config": {"router": cell.router, "oracle": cell.oracle,
                       "objective": {"name": cell.objective.name, **cell.objective.params()},
                       "uses_sidecar": bool(ctx.registry.get("objective", cell.objective.name).needs_sidecar),
                       "base": base_name(cell.name), "sweep": sweep_label(cell.name)},
            "objective_formula": outcome.get("objective_formula", ""),
            "status": rec.get("status", "skipped"), "error": rec.get("error"), "cached": rec.get("cached", False),
            "failed_at_step": rec.get("step"), "checkpoint_step": rec.get("checkpoint_step"),
            "metrics": metrics.get(cell.name, {}),
            "metrics_csv": f"cells/{cell.name}/metrics.csv",
            "evals": rec.get("evals", []),
            "history": _thin(rec.get("history", []), 200),
            "seconds": outcome.get("seconds"), "tokens_per_s": outcome.get("tokens_per_s"),
            "peak_gpu_allocated_gib": outcome.get("peak_gpu_allocated_gib"), "compiled": outcome.get("compiled"),
        }
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "name": spec.name, "description": spec.description, "numerics": spec.numerics,
        "conventions": CONVENTIONS,
        "spec": spec.model_dump(mode="json", by_alias=True, exclude={"profiles"}),
        "axes": spec.axes.model_dump(),
        "stages": {n: {"key": r.key, "cached": r.cached, "seconds": r.seconds, "tokens": r.tokens,
                       "tokens_per_s": meter.rate(r.tokens, r.seconds), **r.peaks, "info": stages.json_safe(r.info)}
                   for n, r in ctx.stage_results.items()},
        "teacher": stages.json_safe(r_teacher.info),
        "oracle": stages.json_safe(oracle.stats),
        "cells": cells_out, "pairs": pairs, "failed_probes": failed_probes,
        "thresholds": thresholds, "combination": combination, "discriminator": discriminator,
        "metric_meanings": meanings, "bound_names": names,
        "provenance": provenance.collect(ctx.registry, ctx.device, spec.seed, ctx.command, t_start,
                                         {n: r.seconds for n, r in ctx.stage_results.items()}),
    }
    if spec.expect is not None:
        from ablate.expect import check_expectations

        results["expectations"] = check_expectations(spec.expect, results, names)
    return results


def discriminated_pairs(spec: Spec) -> list[tuple[str, str]]:
    """(real, shuffled) cell names of every [[discriminator]] entry, sweeps expanded and matched
    by sweep label."""
    out = []
    for d in spec.discriminator:
        for real in cells_for(spec, d.real):
            label = sweep_label(real.name)
            shuf = next((c.name for c in cells_for(spec, d.shuffled) if sweep_label(c.name) == label), None)
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

