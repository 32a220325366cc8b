"""A cell as a job: everything one cell needs, by value and by path, so any executor (this process,
another process, another machine sharing the cache) can train it.

`CellJob` holds the validated spec, the cell's name, the paths and content digests of the
artifacts it reads (corpus, backbone, oracle) and its output directory; `run_cell` loads those
inputs itself (memoised per process by path and digest, so cells in one process share them),
trains or reuses the cell and returns its record. A non-finite loss or a raising objective fails
only this cell; an interrupt raises Interrupted after the cell saved its state.

A cell being trained keeps `status.json` in its directory (state, step, heartbeat time, host, pid,
CUDA_VISIBLE_DEVICES; `ablate status`, the ray executor's progress). A failed cell's status keeps
its error, and a rerun skips it unless the job says `retry_failed` (`ablate run --retry-failed`).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ablate.training import cells as cellmod
from ablate.pipeline import meter
from ablate.pipeline import store
from ablate.api.components import ObjectiveContext
from ablate.errors import Interrupted, NumericalFault, PluginFault
from ablate.pipeline.events import NO_EVENTS, CellEvaluated, CellFailed, CellFinished, CellStarted, StepLogged
from ablate.config.spec import Spec


class Artifact(BaseModel):
    """A stage's artifact as a cell reads it: where it is and the digest of its data."""

    path: Path
    digest: str


class CellJob(BaseModel):
    model_config = ConfigDict(frozen=True)

    spec: Spec  # the resolved spec; the cell is spec.cells[name]
    cell: str
    key: str  # the cell's cache key (config, objective code, input keys)
    corpus: Artifact  # the corpus stage directory
    backbone: Artifact  # backbone.safetensors
    oracle: Artifact  # the oracle stage directory
    cell_dir: Path
    retry_failed: bool = False  # rerun the cell when its status records a failure

    @property
    def config(self):
        return next(c for c in self.spec.cells if c.name == self.cell)

    def resolved_config(self) -> dict:
        """The cell's settings ("cell") with the spec's sections that shape it (what loggers record)."""
        shaping = {"name", "seed", "numerics", "axes", "corpus", "backbone", "teacher", "oracle", "model", "train"}
        return {**self.spec.model_dump(mode="json", by_alias=True, include=shaping),
                "cell": self.config.model_dump(mode="json")}

    def identity(self) -> dict:
        """What the cell directory must record to be reused: key and input digests."""
        return cellmod.identity(self.key, {"backbone": self.backbone.digest, "oracle": self.oracle.digest})


_LOADED: dict[tuple[str, str, str], Any] = {}  # (what, path, digest) → loaded object; the last of each kind


def remember(what: str, artifact: Artifact, value: Any) -> None:
    """Keep an input this process already loaded (the engine's corpus and oracle variants)."""
    for k in [k for k in _LOADED if k[0] == what]:
        del _LOADED[k]
    _LOADED[(what, str(artifact.path), artifact.digest)] = value


def _load(what: str, artifact: Artifact, loader) -> Any:
    key = (what, str(artifact.path), artifact.digest)
    if key not in _LOADED:
        remember(what, artifact, loader(artifact.path))
    return _LOADED[key]


def inputs(job: CellJob):
    """(corpus, oracle variants) of a job, loaded once per process per artifact."""
    from ablate.oracle.build import load_oracle
    from ablate.pipeline.stages import load_corpus

    corpus = _load("corpus", job.corpus, load_corpus)
    variants = _load("variants", job.oracle, lambda p: cellmod.oracle_variants(load_oracle(p), job.spec))
    return corpus, variants


def load_record(cell_dir: Path, cached: bool) -> dict:
    """The record of a finished cell, read from its directory."""
    return {"status": "done", "cached": cached, "dir": cell_dir, "outcome": store.read_json(cell_dir / "outcome.json"),
            "evals": store.read_json(cell_dir / "evals.json"),
            "history": cellmod.read_history(cell_dir / "metrics.csv")}


STATUS_FILE = "status.json"  # in a cell directory; written after its DONE marker, never checksummed
HEARTBEAT_SECONDS = 2.0


def read_status(cell_dir: Path) -> dict | None:
    try:
        status = store.read_json(Path(cell_dir) / STATUS_FILE)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(cell_dir: Path, state: str, **fields) -> None:
    """status.json of a cell: state (running | done | failed | interrupted), the time and `fields`."""
    store.write_json(Path(cell_dir) / STATUS_FILE, {"state": state, **fields, "time": time.time()})


