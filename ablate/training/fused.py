"""Fused cells: cells that share the frozen backbone, the training data stream and every shape
train as one group, one forward pass and one backward pass per step for the whole group
(ablate.model.fused: the frozen layers before the first injection computed once, everything after
batched over the cells, each cell with its own adapters, oracle table and router).

Everything else stays each cell's own, so a cell's numbers equal those of its separate run
(`train_cell`): its parameters, objective (on its own logits), aux losses, gradient clipping,
optimiser state, data and validation samplers, logged rows, evaluations, resumable state and
its global RNG stream (the V-contrast permutations and anything its objective draws: each member
keeps its own CPU/CUDA RNG state and has it swapped in around everything it draws or computes).
Each member is a `CellRun`; `train_fused` drives them as `train_cell` drives one, in lockstep.
The summed loss of the members has, for each member's parameters, that member's gradient (no
parameter is shared; the frozen backbone gets none).

A member whose loss, gradient or objective fails (NumericalFault, PluginFault) leaves the group
with that error and the others go on; a stop request saves every member's state. Timings: a
member's dt_ms / tokens_per_s are over the group's wall time (the members share the device).

Members must have the same training windows at every step (same stream and data seed:
`fuse_key` in the pipeline checks that), the same schedule (steps, eval/log/checkpoint cadence),
the same step to start from, and backbones with equal weights (one module is shared).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ablate.errors import InputError, NumericalFault, PluginFault
from ablate.model.fused import fused_forward_compiled
from ablate.training.optim import CellOptimizer
from ablate.training.train import CellRun, TrainConfig, TrainOutcome, evaluate_many

_SCHEDULE = ("steps", "batch", "seq_len", "eval_every", "eval_batches", "log_every", "checkpoint_every",
             "data_seed", "val_seed", "precision")


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG state(s) a cell's training draws from (CPU, and the device's CUDA one)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Member:
    """One cell of a fused group: train_cell's arguments, plus `rng`, the global RNG state its
    separate run would train from (taken right after building its student)."""

    student: torch.nn.Module
    objective: Any
    train_stream: torch.Tensor
    val_stream: torch.Tensor
    sidecar: torch.Tensor | None
    cfg: TrainConfig
    rng: dict[str, torch.Tensor]
    log: Callable[[dict], None] = lambda row: None
    on_eval: Callable[[dict], None] = lambda row: None
    progress: Callable[[int], None] = lambda n: None
    resume_state: dict | None = None
    save_state: Callable[[dict], None] | None = None
    # set by train_fused
    run: CellRun | None = None
    outcome: TrainOutcome | None = None
    error: Exception | None = None  # NumericalFault | PluginFault that stopped this member
    saved_step: int | None = None


def share_backbone(members: list[Member]) -> None:
    """Give every member the lead's backbone module (one frozen copy on the device), after checking
    that the weights are equal; InputError otherwise."""
    lead = members[0].student.backbone
    for m in members[1:]:
        own = m.student.backbone
        if own is lead:
            continue
        theirs, ours = own.state_dict(), lead.state_dict()
        if theirs.keys() != ours.keys() or not all(torch.equal(theirs[k], ours[k]) for k in ours):
            raise InputError(f"Cells {members[0].cfg.name!r} and {m.cfg.name!r} cannot train fused: their "
                             "backbones' weights differ; train them with train.fuse = \"off\".")
        m.student.backbone = lead


def draw_perms(m: Member, device: torch.device) -> dict[int, torch.Tensor]:
    """The V-contrast permutations of one training step, as the member's separate forward draws
    them: one randperm(N) per injection layer in ascending order, from its global RNG stream."""
    student = m.student
    return {i: torch.randperm(student.table.shape[0], device=student.table.device)
            for i in sorted(student.cfg.inject_layers)}


def prepare(members: list[Member], device: torch.device) -> None:
    """Each member's CellRun (restored from its resume state, if any), on one shared backbone."""
    share_backbone(members)
    for m in members:
        m.run = CellRun(m.student, m.objective, m.train_stream, m.val_stream, m.sidecar, m.cfg, device)
        set_rng_state(m.rng, device)
        if m.resume_state is not None:
            m.run.restore(m.resume_state)  # sets the member's RNG state as it was saved
            m.saved_step = int(m.resume_state["step"])
        m.rng = rng_state(device)


def guarded(m: Member, action: Callable[[], Any], device: torch.device) -> Any:
    """action() with the member's RNG state in place; a fault of the member is kept in m.error
    (and None returned)."""
    set_rng_state(m.rng, device)
    try:
        return action()
    except (NumericalFault, PluginFault) as fault:
        m.error = fault
        return None
    finally:
        m.rng = rng_state(device)


def group_step(active: list[Member], s: int, device: torch.device) -> list[dict | None]:
    """Training step s of every active member: one fused forward, each member's losses, one
    backward, each member's clipping, then the members' updates together (one Newton–Schulz per
    shape group for all their Muon matrices). Returns each member's logged row (None off log steps or when
    the member failed: m.error is set)."""
    lead = active[0].run
    log_step = lead.is_log_step(s)
    inputs, targets = lead.begin_step(s)
    for m in active[1:]:  # the same windows: every member's sampler advances as in its own run
        m.run.begin_step(s, draw=False)
        m.run.train_sampler.draw()
    perms = [guarded(m, lambda m=m: draw_perms(m, device), device) for m in active]
    with lead.autocast():
        outs = fused_forward_compiled([m.student for m in active], inputs, perms)
    steps = [guarded(m, lambda m=m, out=out: m.run.losses(s, inputs, targets, log_step, out=out), device)
             for m, out in zip(active, outs)]
    del outs
    losses = [step.loss for step in steps if step is not None]
    if losses:
        torch.stack(losses).sum().backward()
    logs = [None if step is None else guarded(m, lambda m=m, step=step: m.run.finish_step(s, step, update=False), device)
            for m, step in zip(active, steps)]
    updating = [m.run.optimizer for m, log in zip(active, logs) if log is not None]
    CellOptimizer.step_together(updating)  # one Newton–Schulz per shape group for the whole group
    for optimizer in updating:
        optimizer.zero_grad(set_to_none=True)
    return [None if log is None else guarded(m, lambda m=m, log=log: m.run.record_step(s, log), device)
            for m, log in zip(active, logs)]


