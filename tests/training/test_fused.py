"""Fused cells (ablate.model.fused, ablate.training.fused): a group of cells trained together, one
forward and one backward per step, gives every cell the numbers of its separate run (CPU fp32),
resumes exactly, and a non-finite loss in one cell fails only that cell."""

from __future__ import annotations

import math

import pytest
import torch

from ablate.api.components import ObjectiveContext
from ablate.errors import NumericalFault
from ablate.model.logits import as_tensor
from ablate.oracle.hashing import RowContract
from ablate.training.fused import Member, rng_state, train_fused
from ablate.training.train import TrainConfig, train_cell
from ablate_builtins.objectives import CE, KLCE

pytestmark = pytest.mark.seconds(25)  # on one core, the demo pipelines from micro_stages (tests/conftest.py: longest files first)

V, N_ROWS = 48, 12


def streams():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (3000,), generator=gen), torch.randint(0, V, (800,), generator=gen)


def ctx() -> ObjectiveContext:
    return ObjectiveContext(vocab_size=V, token_frequencies=torch.ones(V, dtype=torch.float64))


def sidecar() -> torch.Tensor:
    return 2.0 * torch.randn(N_ROWS, V, generator=torch.Generator().manual_seed(1))


def config(name: str, **over) -> TrainConfig:
    base = dict(steps=10, batch=2, seq_len=12, lr=3e-2, warmup=3, decay_frac=0.25, eval_every=4,
                eval_batches=2, log_every=3, precision="fp32", aux_warmup=5, qdiv_weight=0.05,
                row_contract=RowContract(rows=N_ROWS, seed=42), checkpoint_every=0, name=name)
    base.update(over)
    return TrainConfig(**base)


# (name, router, table seed, objective): the demo's four cells in miniature
CELLS = [("off_real", False, 0, "ce"), ("off_shuf", False, 1, "ce"),
         ("on_real", True, 0, "kl_ce"), ("on_shuf", True, 1, "kl_ce")]


def build(router: bool, table_seed: int, model_seed: int = 42):
    from ablate.model.backbone import Backbone, BackboneConfig
    from ablate.model.student import EngramConfig, Student

    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(vocab_size=V, hidden_dim=32, num_layers=4, num_query_heads=4,
                                       num_kv_heads=2, head_dim=8, ffn_dim=48, max_seq_len=16,
                                       layers_per_block=2))
    table = torch.randn(N_ROWS, 8, generator=torch.Generator().manual_seed(table_seed))
    torch.manual_seed(model_seed)  # as cells.build_student: the adapters' init, then training, draw from here
    student = Student(backbone, EngramConfig(inject_layers=(1, 3), engram_dim=8, num_heads=4, top_k=4,
                                             router=router), table)
    student.freeze_backbone()
    return student


def objective(kind: str, nan_at: int | None = None):
    obj = CE(CE.Params(), ctx()) if kind == "ce" else KLCE(KLCE.Params.model_validate({"lambda": 0.5}), ctx())
    if nan_at is None:
        return obj
    calls = {"n": 0}
    original = obj.__call__

    class Poisoned(type(obj)):
        def __call__(self, batch):
            result = original(batch)
            calls["n"] += 1
            if calls["n"] == nan_at + 1:
                result.loss = result.loss * float("nan")
            return result

    obj.__class__ = Poisoned
    return obj


def separate(name, router, seed, kind, cfg_over=None, **kw):
    train, val = streams()
    student = build(router, seed)
    out = train_cell(student, objective(kind), train, val, sidecar() if kind != "ce" else None,
                     config(name, **(cfg_over or {})), "cpu", **kw)
    return out, student


def members(cfg_over=None, poison: dict | None = None, **kw) -> list[Member]:
    train, val = streams()
    group = []
    for name, router, seed, kind in CELLS:
        student = build(router, seed)
        group.append(Member(student, objective(kind, (poison or {}).get(name)), train, val,
                            sidecar() if kind != "ce" else None, config(name, **(cfg_over or {})),
                            rng_state(torch.device("cpu")), **kw.get(name, {})))
    return group


