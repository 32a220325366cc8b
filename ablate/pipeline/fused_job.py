"""Cell jobs trained as fused groups (train.fuse = "auto"; ablate.training.fused).

`fusable_groups(jobs)` splits a run's jobs into groups that can train fused: the same spec
sections that shape training and the same backbone, corpus and oracle artifacts, and the same
training windows (the same data seed, i.e. the same `[sweep] seed`). Cells of one group may differ
in router, oracle variant and objective. `run_group` trains such a group as `run_cell` trains one
job, and every cell keeps exactly its own directory, status, heartbeat, events and record: a
failing cell (non-finite number, raising objective) fails alone, an interrupt saves every cell's
state, and a finished cell records `fused` (the group's cell names) in outcome.json.

Jobs already settled (complete, or failed earlier and not retried), groups of one, and groups
whose cells would resume from different steps run through `run_cell` one by one.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from ablate.errors import Interrupted
from ablate.pipeline import cell_job as cj
from ablate.pipeline import meter
from ablate.pipeline.cell_job import CellJob
from ablate.pipeline.events import NO_EVENTS, CellEvaluated, CellFailed, CellFinished, StepLogged
from ablate.training import cells as cellmod


def fuse_key(job: CellJob) -> tuple:
    """Jobs with equal keys see the same frozen prefix on the same windows at every step."""
    spec = job.spec
    shaping = spec.model_dump(mode="json", include={"numerics", "corpus", "backbone", "model", "train"})
    return (repr(shaping), cellmod.training_seeds(spec, job.config)[1], str(job.corpus.path), job.corpus.digest,
            str(job.backbone.path), job.backbone.digest, str(job.oracle.path), job.oracle.digest)


def fusable_groups(jobs: list[CellJob]) -> list[list[CellJob]]:
    """The jobs in groups (order of first appearance; job order within a group)."""
    groups: dict[tuple, list[CellJob]] = {}
    for job in jobs:
        groups.setdefault(fuse_key(job), []).append(job)
    return list(groups.values())


def run_jobs_fused(jobs: list[CellJob], device: torch.device, stop, registry, ui, events=NO_EVENTS) -> dict[str, dict]:
    """LocalExecutor's loop with fusion: every job's record (run_cell's), in job order."""
    records: dict[str, dict] = {}
    for group in fusable_groups(jobs):
        todo = [j for j in group if cellmod.fuses(j.spec, device) and not cj.settled(j)]
        for job in group:
            if job not in todo or len(todo) < 2:
                if stop.set:
                    raise Interrupted()
                records[job.cell] = cj.run_cell(job, device, stop, registry, ui, events)
        if len(todo) >= 2:
            if stop.set:
                raise Interrupted()
            records.update(run_group(todo, device, stop, registry, ui, events))
    return {job.cell: records[job.cell] for job in jobs}


def run_group(jobs: list[CellJob], device: torch.device, stop, registry, ui, events=NO_EVENTS) -> dict[str, dict]:
    """Train unsettled, fusable jobs as one group → cell name → record; raises Interrupted (every
    cell's state saved) when stopped."""
    from ablate.training.fused import Member, rng_state, train_fused

    resumes = {job.cell: cellmod.prepare_dir(job.cell_dir, job.identity(), ui.warn) for job in jobs}
    steps = Counter(None if r is None else int(r["step"]) for r in resumes.values())
    if len(steps) > 1:  # resuming from different steps: one by one (run_cell prepares each again)
        ui.info(f"cells {', '.join(j.cell for j in jobs)} resume from different steps; trained one by one")
        return {job.cell: cj.run_cell(job, device, stop, registry, ui, events) for job in jobs}
    names = [job.cell for job in jobs]
    records: dict[str, dict] = {}
    members: dict[str, Member] = {}
    beats: dict[str, cj.Heartbeat] = {}
    objectives: dict[str, object] = {}
    shared_backbone = None
    for job in jobs:
        setup = cj.prepare_cell(job, device, registry, ui, events)
        if not isinstance(setup, cj.CellSetup):  # its objective's constructor raised: it fails, the others run
            records[job.cell] = setup
            events(CellFailed(job.cell, str(setup["error"]), setup.get("step")))
            continue
        rng = rng_state(torch.device(device))  # what the cell's separate run trains from
        if shared_backbone is None:
            shared_backbone = setup.student.backbone
        else:  # one frozen backbone on the device for the whole group (the same checkpoint's weights)
            setup.student.backbone = shared_backbone
        objectives[job.cell] = setup.objective
        beat = beats[job.cell] = cj.Heartbeat(job.cell_dir, setup.cfg.steps, setup.cfg.batch * setup.cfg.seq_len)
        beat.write("running", fused=names)
        name = job.cell
        members[job.cell] = Member(
            setup.student, setup.objective, setup.corpus.train, setup.corpus.val, setup.sidecar, setup.cfg, rng,
            resume_state=setup.resume, save_state=lambda state, d=job.cell_dir: cellmod.save_state(d, state),
            log=lambda row, n=name: events(StepLogged(n, int(row["step"]), cj._values(row))),
            on_eval=lambda row, n=name: events(CellEvaluated(n, int(row["step"]), row["val_loss"])))
    if not members:
        return records
    live = list(members.values())
    per_step = live[0].cfg.batch * live[0].cfg.seq_len
    total = sum(m.cfg.steps for m in live) * per_step
    with ui.stage(f"cells {', '.join(members)} (fused)", total) as shown, meter.measure(device) as use:
        for name, m in members.items():
            m.progress = lambda n, b=beats[name]: (shown(n), b(n))
            if m.resume_state is not None:
                m.progress(int(m.resume_state["step"]) * per_step)
        train_fused(live, device, should_stop=stop)
    interrupted = False
    for job in jobs:
        m = members.get(job.cell)
        if m is None:
            continue
        beat = beats[job.cell]
        if m.error is not None:
            record = cj._failed(beat, cj._failure(job.cell, m.error, m.saved_step, ui))
            events(CellFailed(job.cell, str(record["error"]), record.get("step")))
            records[job.cell] = record
        elif m.outcome.stopped_early:
            beat.write("interrupted", checkpoint_step=m.saved_step)
            interrupted = True
        else:
            (job.cell_dir / cj.STATUS_FILE).unlink(missing_ok=True)
            cellmod.write_outputs(job.cell_dir, m.student, m.outcome,
                                  {"objective_formula": objectives[job.cell].formula(), "device": str(device),
                                   "peak_gpu_allocated_gib": use.as_dict()["peak_gpu_allocated_gib"],
                                   "fused": names})
            beat.write("done", finished=time.time())
            record = records[job.cell] = cj.load_record(job.cell_dir, cached=False)
            events(CellFinished(job.cell, record["cached"], dict(record["outcome"])))
    if interrupted:
        raise Interrupted()
    return records