def train_fused(members: list[Member], device: torch.device | str, *,
                should_stop: Callable[[], bool] = lambda: False) -> list[Member]:
    """Train every member as train_cell would train it alone; returns the members with `outcome`
    (done or stopped early) or `error` (a NumericalFault / PluginFault of that member) set."""
    device = torch.device(device)
    if not members:
        return members
    first = members[0].cfg
    for m in members[1:]:
        differing = [k for k in _SCHEDULE if getattr(m.cfg, k) != getattr(first, k)]
        if differing:
            raise InputError(f"Cells {first.name!r} and {m.cfg.name!r} cannot train fused: their "
                             f"{', '.join(differing)} differ; train them with train.fuse = \"off\".")
    t0 = time.perf_counter()
    prepare(members, device)
    steps = {m.run.step for m in members if not m.run.complete}
    if len(steps) > 1:
        raise InputError(f"The fused cells {[m.cfg.name for m in members]} resume from different steps "
                         f"{sorted(steps)}; train them one by one (train.fuse = \"off\").")
    cfg = first

    def outcome(m: Member, stopped: bool) -> TrainOutcome:
        run = m.run
        final = run.evals[-1]["val_loss"] if run.complete and run.evals else None
        tokens = run.steps_run * cfg.batch * cfg.seq_len
        return TrainOutcome(
            history=run.history, evals=run.evals, final_val_loss=final, steps_done=run.step,
            stopped_early=stopped, seconds=time.perf_counter() - t0,
            tokens_per_s=tokens / max(run.train_s, 1e-9), tokens=tokens, compiled=run.compiled,
            precision=run.precision, notes=run.notes + [f"fused with {len(members) - 1} other cell(s)"])

    active: list[Member] = []
    for m in members:
        if m.run.complete:
            m.outcome = outcome(m, False)
        else:
            active.append(m)

    def drop_failed() -> None:
        active[:] = [m for m in active if m.error is None]

    def save(m: Member) -> None:
        if m.save_state is not None:
            state = m.run.state()
            m.save_state(state)
            m.saved_step = int(state["step"])

    def stop_all() -> list[Member]:
        for m in active:
            def stop(m=m):
                m.run.raise_if_fault()
                m.run.close_interval()
                save(m)
                m.outcome = outcome(m, True)
            guarded(m, stop, device)
        return members

    def eval_all(step: int, fork_skip: int | None = None) -> bool:
        """Evaluate every active member as `step` (on forks of the validation samplers that skip
        fork_skip × eval_batches draws when given), all in one fused forward per batch; False when
        stopped midway (samplers rewound, no member's evaluation recorded). Evaluation time is
        excluded from every member's training time."""
        t = time.perf_counter()
        try:
            for m in list(active):
                guarded(m, m.run.raise_if_fault, device)
            drop_failed()
            if not active:
                return True
            samplers = [m.run.val_sampler if fork_skip is None else m.run.val_sampler.fork(fork_skip) for m in active]
            before = [sampler.state_dict() for sampler in samplers]
            students = [m.student for m in active]
            values = evaluate_many(students, samplers,
                                   lambda inputs: [o.logits for o in fused_forward_compiled(students, inputs, None)],
                                   cfg.eval_batches, active[0].run.autocast, should_stop)
            if values is None:
                for sampler, state in zip(samplers, before):
                    sampler.load_state_dict(state)
                return False
            for m, val in zip(list(active), values):
                def record(m=m, value=val.item()):
                    if not math.isfinite(value):
                        raise NumericalFault(m.cfg.name, step, "validation loss")
                    row = {"step": step, "val_loss": value}
                    m.run.evals.append(row)
                    m.on_eval(row)
                guarded(m, record, device)
            drop_failed()
            return True
        finally:
            spent = time.perf_counter() - t
            for m in members:
                m.run.excluded_s += spent

    if not active:
        return members
    start = active[0].run.step
    for m in active:
        m.student.train()
        m.run.mark, m.run.last_logged = time.perf_counter(), m.run.step - 1
    if start == 0 and not any(m.run.evals for m in active):
        if not eval_all(0, (cfg.steps - 1) // cfg.eval_every * cfg.eval_batches):
            return stop_all()
    for s in range(start, cfg.steps):
        if not active:
            return members
        if should_stop():
            return stop_all()
        if s > 0 and s % cfg.eval_every == 0 and not eval_all(s):
            return stop_all()
        if not active:
            return members
        for m, row in zip(list(active), group_step(active, s, device)):
            if m.error is not None:
                continue
            m.progress(cfg.batch * cfg.seq_len)
            if row is not None:
                m.log(row)
        drop_failed()
        step = s + 1
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            for m in active:
                guarded(m, lambda m=m: (m.run.raise_if_fault(), save(m)), device)
            drop_failed()
    if not active:
        return members
    if should_stop():
        return stop_all()
    if not eval_all(cfg.steps):
        return stop_all()
    for m in active:
        m.run.complete = True
        save(m)
        m.outcome = outcome(m, False)
    return members
