"""Executors run cell jobs. `local` (the default) trains them one after another in this process;
others (e.g. a cluster engine) are plugins of the `ablate_executors` hook, chosen by the spec's
`[executor] name` or `ablate run --executor NAME`.

An executor receives every job of a run and returns each cell's record (ablate.pipeline.cell_job.run_cell
semantics: reuse a complete cell, else train it; a failed cell is a record, not an exception). Its
`events` is the run's event sink: passed to run_cell, it gets the cells' events as they happen;
the events of a cell an executor did not deliver are replayed from its record when it returns.
"""

from __future__ import annotations

from typing import Callable

import torch

from ablate.pipeline import events
from ablate.pipeline.events import NO_EVENTS, Event
from ablate.training import cells as cellmod
from ablate.pipeline.cell_job import CellJob, run_cell
from ablate.api.components import Component
from ablate.errors import Interrupted


class Executor(Component):
    """Runs a run's cell jobs. Parameters come from the spec's [executor] table."""

    events: Callable[[Event], None] = NO_EVENTS  # set by run_jobs: run_cell(..., events=self.events)

    def run(self, jobs: list[CellJob], device: torch.device, stop, registry, ui) -> dict[str, dict]:
        """cell name → record (cell_job.run_cell's), for every job."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """One job after another in this process, on `device`; stops at the first interrupt."""

    name = "local"
    description = ("cells one after another in this process (the default); cells that share backbone, "
                   "oracle and data train as fused groups where train.fuse says so (\"auto\": compiled, on CUDA)")

    def run(self, jobs: list[CellJob], device: torch.device, stop, registry, ui) -> dict[str, dict]:
        if any(cellmod.fuses(job.spec, device) for job in jobs):  # fusable cells as groups (pipeline/fused_job.py)
            from ablate.pipeline.fused_job import run_jobs_fused

            return run_jobs_fused(jobs, device, stop, registry, ui, self.events)
        records = {}
        for job in jobs:
            if stop.set:  # a signal during the last cell's final save: start no other cell
                raise Interrupted()
            records[job.cell] = run_cell(job, device, stop, registry, ui, self.events)
        return records


def run_jobs(ctx, jobs: list[CellJob]) -> dict[str, dict]:
    """Every cell through the spec's executor; with compilation on, around the compile cache."""
    from ablate.training import compile_cache
    from ablate.training import fastpath

    ctx.activity = "the cells"
    executor_cls = ctx.registry.get("executor", ctx.spec.executor.plugin)
    executor = executor_cls(executor_cls.Params.model_validate(ctx.spec.executor.params()))
    executor.events = ctx.events
    if ctx.spec.train.fuse == "on" and not isinstance(executor, LocalExecutor):
        ctx.ui.warn(f'train.fuse = "on" fuses cells in the local executor only; the {executor_cls.name} '
                    "executor trains every cell on its own (the numbers are the same; use --executor local to fuse)")

    def run() -> dict[str, dict]:
        records = executor.run(jobs, ctx.device, ctx.stop, ctx.registry, ctx.ui)
        for job in jobs:  # an executor that passed no events to run_cell: its cells' events from their records
            if ctx.events and job.cell not in ctx.events.settled and job.cell in records:
                events.replay(job.cell, records[job.cell], job.resolved_config(), ctx.events)
        return records

    if not (cellmod.compile_cells(ctx.spec) and fastpath.enabled_for(ctx.device)):
        return run()
    where = compile_cache.artifact_dir(ctx.paths.cache, ctx.device)
    ctx.compile_cache["loaded_bytes"], known = compile_cache.load(where, ctx.ui.warn)
    try:
        return run()
    finally:  # also when stopped: what was compiled is kept
        try:
            ctx.compile_cache["saved_bytes"] = compile_cache.save(where, known)
        except Exception as exc:  # a cache: failing to write it must not fail the run
            ctx.ui.warn(f"could not save the compile cache to {where} ({type(exc).__name__}: {exc})")
