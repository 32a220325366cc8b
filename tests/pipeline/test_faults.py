"""Faults inside a run: a non-finite loss or gradient stops only its cell (step number reported,
last good checkpoint kept, the other cells still run, exit 1 with a summary table); a cache
entry that passes its checksums but is malformed is a clear error; a second writer is refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ablate.pipeline import store
from cli_run import MICRO_DEMO, ablate_in, demo_dir

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPEC_ARGS = [*MICRO_DEMO, "--set", "train.steps=10", "--set", "train.checkpoint_every=5"]

FAULTY_OBJECTIVES = '''
"""Test plugin: CE made non-finite at one training step (counted from this process's first call)."""
import torch
from ablate import hookimpl
from ablate.training import losses
from ablate.api.components import Objective, ObjectiveResult, Params


class At(Params):
    at: int


class _Faulty(Objective):
    Params = At

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.calls = 0

    def formula(self):
        return "CE, made non-finite at one step (a test fault)"

    def __call__(self, batch):
        ce = losses.cross_entropy(batch.logits, batch.targets)
        step, self.calls = self.calls, self.calls + 1
        return ObjectiveResult(self.damage(ce) if step == self.params.at else ce, {"ce": ce.detach()})


class NanLoss(_Faulty):
    name = "nan_loss"

    def damage(self, ce):
        return ce * float("nan")


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NanGradient(_Faulty):
    name = "nan_grad"

    def damage(self, ce):
        return _NanGradient.apply(ce)


@hookimpl
def ablate_objectives(register):
    register(NanLoss)
    register(NanGradient)
'''
FAULTS = ["--set", 'cells.0.objective={ name = "nan_loss", at = 7 }',
          "--set", 'cells.1.objective={ name = "nan_grad", at = 3 }']


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, micro_stages):
    """One run whose first cell's loss turns NaN at step 7 and second cell's gradient at step 3:
    (directory, exit code, printed output, plugin args)."""
    cwd = demo_dir(tmp_path_factory.mktemp("faults"), micro_stages)
    (cwd / "faulty.py").write_text(FAULTY_OBJECTIVES)
    plugin = ["--plugin", str(cwd / "faulty.py")]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = ablate_in(cwd, mp, "run", *SPEC_ARGS, *FAULTS, *plugin, "--device", "cpu", "--quiet")
    return cwd, code, printed.getvalue(), plugin


@pytest.mark.slow
def test_plan_names_the_failed_cells_a_rerun_skips(faulty_run, monkeypatch):
    cwd, _, _, plugin = faulty_run
    rows = {}
    for flags in ([], ["--retry-failed"]):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert ablate_in(cwd, monkeypatch, "plan", *SPEC_ARGS, *FAULTS, *plugin, *flags) == 0
        rows[bool(flags)] = " ".join(printed.getvalue().split())
    assert rows[False].count("failed in an earlier run") == 2 and "step 7" in rows[False]
    assert "failed in an earlier run" not in rows[True] and rows[True].count("would resume") == 1


@pytest.mark.slow
def test_nonfinite_loss_and_gradient_stop_only_their_cells(faulty_run):
    cwd, code, printed, _ = faulty_run
    assert code == 1 and "Traceback" not in printed
    results = json.loads((cwd / "runs" / "demo" / "results.json").read_text())
    cells = results["cells"]
    assert [c["status"] for c in cells.values()] == ["failed", "failed", "done", "done"]

    nan_loss, nan_grad = cells["router_off_real"], cells["router_off_shuf"]
    assert nan_loss["failed_at_step"] == 7 and nan_loss["checkpoint_step"] == 5
    assert "non-finite loss at step 7" in nan_loss["error"] and "last good checkpoint: step 5" in nan_loss["error"]
    assert nan_grad["failed_at_step"] == 3 and nan_grad["checkpoint_step"] is None
    assert "non-finite gradient at step 3" in nan_grad["error"] and "no checkpoint yet" in nan_grad["error"]

    # the last good checkpoint is kept: finite weights of step 5, no completion marker
    cell_dir = cwd / "runs" / "demo" / "cells"
    state = store.load_tree(cell_dir / "router_off_real" / "state.safetensors")
    assert state["step"] == 5 and all(torch.isfinite(t).all() for t in state["student"].values())
    assert not (cell_dir / "router_off_real" / store.MARKER).exists()
    assert not (cell_dir / "router_off_shuf" / "state.safetensors").exists()

    # the other cells ran and were judged; the summary table names what finished and what failed
    assert all(cells[c]["metrics"].get("val_loss") is not None for c in ("router_on_real", "router_on_shuf"))
    assert {t["cell"] for t in results["thresholds"] if t["value"] is not None} == {"router_on_real", "router_on_shuf"}
    assert "failed" in printed and "done" in printed and "step 7" in printed and "step 3" in printed


@pytest.mark.slow
def test_rerun_resumes_a_failed_cell_from_its_last_good_checkpoint(faulty_run, tmp_path, monkeypatch, capsys):
    """With --retry-failed (a plain rerun skips failed cells). The fault plugin counts steps from its
    own first call, so in a new process the NaN of the first cell falls after its last step (a
    transient fault): that cell resumes from step 5 and finishes; the second cell, without a
    checkpoint, restarts and fails at step 3 again."""
    src, _, _, plugin = faulty_run
    cwd = tmp_path / "rerun"
    shutil.copytree(src, cwd)
    plugin = ["--plugin", str(cwd / "faulty.py")]
    code = ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *FAULTS, *plugin, "--device", "cpu", "--retry-failed")
    printed = capsys.readouterr()
    assert code == 1
    assert "resuming from step 5" in printed.err
    cells = json.loads((cwd / "runs" / "demo" / "results.json").read_text())["cells"]
    assert [c["status"] for c in cells.values()] == ["done", "failed", "done", "done"]
    assert cells["router_off_shuf"]["failed_at_step"] == 3
    assert cells["router_on_real"]["cached"] and cells["router_on_shuf"]["cached"]


@pytest.mark.slow
def test_oracle_sidecar_with_other_rows_than_its_table_is_a_clear_error(faulty_run, tmp_path, monkeypatch, capsys):
    """A cache entry whose checksums match but whose sidecar has one row more than the table
    (written by other code, or altered and re-marked): exit 2 before any cell runs."""
    src, _, _, _ = faulty_run
    cwd = tmp_path / "run"
    cwd.mkdir()
    shutil.copy(DEMO, cwd / "demo.toml")
    shutil.copytree(src / ".ablate-cache", cwd / ".ablate-cache")
    (oracle,) = (cwd / ".ablate-cache").glob("oracle-*")
    sidecar = load_file(oracle / "sidecar.safetensors")
    (name, tensor), = sidecar.items()
    save_file({name: torch.cat([tensor, tensor[:1]])}, oracle / "sidecar.safetensors")
    store.mark_done(oracle, store.marker_inputs(oracle))
    code = ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, "--device", "cpu", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "sidecar" in err and "rows" in err and str(oracle.name) in err.replace("\n", "")
    assert not (cwd / "runs" / "demo" / "cells").exists()


def test_second_writer_is_refused_naming_the_other_process(tmp_path, monkeypatch, capsys):
    """While one process holds a run directory, `ablate run` on it exits 2 naming that process;
    once the holder is killed (SIGKILL, no clean-up) the directory is free again."""
    run_dir = tmp_path / "runs" / "demo"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ablate.pipeline import store; lock = store.RunLock(sys.argv[1]); "
                               "lock.__enter__(); print('locked', flush=True); time.sleep(600)", str(run_dir)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        shutil.copy(DEMO, tmp_path / "demo.toml")
        code = ablate_in(tmp_path, monkeypatch, "run", *SPEC_ARGS, "--device", "cpu", "--quiet")
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert f"pid {holder.pid}" in err and "in use by another" in err.replace("\n", " ")
        assert not (tmp_path / ".ablate-cache").exists()  # refused before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with store.RunLock(run_dir):
        pass


# ------------------------------------------------------------------ diverging stage training


def test_pretraining_reports_the_first_non_finite_step():
    from ablate.errors import DivergedError
    from ablate.training.lm_pretrain import pretrain_lm

    torch.manual_seed(0)
    emb = torch.nn.Embedding(16, 16)
    calls = []

    def forward(x):  # finite until the 38th call, NaN from then on
        calls.append(1)
        return emb(x) * (float("nan") if len(calls) >= 38 else 1.0)

    stream = torch.randint(0, 16, (400,))
    with pytest.raises(DivergedError, match=r"^toy pretraining: .* at step 37 of 60, .*`toy.lr`") as info:
        pretrain_lm(forward, emb.parameters(), stream, stream, steps=60, batch=2, seq_len=8, lr=1e-3, warmup=0,
                    seed=0, device=torch.device("cpu"), name="toy pretraining", lr_key="toy.lr")
    assert len(calls) == 50  # stopped at the next check (every 25 steps), not at the end
    assert info.value.exit_code == 1


def test_diverging_backbone_pretraining_exits_1_and_keeps_the_corpus(tmp_path, monkeypatch, capsys):
    shutil.copy(DEMO, tmp_path / "demo.toml")
    code = ablate_in(tmp_path, monkeypatch, "run", *SPEC_ARGS, "--set", "backbone.pretrain.lr=1e30",
                     "--device", "cpu", "--quiet")
    err = capsys.readouterr().err
    assert code == 1
    assert "backbone pretraining: the training loss became non-finite" in err and "`backbone.pretrain.lr`" in err
    assert "Traceback" not in err
    cache = tmp_path / ".ablate-cache"
    assert [p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith(".")] == ["corpus"]
    assert (next(cache.glob("corpus-*")) / "DONE").is_file()
