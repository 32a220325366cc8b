"""The CUDA tier: what only a GPU exercises. Every test is marked `cuda` (skipped without a GPU);
scripts/gpu-check.sh runs them on a GPU machine before a change to code the GPU runs lands.

- the zeb139 smoke profile end to end on CUDA (exit 0, report written);
- one full-dimension cell (ZEB-139 shapes: `tiny` backbone, vocab 32,000, 10,000 rows, batch
  4 × 2048, bf16) for 30 steps compiled and eager: losses equal within bf16 tolerance;
- resume after SIGKILL mid-cell on CUDA, to the results of an uninterrupted run;
- the smoke profile's cells compiled, fused by the default train.fuse = "auto", against one by one;
- `ablate bench --size small --device cuda` (its fused group's loss check included);
- (tests/pipeline/test_meter.py) the meter on real, nested CUDA blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[2]
ABLATE = shutil.which("ablate") or str(Path(sys.executable).with_name("ablate"))
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def ablate(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([ABLATE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_zeb139_smoke_profile_runs_end_to_end_on_cuda(tmp_path):
    shutil.copy(ROOT / "specs" / "zeb139.toml", tmp_path / "zeb139.toml")
    done = ablate(tmp_path, "run", "zeb139.toml", "--profile", "smoke", "--device", "cuda", "--quiet")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    results = json.loads((tmp_path / "runs" / "zeb139" / "results.json").read_text())
    assert results["provenance"]["device"] == "cuda"
    assert all(c["status"] == "done" for c in results["cells"].values())
    assert results["stages"]["cells"]["peak_gpu_allocated_gib"] > 0
    assert (tmp_path / "reports" / "zeb139.md").read_text().startswith("# zeb139")


def full_dimension_cell_losses(compile: bool, steps: int = 30) -> list[float]:
    """Losses of a router-on KL+CE cell at ZEB-139's dimensions, from fixed random weights."""
    from ablate.training import fastpath
    from ablate.api.components import ObjectiveContext
    from ablate.model.backbone import Backbone, BackboneConfig
    from ablate.model.student import EngramConfig, Student
    from ablate.oracle.hashing import RowContract
    from ablate.training.train import CellRun, TrainConfig
    from ablate_builtins.objectives import KLCE

    V, rows, device = 32000, 10000, torch.device("cuda")
    torch._dynamo.reset()
    torch.manual_seed(0)
    student = Student(Backbone(BackboneConfig(vocab_size=V)), EngramConfig(router=True), torch.randn(rows, 128))
    student.freeze_backbone()
    student = student.to(device)
    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, V, (400_000,), generator=g), torch.randint(0, V, (50_000,), generator=g)
    sidecar = torch.randn(rows, V, generator=g).to(device)
    cfg = TrainConfig(steps=steps, batch=4, seq_len=2048, warmup=5, aux_warmup=5, log_every=1, eval_every=10_000,
                      eval_batches=1, precision="bf16", row_contract=RowContract(rows=rows, seed=42), compile=compile)
    objective = KLCE(KLCE.Params.model_validate({"lambda": 0.5}), ObjectiveContext(V, torch.ones(V, dtype=torch.float64)))
    run = CellRun(student, objective, train, val, sidecar, cfg, device)
    assert run.compiled == (compile and fastpath.enabled_for(device))
    torch.manual_seed(7)
    losses = [run.advance(s)["loss"] for s in range(steps)]
    torch._dynamo.reset()
    return losses


def test_one_full_dimension_cell_compiled_equals_eager_within_bf16_tolerance():
    eager = full_dimension_cell_losses(compile=False)
    compiled = full_dimension_cell_losses(compile=True)
    assert all(torch.isfinite(torch.tensor(eager + compiled)))
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert b == pytest.approx(a, rel=2e-2), f"step {step}: eager {a} vs compiled {b}"