TIMING = ("dt_ms", "tokens_per_s")


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_close_rows(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            x, y = ra[k], rb[k]
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= rel * max(abs(x), abs(y), 1e-30), (k, x, y)


def test_one_fused_forward_gives_every_member_its_own_outputs_and_gradients_bitwise():
    """Four members (router off and on, two tables, perturbed adapters): the fused forward's logits,
    router logits, aux losses and gates, and the gradients of a loss on them, equal each member's
    separate forward's exactly (CPU fp32; the permutations drawn from the same seeds)."""
    from ablate.model.fused import fused_forward

    students = [build(router, seed) for _, router, seed, _ in CELLS]
    for c, student in enumerate(students):
        student.backbone = students[0].backbone
        gen = torch.Generator().manual_seed(c)
        with torch.no_grad():
            for _, p in student.trainable_named_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))

    def loss(out):
        router = 0 if out.router_logits is None else as_tensor(out.router_logits).pow(2).mean()
        return as_tensor(out.logits).log_softmax(-1).mean() + router + sum(out.vc.values()) + sum(out.qd.values())

    def grads(student):
        return {n: p.grad.clone() for n, p in student.trainable_named_parameters()}

    alone = []
    for c, student in enumerate(students):
        torch.manual_seed(100 + c)
        out = student(tokens, aux=True)
        loss(out).backward()
        alone.append((out, grads(student)))
        student.zero_grad()
    perms = []
    for c, student in enumerate(students):
        torch.manual_seed(100 + c)
        perms.append({i: torch.randperm(N_ROWS) for i in (1, 3)})
    outs = fused_forward(students, tokens, perms)
    sum(loss(out) for out in outs).backward()
    for student, out, (ref, ref_grads) in zip(students, outs, alone):
        assert torch.equal(as_tensor(out.logits), as_tensor(ref.logits))
        assert (out.router_logits is None) == (ref.router_logits is None)
        assert ref.router_logits is None or torch.equal(as_tensor(out.router_logits), as_tensor(ref.router_logits))
        for name in ("vc", "qd", "gates"):
            assert getattr(out, name).keys() == getattr(ref, name).keys() == {1, 3}
            assert all(torch.equal(getattr(out, name)[i], getattr(ref, name)[i]) for i in (1, 3))
        fused_grads = grads(student)
        assert fused_grads.keys() == ref_grads.keys()
        assert all(torch.equal(fused_grads[n], ref_grads[n]) for n in ref_grads), student.cfg.router


def test_fused_cells_equal_separate_runs():
    group = train_fused(members(), "cpu")
    for m, (name, router, seed, kind) in zip(group, CELLS):
        out, student = separate(name, router, seed, kind)
        assert m.error is None and not m.outcome.stopped_early
        assert_close_rows(untimed(m.outcome.history), untimed(out.history))
        assert_close_rows(m.outcome.evals, out.evals)
        assert m.outcome.final_val_loss == pytest.approx(out.final_val_loss, rel=1e-6)
        fused_params = dict(m.student.trainable_named_parameters())
        for n, p in student.trainable_named_parameters():
            torch.testing.assert_close(fused_params[n], p, rtol=1e-6, atol=1e-7)


def test_a_resumed_fused_group_equals_an_uninterrupted_one():
    whole = train_fused(members(), "cpu")
    calls = {"n": 0}

    def stop_at_7():  # polled at step boundaries and between evaluation batches
        calls["n"] += 1
        return calls["n"] == 7

    saved: dict[str, dict] = {}
    kw = {name: {"save_state": lambda s, name=name: saved.__setitem__(name, s)} for name, *_ in CELLS}
    half = train_fused(members(cfg_over={"checkpoint_every": 4}, **kw), "cpu", should_stop=stop_at_7)
    assert all(m.outcome.stopped_early for m in half)
    steps = {s["step"] for s in saved.values()}
    assert len(steps) == 1 and 0 < steps.pop() < 10 and set(saved) == {name for name, *_ in CELLS}
    resumed = members(cfg_over={"checkpoint_every": 4})
    for m in resumed:
        m.resume_state = saved[m.cfg.name]
    resumed = train_fused(resumed, "cpu")
    for a, b in zip(whole, resumed):
        assert untimed(a.outcome.history) == untimed(b.outcome.history)
        assert a.outcome.evals == b.outcome.evals
        pa = dict(a.student.trainable_named_parameters())
        assert all(torch.equal(pa[n], p) for n, p in b.student.trainable_named_parameters())


def test_a_nan_in_one_cell_fails_only_that_cell():
    group = train_fused(members(poison={"on_real": 5}), "cpu")
    failed = {m.cfg.name: m for m in group if m.error is not None}
    assert set(failed) == {"on_real"}
    assert isinstance(failed["on_real"].error, NumericalFault) and failed["on_real"].error.step == 5
    for m, (name, router, seed, kind) in zip(group, CELLS):
        if name == "on_real":
            continue
        out, _ = separate(name, router, seed, kind)
        assert_close_rows(untimed(m.outcome.history), untimed(out.history))
        assert_close_rows(m.outcome.evals, out.evals)


# ------------------------------------------------------------------------ the whole pipeline


