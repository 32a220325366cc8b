"""`ablate bench`'s fused-group row (ablate.training.fused): the ZEB-139 matrix's six cells (two
router-off CE, four router-on KL+CE) as one fused group on the bench cell's dimensions, one group
step = one step of every cell (one fused forward, one backward, each cell's update).

Reported: the group's ms per step, its aggregate tokens/s (cells × batch × seq_len per group step)
and per-cell tokens/s, against one router-on cell and against the same six cells one after the
other, both from `bench_cells` in the same run. Loss check: every member's loss of one fixed batch
through the fused path equals its separate CellRun's (same weights) within the bench tolerance.
"""

from __future__ import annotations

import torch

from ablate.model.fused import fused_forward_compiled
from ablate.training import fastpath
from ablate.training.fused import Member, draw_perms, group_step, prepare, rng_state
from ablate.training.train import CellRun

ROUTERS = (False, False, True, True, True, True)  # the ZEB-139 matrix: 2 router-off, 4 router-on


def bench_fused(size, device: torch.device, cells: dict, routers: tuple[bool, ...] = ROUTERS) -> dict:
    from ablate.training import bench as b

    inputs = b.make_cell_inputs(size, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = b.train_config(size, precision)
    batch = b.WindowSampler(inputs.train, cfg.batch, cfg.seq_len, 7, device)()

    # loss check: each cell alone, then fused (fresh students with the same initial weights)
    alone = []
    for router in routers:
        run = CellRun(b.make_student(size, inputs, device, router), b.make_objective(size, inputs, router),
                      inputs.train, inputs.val, inputs.sidecar if router else None, cfg, device)
        torch.manual_seed(1)
        alone.append(run.losses(cfg.aux_warmup, *batch, log_step=False).loss.item())
        del run
    b._release(device)
    members = []
    for router in routers:
        members.append(Member(b.make_student(size, inputs, device, router), b.make_objective(size, inputs, router),
                              inputs.train, inputs.val, inputs.sidecar if router else None, cfg, rng_state(device)))
        if len(members) > 1:  # one frozen backbone for the group
            members[-1].student.backbone = members[0].student.backbone
    prepare(members, device)
    perms = []
    for m in members:
        torch.manual_seed(1)
        perms.append(draw_perms(m, device))
    if members[0].run.compiled:
        fastpath.step_begin()
    with members[0].run.autocast():
        outs = fused_forward_compiled([m.student for m in members], batch[0], perms)
    fused = [m.run.losses(cfg.aux_warmup, *batch, log_step=False, out=out).loss.item()
             for m, out in zip(members, outs)]
    del outs
    rel = max(abs(f - a) / max(abs(a), 1e-12) for f, a in zip(fused, alone))
    check = {"fused_losses": fused, "separate_losses": alone, "max_relative_difference": rel,
             "tolerance": size.tolerance[precision], "ok": rel <= size.tolerance[precision]}

    def step(s: int) -> None:
        group_step(members, s, device)

    timing = b.time_steps(step, size.warmup, max(2, size.steps // 3), device)
    del inputs, batch
    b._release(device)
    seconds = timing["ms_per_step"] / 1000
    tokens = size.batch * size.seq_len
    one_on = cells["ablate"]["ms_per_step"]
    sequential_ms = sum(one_on if r else cells["router_off_ablate"]["ms_per_step"] for r in routers)
    return {**timing, "cells": len(routers), "routers": list(routers), "loss_check": check,
            "aggregate_tokens_per_s": len(routers) * tokens / seconds, "per_cell_tokens_per_s": tokens / seconds,
            "one_cell_tokens_per_s": cells["ablate"]["tokens_per_s"],
            "aggregate_vs_one_cell": len(routers) * tokens / seconds / cells["ablate"]["tokens_per_s"],
            "sequential_ms_per_step": sequential_ms, "speedup_vs_sequential": sequential_ms / timing["ms_per_step"]}


def table_row(f: dict) -> tuple[str, ...]:
    """(measurement, ms/step, tokens/s, MFU, memory, vs) for bench.render_table."""
    return (f"fused group of {f['cells']} cells ({f['routers'].count(True)} router-on), one step each",
            f"{f['ms_per_step']:.2f}", f"{f['aggregate_tokens_per_s']:,.0f} agg., {f['per_cell_tokens_per_s']:,.0f}/cell",
            "", "—" if f["peak_memory_gib"] is None else f"{f['peak_memory_gib']:.2f} / {f['peak_reserved_gib']:.2f}",
            f"{f['aggregate_vs_one_cell']:.2f}× one cell's tok/s; {f['speedup_vs_sequential']:.2f}× the cells one "
            f"by one ({f['sequential_ms_per_step']:.1f} ms){'' if f['loss_check']['ok'] else ', MISMATCH'}")
