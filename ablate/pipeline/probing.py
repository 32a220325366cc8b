"""The probe stage: every finished cell (and each real/control pair) measured by the probes on
the same validation batches; results cached in runs/<name>/probes.json under a key of the probes'
code and settings and the finished cells' contents. A probe that raises is that probe's failure
(recorded with its error), not the run's.

`ctx` is the run's Experiment (spec, registry, device, ui, paths, activity).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ablate.training import cells as cellmod
from ablate.pipeline import probe_selection
from ablate.pipeline import stages
from ablate.pipeline import store
from ablate.api.components import CellView
from ablate.config.spec import Spec


def pairs(spec: Spec) -> list[tuple[str, str]]:
    """(real, control) cells that differ only in the oracle variant (same router, objective, sweep
    point and seed: pairs are formed within a seed)."""
    out = []
    by_setting: dict[str, dict[str, str]] = {}
    for c in spec.cells:
        setting = store.stable_hash({"router": c.router, "objective": c.objective.model_dump(), "sweep": c.sweep_label,
                                     "seed": c.seed})
        by_setting.setdefault(setting, {})[c.oracle] = c.name
    for group in by_setting.values():
        if "real" in group:
            out += [(group["real"], group[o]) for o in ("shuffled", "gaussian") if o in group]
    return out


def probe_batches(ctx, corpus, contract) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Probe batches [B, T+1] from the validation split and their sidecar rows [B, T] under the
    oracle's row contract (the one the cells trained with)."""
    p = ctx.spec.probes
    seq = p.seq_len or ctx.spec.train.seq_len
    stages.require_tokens(corpus, seq, "probes")
    g = torch.Generator().manual_seed(p.seed)
    batches, rows = [], []
    for _ in range(p.batches):
        starts = torch.randint(0, corpus.val.numel() - seq, (p.batch,), generator=g)
        b = torch.stack([corpus.val[s:s + seq + 1] for s in starts.tolist()]).to(ctx.device)
        batches.append(b)
        rows.append(contract.rows_of(b[:, :-1]))
    return batches, rows


def probe_key(ctx, done_dirs: dict[str, Path]) -> str:
    """Key of the probe results: the probes' versions and settings and the content digests of
    the finished cells they read."""
    probes = probe_selection.selected_probes(ctx.spec, ctx.registry)
    return stages.component_stage_key("probes", probe_selection.probe_key_config(ctx.spec, probes),
                                      {name: store.content_digest(d) for name, d in done_dirs.items()})


def cached_probes(ctx, key: str) -> dict | None:
    try:
        cached = store.read_json(ctx.paths.run_dir / "probes.json")
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def run_probes(ctx, corpus, r_bb, variants, records):
    """→ (per-cell metrics, pair results, failed probes, cached?). A probe that raises is that
    probe's failure (recorded with its error), not the run's; results with a failure are not
    cached, so the next run retries the probe."""
    done = [c for c in ctx.spec.cells if records.get(c.name, {}).get("status") == "done"]
    probes = probe_selection.selected_probes(ctx.spec, ctx.registry)  # [(Probe class, validated Params)]
    key = probe_key(ctx, {c.name: records[c.name]["dir"] for c in done})
    cached = cached_probes(ctx, key)
    if cached is not None:
        ctx.ui.info("[green]✓[/] probes cached")
        return cached["cells"], cached["pairs"], [], True
    batches, rows = probe_batches(ctx, corpus, variants["real"].contract)
    views: dict[str, CellView] = {}
    sidecars = {v: variants[v].sidecar_on(ctx.device) for v in {c.oracle for c in done}}  # the cells' copies
    for c in done:
        rec = records[c.name]
        student = cellmod.load_trained(ctx.spec, c, rec["dir"], r_bb.path, corpus.vocab_size,
                                       variants[c.oracle].table, ctx.device)
        views[c.name] = CellView(c.name, c.model_dump(mode="json"), student, rec["history"], rec["evals"], batches,
                                 rows, sidecars[c.oracle], ctx.device)
    cell_metrics: dict[str, dict[str, float]] = {name: {} for name in views}
    failures: list[dict] = []

    def attempt(probe_cls, params, *cells: CellView) -> dict[str, float]:
        name = probe_cls.name
        ctx.activity = f"probe {name!r} on {' vs '.join(v.name for v in cells)}"
        try:
            return finite_only(probe_cls(params).run(*cells))
        except Exception as exc:  # the probe's own failure: its metrics are missing, the rest land
            error = f"{type(exc).__name__}: {str(exc).strip() or '(no message)'}"
            source = ctx.registry.components["probe"][name].source
            failures.append({"probe": name, "source": source, "cells": [v.name for v in cells], "error": error})
            ctx.ui.warn(f"probe {name!r} ({source}) failed on {' vs '.join(v.name for v in cells)}: {error}")
            return {}

    with ctx.ui.stage("probes", len(views) * len(probes), "probes") as progress:
        for probe_cls, params in probes:
            if probe_cls.scope == "cell":
                for name, view in views.items():
                    cell_metrics[name].update(attempt(probe_cls, params, view))
                    progress(1)
    pair_results = []
    for real, control in pairs(ctx.spec):
        if real in views and control in views:
            metrics: dict[str, float] = {}
            for probe_cls, params in probes:
                if probe_cls.scope == "pair":
                    metrics.update(attempt(probe_cls, params, views[real], views[control]))
            pair_results.append({"real": real, "shuffled": control, "metrics": metrics})
    if not failures:
        store.write_json(ctx.paths.run_dir / "probes.json",
                         {"key": key, "cells": cell_metrics, "pairs": pair_results})
    return cell_metrics, pair_results, failures, False


def finite_only(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}