def test_resume_after_sigkill_mid_cell_on_cuda(tmp_path):
    args = ["run", "demo.toml", "--profile", "tiny", "--set", "train.steps=40", "--set", "train.checkpoint_every=5",
            "--set", "train.precision=fp32", "--device", "cuda", "--quiet"]
    for d in ("straight", "killed"):
        (tmp_path / d).mkdir()
        shutil.copy(ROOT / "specs" / "demo.toml", tmp_path / d / "demo.toml")
    straight = ablate(tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]

    cwd = tmp_path / "killed"
    proc = subprocess.Popen([ABLATE, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    state = cwd / "runs" / "demo" / "cells" / "router_on_real" / "state.safetensors"
    end = time.monotonic() + 600
    while not state.exists():  # mid-cell: the third cell has saved a checkpoint and is training on
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the kill point was never reached"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    resumed = ablate(cwd, *args[:-1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr
    a = json.loads((tmp_path / "straight" / "runs" / "demo" / "results.json").read_text())["cells"]
    b = json.loads((cwd / "runs" / "demo" / "results.json").read_text())["cells"]
    for name in a:  # cuDNN/cuBLAS may reorder reductions: equal to fp32 rounding, not bit for bit
        assert b[name]["metrics"]["val_loss"] == pytest.approx(a[name]["metrics"]["val_loss"], rel=1e-4), name


def test_fused_cells_on_cuda_give_the_numbers_of_cells_run_one_by_one(tmp_path):
    """The zeb139 smoke profile's 6 cells with the default train.fuse = "auto" and the cells compiled
    (auto then fuses them on CUDA: one fused group) against train.fuse = "off" (eager, one by one):
    every cell trains, records its group, and ends at the same validation loss within bf16 tolerance
    (the V-contrast permutations come from another RNG inside a compiled graph)."""
    results = {}
    for fuse, extra in (("auto", ["--set", "train.compile=on"]), ("off", [])):
        (tmp_path / fuse).mkdir()
        shutil.copy(ROOT / "specs" / "zeb139.toml", tmp_path / fuse / "zeb139.toml")
        done = ablate(tmp_path / fuse, "run", "zeb139.toml", "--profile", "smoke", "--set", f"train.fuse={fuse}",
                      *extra, "--device", "cuda", "--quiet")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[fuse] = json.loads((tmp_path / fuse / "runs" / "zeb139" / "results.json").read_text())["cells"]
    names = list(results["off"])
    assert len(names) == 6
    for name in names:
        fused, alone = results["auto"][name], results["off"][name]
        assert fused["status"] == alone["status"] == "done"
        assert sorted(fused["fused"]) == sorted(names) and alone["fused"] is None
        assert fused["metrics"]["val_loss"] == pytest.approx(alone["metrics"]["val_loss"], rel=2e-2), name


def test_bench_small_on_cuda(tmp_path):
    done = ablate(tmp_path, "bench", "--size", "small", "--device", "cuda", "--out", str(tmp_path / "bench.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["cells"]["loss_check"]["ok"]


def test_ray_executor_gives_the_local_numbers_on_cuda(tmp_path):
    """The 6 cells of the zeb139 smoke profile through `--executor ray` (a local Ray over the GPUs
    torch sees) against `--executor local`: equal within bf16 tolerance."""
    pytest.importorskip("ray", reason="the ray executor needs ray (scripts/gpu-check.sh installs it from .whl/)")
    shutil.copy(ROOT / "specs" / "zeb139.toml", tmp_path / "zeb139.toml")
    cells, walls = {}, {}
    for executor in ("local", "ray"):
        t0 = time.monotonic()
        done = ablate(tmp_path, "run", "zeb139.toml", "--profile", "smoke", "--device", "cuda", "--quiet",
                      "--set", f"name=zeb139_{executor}", "--executor", executor)
        walls[executor] = time.monotonic() - t0
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        cells[executor] = json.loads((tmp_path / "runs" / f"zeb139_{executor}" / "results.json").read_text())["cells"]
    assert list(cells["ray"]) == list(cells["local"]) and len(cells["local"]) == 6
    for name, cell in cells["local"].items():
        assert cells["ray"][name]["status"] == "done"
        for key, value in cell["metrics"].items():
            assert cells["ray"][name]["metrics"][key] == pytest.approx(value, rel=2e-2, abs=1e-3), (name, key)
    print(f"wall seconds: local {walls['local']:.1f}, ray {walls['ray']:.1f} (stages cached for the second)")


def test_memory_budget_holds_the_process_to_the_card_it_names():
    """`ablate run --memory-budget 1GiB` on CUDA: 0.5 GiB still fits, 2 GiB is out of memory."""
    from ablate.pipeline import memory

    device = torch.device("cuda")
    try:
        memory.cap_cuda(device, memory.GIB)
        half = torch.empty(memory.GIB // 2, dtype=torch.uint8, device=device)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * memory.GIB, dtype=torch.uint8, device=device)
        del half
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
        torch.cuda.empty_cache()