class Heartbeat:
    """The progress callback's twin: counts tokens and rewrites status.json at most every
    HEARTBEAT_SECONDS (and on `write`)."""

    def __init__(self, cell_dir: Path, steps: int, tokens_per_step: int):
        self.cell_dir, self.per_step, self.tokens, self.last = cell_dir, tokens_per_step, 0, 0.0
        self.fields = {"steps": steps, "host": socket.gethostname(), "pid": os.getpid(),
                       "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": time.time()}

    def __call__(self, n: int) -> None:
        self.tokens += n
        if time.time() - self.last >= HEARTBEAT_SECONDS:
            self.write("running")

    def write(self, state: str, **extra) -> None:
        self.last = time.time()
        write_status(self.cell_dir, state, **self.fields, step=self.tokens // self.per_step, **extra)


def earlier_failure(job: CellJob) -> dict | None:
    """The status of a cell that failed in an earlier run and is not to be retried, else None."""
    status = read_status(job.cell_dir)
    if status and status.get("state") == "failed" and not job.retry_failed and \
            cellmod.recorded_identity(job.cell_dir) == job.identity():
        return status
    return None


def settled(job: CellJob) -> bool:
    """Whether run_cell would only read the cell back (complete, or a failure not to be retried)."""
    return cellmod.is_complete(job.cell_dir, job.identity()) or earlier_failure(job) is not None


def run_cell(job: CellJob, device: torch.device, stop, registry, ui, events=NO_EVENTS) -> dict:
    """Reuse the cell if its directory is complete for this identity, else train it (resuming from
    its last checkpoint); a cell whose status records a failure is not rerun unless
    job.retry_failed. → record {"status": "done" | "failed", ...}. `events` receives the cell's
    events as they happen (cell_started, cell_evaluated, step_logged), then cell_finished or
    cell_failed (none when interrupted)."""
    record = _run_cell(job, device, stop, registry, ui, events)
    if record["status"] == "failed":
        events(CellFailed(job.cell, str(record["error"]), record.get("step")))
    else:
        events(CellFinished(job.cell, record["cached"], dict(record["outcome"])))
    return record


def _run_cell(job: CellJob, device: torch.device, stop, registry, ui, events) -> dict:
    ident, cell_dir, name = job.identity(), job.cell_dir, job.cell
    if cellmod.is_complete(cell_dir, ident):
        (cell_dir / cellmod.STATE_FILE).unlink(missing_ok=True)  # killed between its marker and this delete
        ui.info(f"[green]✓[/] cell {name} cached")
        return load_record(cell_dir, cached=True)
    if (status := earlier_failure(job)) is not None:
        ui.warn(f"cell {name} failed in an earlier run ({status.get('error')}); not rerun — "
                f"pass --retry-failed to rerun it")
        return {"status": "failed", "cached": True, "error": status.get("error"), "step": status.get("failed_at_step"),
                "checkpoint_step": status.get("checkpoint_step")}
    if cell_dir.exists() and store.read_marker(cell_dir) is not None:
        ui.warn(f"cell {name}: its files are corrupt or it was trained on other inputs; recomputing it")
    return _train(job, device, stop, registry, ui, events)


@dataclass
class CellSetup:
    """What training one cell needs, built from its job (`prepare_cell`)."""

    corpus: Any
    student: Any
    resume: dict | None  # the resume state, when one fits the student
    cfg: Any  # TrainConfig
    objective: Any
    sidecar: torch.Tensor | None


def prepare_cell(job: CellJob, device: torch.device, registry, ui, events) -> CellSetup | dict:
    """The cell's inputs, student, resume state, config and objective, and its CellStarted event;
    or, when the objective's constructor raises, the cell's failure record (written to its status;
    the cell fails, the run goes on)."""
    spec, cell, cell_dir = job.spec, job.config, job.cell_dir
    corpus, variants = inputs(job)
    resume = cellmod.prepare_dir(cell_dir, job.identity(), ui.warn)
    variant = variants[cell.oracle]
    student = cellmod.build_student(spec, cell, job.backbone.path, corpus.vocab_size, variant.table, device)
    if resume is not None and (why := cellmod.state_mismatch(resume, student)) is not None:
        ui.warn(f"the resume state of cell {cell.name} does not fit its student ({why}); restarting it")
        (cell_dir / cellmod.STATE_FILE).unlink()
        resume = None
    cfg = cellmod.train_config(spec, cell, variant.contract)
    events(CellStarted(cell.name, job.resolved_config(), cfg.steps, None if resume is None else int(resume["step"])))
    obj_cls = registry.get("objective", cell.objective.name)
    try:
        objective = obj_cls(obj_cls.Params.model_validate(cell.objective.params()),
                            ObjectiveContext(corpus.vocab_size, corpus.frequencies))
    except Exception as exc:  # the plugin's own failure: this cell fails, the others run
        record = _failure(cell.name, PluginFault("objective", cell.objective.name, "in its constructor", exc), None, ui)
        write_status(cell_dir, "failed", error=record["error"], failed_at_step=None, checkpoint_step=None)
        return record
    if resume is not None:
        ui.info(f"↻ cell {cell.name}: resuming from step {resume['step']}")
    sidecar = variant.sidecar_on(device) if obj_cls.needs_sidecar else None
    return CellSetup(corpus, student, resume, cfg, objective, sidecar)


def _train(job: CellJob, device: torch.device, stop, registry, ui, events) -> dict:
    from ablate.training.train import train_cell

    cell, cell_dir, name = job.config, job.cell_dir, job.cell
    setup = prepare_cell(job, device, registry, ui, events)
    if not isinstance(setup, CellSetup):
        return setup
    corpus, student, resume, cfg, objective, sidecar = (setup.corpus, setup.student, setup.resume, setup.cfg,
                                                        setup.objective, setup.sidecar)
    saved_step = [None if resume is None else int(resume["step"])]

    def save(state: dict) -> None:
        cellmod.save_state(cell_dir, state)
        saved_step[0] = int(state["step"])

    beat = Heartbeat(cell_dir, cfg.steps, cfg.batch * cfg.seq_len)
    beat.write("running")
    try:
        with ui.stage(f"cell {cell.name}", cfg.steps * cfg.batch * cfg.seq_len) as shown, \
                meter.measure(device) as use:
            progress = lambda n: (shown(n), beat(n))  # noqa: E731
            if resume is not None:
                progress(resume["step"] * cfg.batch * cfg.seq_len)
            outcome = train_cell(student, objective, corpus.train, corpus.val, sidecar, cfg, device,
                                 progress=progress, should_stop=stop, resume_state=resume, save_state=save,
                                 log=lambda row: events(StepLogged(name, int(row["step"]), _values(row))),
                                 on_eval=lambda row: events(CellEvaluated(name, int(row["step"]), row["val_loss"])))
    except (PluginFault, NumericalFault) as fault:
        return _failed(beat, _failure(cell.name, fault, saved_step[0], ui))
    if outcome.stopped_early:
        beat.write("interrupted", checkpoint_step=saved_step[0])
        raise Interrupted()
    (cell_dir / STATUS_FILE).unlink(missing_ok=True)  # not among the files the DONE marker checksums
    cellmod.write_outputs(cell_dir, student, outcome,
                          {"objective_formula": objective.formula(), "device": str(device),
                           "peak_gpu_allocated_gib": use.as_dict()["peak_gpu_allocated_gib"]})
    beat.write("done", finished=time.time())
    return load_record(cell_dir, cached=False)


def _values(row: dict) -> dict:
    """A logged row without its step: what step_logged carries (metrics.csv's numbers)."""
    return {k: v for k, v in row.items() if k != "step"}


def _failed(beat: Heartbeat, record: dict) -> dict:
    beat.write("failed", error=record["error"], failed_at_step=record["step"],
               checkpoint_step=record["checkpoint_step"])
    return record


def _failure(cell: str, fault: PluginFault | NumericalFault, checkpoint_step: int | None, ui) -> dict:
    """The record of a cell stopped by a non-finite number or its objective; its last
    checkpoint (if any) is kept, the other cells still run."""
    kept = f"last good checkpoint: step {checkpoint_step}" if checkpoint_step is not None else "no checkpoint yet"
    if isinstance(fault, NumericalFault):
        what, step = f"non-finite {fault.what} at step {fault.step}", fault.step
    else:
        where = fault.where.removeprefix("at step ")
        what, step = str(fault), int(where) if where.isdigit() else None
    ui.warn(f"cell {cell} stopped: {what}; {kept}. The other cells still run.")
    return {"status": "failed", "error": f"{what}; {kept}", "step": step, "checkpoint_step": checkpoint_step}


def cell_jobs(ctx, r_corpus, r_bb, r_oracle, corpus, variants) -> list[CellJob]:
    """One job per cell; this process's loaded corpus and oracle variants are remembered, so a
    local executor does not read them again."""
    arts = {n: Artifact(path=r.path, digest=r.digest) for n, r in (("corpus", r_corpus), ("backbone", r_bb),
                                                                     ("oracle", r_oracle))}
    remember("corpus", arts["corpus"], corpus)
    remember("variants", arts["oracle"], variants)
    keys = {"backbone": r_bb.key, "oracle": r_oracle.key}
    return [CellJob(spec=ctx.spec, cell=c.name, key=ctx.cell_key(c, keys), corpus=arts["corpus"],
                    backbone=arts["backbone"], oracle=arts["oracle"], cell_dir=ctx.paths.run_dir / "cells" / c.name,
                    retry_failed=getattr(ctx, "retry_failed", False))
            for c in ctx.spec.cells]
