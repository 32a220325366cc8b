"""Where a cell step's time goes: `python scripts/profile_step.py OUT_DIR [--size full] [--fused]`.

Builds `ablate bench`'s router-on cell (or, with --fused, its six-cell fused group), warms it up,
then measures over the same steps: device milliseconds per step (CUDA events), the host's
milliseconds to enqueue a step that does not log, the summed kernel time per step and the
largest kernels and host operations (torch.profiler). Writes OUT_DIR/profile[_fused].txt and a
Chrome trace of three steps. A tool for finding the next speed-up, not a benchmark:
`ablate bench` is the measurement.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ablate.training import bench as b
from ablate.training.bench_fused import ROUTERS
from ablate.training.fused import Member, group_step, prepare, rng_state
from ablate.training.train import CellRun


def single_cell(size, device):
    inputs = b.make_cell_inputs(size, device)
    cfg = b.train_config(size, "bf16" if device.type == "cuda" else "fp32")
    run = CellRun(b.make_student(size, inputs, device, True), b.make_objective(size, inputs, True),
                  inputs.train, inputs.val, inputs.sidecar, cfg, device)
    return run.advance, run.is_log_step


def fused_group(size, device):
    inputs = b.make_cell_inputs(size, device)
    cfg = b.train_config(size, "bf16" if device.type == "cuda" else "fp32")
    members = []
    for router in ROUTERS:
        members.append(Member(b.make_student(size, inputs, device, router), b.make_objective(size, inputs, router),
                              inputs.train, inputs.val, inputs.sidecar if router else None, cfg, rng_state(device)))
        if len(members) > 1:
            members[-1].student.backbone = members[0].student.backbone
    prepare(members, device)
    return (lambda s: group_step(members, s, device)), members[0].run.is_log_step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="full")
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = b.SIZES[args.size]
    step, is_log = (fused_group if args.fused else single_cell)(size, device)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    t = time.perf_counter()
    for s in range(15):
        step(s)
    sync(device)
    lines.append(f"warm-up (15 steps, compilation included): {time.perf_counter() - t:.1f} s")

    s0 = 15
    t_all = time.perf_counter()
    host = []
    for s in range(s0, s0 + args.steps):
        t = time.perf_counter()
        step(s)
        if not is_log(s):
            host.append(1000 * (time.perf_counter() - t))
    sync(device)
    lines.append(f"ms/step (host and device, synchronised at the end): "
                 f"{1000 * (time.perf_counter() - t_all) / args.steps:.3f}")
    lines.append(f"host ms to enqueue a non-log step: median {statistics.median(host):.3f}, "
                 f"min {min(host):.3f}, max {max(host):.3f}")
    s0 += args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    with profile(activities=activities) as prof:
        for s in range(s0, s0 + 10):
            step(s)
        sync(device)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    lines.append(f"summed kernel time per step: {kernel_us / 10 / 1000:.3f} ms")
    lines.append("\n== by device time (10 steps) ==")
    lines.append(events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90))
    lines.append("\n== by host self time (10 steps) ==")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
    name = "profile_fused" if args.fused else "profile"
    (args.out / f"{name}.txt").write_text("\n".join(lines))
    print("\n".join(lines[:4]))

    s0 += 10
    with profile(activities=activities) as prof:
        for s in range(s0, s0 + 3):
            step(s)
        sync(device)
    trace = args.out / f"{name}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()


if __name__ == "__main__":
    main()
