"""`ablate plan`: every stage and cell with its key and whether it is cached, would run, or would
resume — nothing is computed; checksums are verified. `ctx` is the run's Experiment."""

from __future__ import annotations

from pathlib import Path

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
        if same and store.is_done(cell_dir):
            status = "cached" + waits_on
            done[cell.name] = cell_dir
        elif same and (cell_dir / cellmod.STATE_FILE).is_file():
            status = "would resume from its last checkpoint" + waits_on
        else:
            status = "would run"
        rows.append({"name": f"cell {cell.name}", "key": key, "status": status})
    return rows, done


def _if_identical(upstream: list[str]) -> str:
    return f" if {' and '.join(upstream)} rebuild{'s' if len(upstream) == 1 else ''} with identical data" if upstream else ""
