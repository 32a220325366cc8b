"""`ablate plan`: every stage and cell with its key and whether it is cached, would run, or would
resume — nothing is computed; checksums are verified. `ctx` is the run's Experiment."""

from __future__ import annotations

from pathlib import Path

from ablate.pipeline.cell_job import read_status
from ablate.training import cells as cellmod
from ablate.pipeline import probing
from ablate.pipeline import stages
from ablate.pipeline import store

NO_TEACHER = "not needed (oracle from files)"


def plan(ctx) -> list[dict]:
    """Every stage and cell with its key, whether it is cached and what would run (nothing is
    computed; checksums are verified)."""
    corpus_cls = ctx.preflight()
    keys = ctx.stage_keys(corpus_cls)
    cache = ctx.paths.cache
    upstream = {"corpus": [], "backbone": ["corpus"], "teacher": ["corpus"],
                "oracle": [] if ctx.spec.oracle.source == "files" else ["teacher", "corpus"]}  # files: key = digest
    digests: dict[str, str | None] = {}  # the data each stage will have if it is rebuilt identically
    rebuilt: set[str] = set()
    rows = []
    for name, key in keys.items():
        path = cache / f"{name}-{key}"
        if name == "backbone" and ctx.spec.backbone.source == "checkpoint":
            digests[name] = key
            rows.append({"name": name, "key": key, "status": f"cached (checkpoint {ctx.spec.backbone.checkpoint})"})
            continue
        if name == "teacher" and ctx.spec.oracle.source == "files":
            digests[name] = None
            rows.append({"name": name, "key": "—", "status": NO_TEACHER})
            continue
        ok, why = stages.cache_status(path, {u: digests[u] for u in upstream[name]})
        digests[name] = store.content_digest(path)
        status = "cached" + _if_identical([u for u in upstream[name] if u in rebuilt]) if ok else f"would run ({why})"
        if not ok:
            rebuilt.add(name)
        rows.append({"name": name, "key": key, "status": status})

    cell_rows, done_cells = _plan_cells(ctx, keys, digests, rebuilt)
    rows += cell_rows
    probe_key = probing.probe_key(ctx, done_cells) if len(done_cells) == len(ctx.spec.cells) else None
    rows.append({"name": "probes", "key": probe_key or "—",
                 "status": "cached" if probe_key and probing.cached_probes(ctx, probe_key) else "would run"})
    rows.append({"name": "verdicts, results.json, report", "key": "—", "status": "always rewritten (cheap)"})
    return rows

def _plan_cells(ctx, keys, digests, rebuilt) -> tuple[list[dict], dict[str, Path]]:
    """Cell rows, and the directories of the cells that are complete. An input digest of None
    (an input to be rebuilt whose old data is unknown) matches whatever the cell recorded."""
    rows, done = [], {}
    for cell in ctx.spec.cells:
        key = ctx.cell_key(cell, keys)
        cell_dir = ctx.paths.run_dir / "cells" / cell.name
        recorded = cellmod.recorded_identity(cell_dir) or {}
        same = recorded.get("key") == key and all(
            digests[u] is None or recorded.get("inputs", {}).get(u) == digests[u] for u in ("backbone", "oracle"))
        waits_on = _if_identical([u for u in ("backbone", "oracle") if u in rebuilt])
        failure = read_status(cell_dir) or {}
        if same and store.is_done(cell_dir):
            status = "cached" + waits_on
            done[cell.name] = cell_dir
        elif same and failure.get("state") == "failed" and not getattr(ctx, "retry_failed", False):
            status = f"failed in an earlier run ({failure.get('error')}); skipped unless --retry-failed"
        elif same and (cell_dir / cellmod.STATE_FILE).is_file():
            status = "would resume from its last checkpoint" + waits_on
        else:
            status = "would run"
        rows.append({"name": f"cell {cell.name}", "key": key, "status": status})
    return rows, done


def memory_plan(spec, registry=None, budget: int | None = None) -> tuple[list[dict], list[str]]:
    """The estimated peak memory of every stage on CUDA (ablate.pipeline.memory: rows of stage,
    host GiB, GPU GiB, largest part) and lines saying whether it fits `budget` (bytes), this
    machine's GPU, or (no GPU here) its host memory for a run on the CPU. Nothing is computed."""
    from ablate.pipeline import memory

    stages = memory.estimate(spec, "cuda", registry)
    lines = []
    gpu_peak = max(stages, key=lambda s: s.reserved_bytes)
    host_peak = max(stages, key=lambda s: s.host_bytes)
    lines.append(f"peak GPU memory: the {gpu_peak.stage} stage, ≈ {memory.fmt_gib(gpu_peak.reserved_bytes)} GiB "
                 f"reserved ({memory.fmt_gib(gpu_peak.allocated_bytes)} GiB allocated); peak host memory: the "
                 f"{host_peak.stage} stage, ≈ {memory.fmt_gib(host_peak.host_bytes)} GiB (estimates, "
                 "docs/performance.md)")
    limit = memory.limit_for(None, budget)
    checked = stages
    if limit.device_type == "cpu":
        checked = memory.estimate(spec, "cpu", registry)
        top = max(checked, key=lambda s: s.host_bytes)
        lines.append(f"on this machine's CPU the peak would be the {top.stage} stage, ≈ "
                     f"{memory.fmt_gib(top.host_bytes)} GiB of host memory")
    found = memory.problems(checked, limit)
    where = limit.device_label or "this machine"
    lines += ([f"fits {where}"] if not found else [f"does not fit {where}; `ablate validate` and `ablate run` "
                                                     "refuse it:"] + [f"  - {knob}: {text}" for knob, text in found])
    lines += [f"note: {n}" for n in stages[0].notes]
    return memory.table_rows(stages), lines


def _if_identical(upstream: list[str]) -> str:
    return f" if {' and '.join(upstream)} rebuild{'s' if len(upstream) == 1 else ''} with identical data" if upstream else ""