def _demo_run(stages, tmp_path, monkeypatch, name: str, *sets: str) -> dict:
    """The micro demo (4 cells, 10 steps) from the session's cached stages (conftest.micro_stages)."""
    import json

    from cli_run import MICRO_DEMO, ablate_in, demo_dir

    cwd = demo_dir(tmp_path / name, stages)
    args = ["run", *MICRO_DEMO, "--set", "train.steps=10", "--set", "train.eval_every=4", "--device", "cpu", "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert ablate_in(cwd, monkeypatch, *args) == 0
    return json.loads((cwd / "runs" / "demo" / "results.json").read_text()), cwd


@pytest.mark.slow
def test_demo_fused_equals_demo_unfused(micro_stages, tmp_path, monkeypatch):
    """The demo's tiny profile (4 cells on one backbone, oracle and data seed) with train.fuse =
    "on" and "off": every logged number, evaluation and metric equal (≤ 1e-6 relative); the
    fused run records its group per cell."""
    import csv
    import json

    fused, fused_dir = _demo_run(micro_stages, tmp_path, monkeypatch, "fused", "train.fuse=on")
    plain, plain_dir = _demo_run(micro_stages, tmp_path, monkeypatch, "plain", "train.fuse=off")
    names = list(plain["cells"])
    assert len(names) == 4
    for name in names:
        a, b = fused["cells"][name], plain["cells"][name]
        assert a["status"] == b["status"] == "done"
        assert a["fused"] == names and b["fused"] is None
        assert_close_rows(untimed(a["history"]), untimed(b["history"]))
        assert_close_rows(a["evals"], b["evals"])
        assert_close_rows([a["metrics"]], [b["metrics"]])
        for d in (fused_dir, plain_dir):
            assert json.loads((d / "runs" / "demo" / "cells" / name / "outcome.json").read_text())["steps"] == 10
        read = lambda d: [{k: float(v) for k, v in r.items() if v != ""}  # noqa: E731
                          for r in csv.DictReader(open(d / "runs" / "demo" / "cells" / name / "metrics.csv"))]
        assert_close_rows(untimed(read(fused_dir)), untimed(read(plain_dir)))
    assert fused["thresholds"] == plain["thresholds"]


@pytest.mark.slow
def test_a_fused_group_killed_mid_training_resumes_to_the_uninterrupted_results(micro_stages, tmp_path, monkeypatch,
                                                                                capsys):
    """SIGKILL while the demo's fused group trains (every cell has a checkpoint), then `ablate run`
    again: every cell resumes from its checkpoint and the results equal an uninterrupted run's."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from cli_run import MICRO_DEMO, ablate_in, demo_dir

    exe = shutil.which("ablate") or str(Path(sys.executable).with_name("ablate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [exe, "run", *MICRO_DEMO, "--set", "train.steps=10", "--set", "train.checkpoint_every=5",
            "--set", "train.fuse=on", "--device", "cpu"]
    dirs = {d: demo_dir(tmp_path / d, micro_stages) for d in ("straight", "killed")}
    assert ablate_in(dirs["straight"], monkeypatch, *args[1:], "--quiet") == 0  # in this process: no start-up
    cwd = dirs["killed"]
    proc = subprocess.Popen([*args, "--quiet"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    cells = cwd / "runs" / "demo" / "cells"
    end = time.monotonic() + 600
    while len(list(cells.glob("*/state.safetensors"))) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the kill point was never reached"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not list(cells.glob("*/DONE"))
    capsys.readouterr()
    assert ablate_in(cwd, monkeypatch, *args[1:]) == 0
    assert capsys.readouterr().err.count("resuming from step") == 4
    a, b = (json.loads((d / "runs" / "demo" / "results.json").read_text()) for d in (dirs["straight"], cwd))
    for name, cell in a["cells"].items():
        other = b["cells"][name]
        assert other["fused"] == cell["fused"] == list(a["cells"])
        assert untimed(other["history"]) == untimed(cell["history"]) and other["evals"] == cell["evals"]
        assert other["metrics"] == cell["metrics"]
    assert not list(cells.glob("*/state.safetensors"))


def test_members_whose_backbones_differ_are_refused_with_the_fix():
    """A group shares one backbone module: members built on other weights are refused before any
    step, naming the cells and train.fuse = "off"."""
    from ablate.errors import InputError

    group = members()
    with torch.no_grad():
        group[2].student.backbone.final_norm.weight.add_(1e-3)
    with pytest.raises(InputError, match="'off_real' and 'on_real'.*backbones.*train.fuse = \"off\""):
        train_fused(group, "cpu")
