"""The cell training loop: exact resume, schedules, cadences, faults and router diagnostics.

Most tests drive a tiny but real trainable module (TinyStudent) with the Student's forward
signature and output fields; one group trains the real ablate Student.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError
import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.model.logits import as_tensor
from ablate.api.components import ObjectiveContext
from ablate.errors import InputError, NumericalFault
from ablate.oracle.hashing import RowContract, canonical_rows
from ablate.training.train import (TrainConfig, WindowSampler, aux_lambda, router_statistics, train_cell)
from ablate_builtins.objectives import CE, KLCE

V, D, N_ROWS = 48, 16, 12


# ------------------------------------------------------------------------ tiny student


@dataclass
class TinyOutput:
    logits: torch.Tensor
    router_logits: torch.Tensor | None = None
    vc: dict[int, torch.Tensor] = field(default_factory=dict)
    qd: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    e: torch.Tensor | None = None
    aligned: torch.Tensor | None = None


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight


class TinyInjection(nn.Module):
    """Soft attention over the table; V-contrast with a global-RNG permutation; Q-diversity."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.W_q = nn.Linear(D, D, bias=False)
        self.W_v = nn.Linear(D, D, bias=False)
        self.gate = nn.Parameter(torch.tensor(0.3))

    def forward(self, h, table, aux, generator):
        attn = torch.softmax(self.W_q(self.norm(h)) @ table.T, dim=-1)  # [B, T, N]
        out = self.W_v(attn @ table)
        vc = qd = None
        if aux:
            perm = torch.randperm(table.shape[0], generator=generator, device=table.device)
            vc = F.cosine_similarity(out, self.W_v(attn @ table[perm]), dim=-1).pow(2).mean()
            f = F.one_hot(attn.argmax(-1), table.shape[0]).float().mean((0, 1))
            qd = table.shape[0] * (f * attn.mean((0, 1))).sum()
        return torch.tanh(self.gate) * out, vc, qd


class TinyRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.W_align = nn.Linear(D, D, bias=False)
        nn.init.zeros_(self.W_align.weight)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(0.1)))

    @property
    def alpha(self):
        return self.log_alpha.exp()


class TinyStudent(nn.Module):
    def __init__(self, router: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = TinyBackbone()
        self.engram_injections = nn.ModuleDict({"1": TinyInjection(), "2": TinyInjection()})
        self.engram_skip_router = TinyRouter() if router else None
        self.register_buffer("table", torch.randn(N_ROWS, D))
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, tokens, aux=False, inject_mult=1.0, generator=None):
        out = TinyOutput(logits=None)
        h = self.backbone.embed(tokens)
        for layer in (1, 2):
            inj, vc, qd = self.engram_injections[str(layer)](h, self.table, aux, generator)
            out.gates[layer] = torch.tanh(self.engram_injections[str(layer)].gate)
            if aux:
                out.vc[layer], out.qd[layer] = vc, qd
            h = torch.tanh(self.backbone.mix(h + inject_mult * inj))
            out.e = inj
        out.logits = h @ self.backbone.lm_head_weight.T
        if self.engram_skip_router is not None:
            out.aligned = self.engram_skip_router.W_align(out.e)
            out.router_logits = self.engram_skip_router.alpha * (
                out.aligned @ self.backbone.lm_head_weight.T)
            out.logits = out.logits + out.router_logits
        return out


# ---------------------------------------------------------------------------- helpers


def streams(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (3000,), generator=gen), torch.randint(0, V, (800,), generator=gen)


def sidecar(seed: int = 1) -> torch.Tensor:
    return 2.0 * torch.randn(N_ROWS, V, generator=torch.Generator().manual_seed(seed))


def ctx() -> ObjectiveContext:
    return ObjectiveContext(vocab_size=V, token_frequencies=torch.ones(V, dtype=torch.float64))


def kl_objective(lam: float = 0.5) -> KLCE:
    return KLCE(KLCE.Params.model_validate({"lambda": lam}), ctx())


def config(**over) -> TrainConfig:
    base = dict(steps=12, batch=2, seq_len=8, lr=3e-2, warmup=3, decay_frac=0.25, eval_every=4,
                eval_batches=3, log_every=3, precision="fp32", aux_warmup=5, row_contract=RowContract(rows=N_ROWS, seed=42),
                qdiv_weight=0.05)
    base.update(over)
    return TrainConfig(**base)


def trainable(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in student.trainable_named_parameters()}


def through_disk(state: dict) -> dict:
    """The state as the engine stores it: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def stop_on_call(n: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return should_stop


TIMING = ("dt_ms", "tokens_per_s")


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# ------------------------------------------------------------------------ determinism


def _run_straight(cfg, saves=None):
    student = TinyStudent()
    train, val = streams()
    out = train_cell(student, kl_objective(), train, val, sidecar(), cfg, "cpu",
                     save_state=(saves.append if saves is not None else None))
    return student, out


@pytest.fixture(scope="module")
def straight():
    """One uninterrupted 12-step run with checkpoints every 5 steps: (student, outcome, saves)."""
    saves: list[dict] = []
    student, out = _run_straight(config(checkpoint_every=5), saves)
    assert not out.stopped_early
    return student, out, saves


def _resume(cfg, state):
    student = TinyStudent()
    with torch.no_grad():  # prove the trainable weights come from the state
        for _, p in student.trainable_named_parameters():
            p.add_(1.0)
    train, val = streams()
    out = train_cell(student, kl_objective(), train, val, sidecar(), cfg, "cpu",
                     resume_state=through_disk(state))
    return student, out


def _assert_same_run(a_student, a_out, b_student, b_out):
    a_params, b_params = trainable(a_student), trainable(b_student)
    assert a_params.keys() == b_params.keys()
    for name in a_params:
        assert torch.equal(a_params[name], b_params[name]), name
    assert a_out.final_val_loss == b_out.final_val_loss
    assert a_out.evals == b_out.evals
    assert without_timing(a_out.history) == without_timing(b_out.history)
    assert b_out.steps_done == a_out.steps_done == 12


# should_stop call n: calls 1–5 are the boundaries of steps 0–4, 6–7 fall between the batches
# of the evaluation at step 4, 17 is the boundary after the last step and 18–19 fall between
# the batches of the final evaluation.
@pytest.mark.parametrize("stop_call", [3, 7, 18], ids=["boundary", "mid-eval", "final-eval"])
def test_stop_and_resume_equals_training_in_one_go(straight, stop_call):
    a_student, a_out, _ = straight
    saved = []
    student = TinyStudent()
    train, val = streams()
    partial = train_cell(student, kl_objective(), train, val, sidecar(), config(), "cpu",
                         should_stop=stop_on_call(stop_call), save_state=saved.append)
    assert partial.stopped_early and partial.final_val_loss is None
    assert len(saved) == 1 and saved[0]["step"] == partial.steps_done < 13

    b_student, b_out = _resume(config(), saved[0])
    _assert_same_run(a_student, a_out, b_student, b_out)


def test_periodic_checkpoint_resumes_exactly(straight):
    a_student, a_out, saves = straight
    assert [s["step"] for s in saves] == [5, 10, 12]
    assert [s["complete"] for s in saves] == [False, False, True]
    assert saves[-1]["evals"] == a_out.evals
    b_student, b_out = _resume(config(checkpoint_every=5), saves[0])
    _assert_same_run(a_student, a_out, b_student, b_out)


def test_resuming_a_finished_state_restores_weights_and_trains_no_further(straight):
    a_student, a_out, saves = straight
    b_student, b_out = _resume(config(), saves[-1])
    assert b_out.final_val_loss == a_out.final_val_loss and b_out.evals == a_out.evals
    assert all(torch.equal(p, q) for p, q in zip(trainable(a_student).values(),
                                                 trainable(b_student).values()))


def test_resume_with_a_different_config_is_refused(straight):
    with pytest.raises(InputError, match="lr"):
        _resume(config(lr=1e-3), straight[2][0])


# ------------------------------------------------------------- schedules and cadences


def test_lr_aux_lambdas_and_logging_cadence_follow_the_formulas():
    cfg = config(steps=23, log_every=5, eval_every=5, warmup=4, decay_frac=0.3, aux_warmup=7,
                 vcontrast_weight=1.0, qdiv_weight=0.02)
    _, out = _run_straight(cfg)
    assert [r["step"] for r in out.history] == [0, 5, 10, 15, 20, 22]
    decay_start = 23 - math.floor(0.3 * 23)  # 17
    for row in out.history:
        s = row["step"]
        mult = s / 4 if s < 4 else (1.0 if s < decay_start else 1 - (s - decay_start) / (23 - decay_start))
        assert row["lr"] == pytest.approx(cfg.lr * mult, rel=1e-12)
        assert row["vcontrast_lambda"] == pytest.approx(min(s, 7) / 7 * 1.0)
        assert row["qdiv_lambda"] == pytest.approx(min(s, 7) / 7 * 0.02)
        # loss = (1−λ)·CE + λ·KL + λ_VC·ΣVC + λ_QD·ΣQD (aux after the blend, §6)
        expected = (0.5 * row["ce"] + 0.5 * row["kl"]
                    + row["vcontrast_lambda"] * (row["vcontrast_L1"] + row["vcontrast_L2"])
                    + row["qdiv_lambda"] * (row["qdiv_L1"] + row["qdiv_L2"]))
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert [e["step"] for e in out.evals] == [0, 5, 10, 15, 20, 23]
    assert out.final_val_loss == out.evals[-1]["val_loss"]


def test_final_eval_runs_once_when_steps_is_an_eval_multiple():
    _, out = _run_straight(config(steps=8, eval_every=4))
    assert [e["step"] for e in out.evals] == [0, 4, 8]


def test_step_zero_uses_lr_zero_so_the_weights_do_not_move():
    student = TinyStudent()
    before = trainable(student)
    train, val = streams()
    train_cell(student, kl_objective(), train, val, sidecar(), config(steps=1, warmup=3), "cpu")
    after = trainable(student)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_log_row_columns_and_callbacks():
    rows, evals, progress = [], [], []
    student = TinyStudent()
    train, val = streams()
    cfg = config()
    out = train_cell(student, kl_objective(), train, val, sidecar(), cfg, "cpu", log=rows.append,
                     on_eval=evals.append, progress=progress.append)
    assert rows == out.history and evals == out.evals
    assert progress == [cfg.batch * cfg.seq_len] * cfg.steps
    assert list(rows[0]) == [
        "step", "loss", "ce", "kl", "vcontrast_L1", "vcontrast_L2", "qdiv_L1", "qdiv_L2",
        "gate_L1", "gate_L2", "alpha", "log_alpha", "w_align_norm", "w_align_grad_norm",
        "router_entropy", "teacher_match_cos", "vcontrast_lambda", "qdiv_lambda", "lr",
        "grad_norm", "dt_ms", "tokens_per_s"]
    first = rows[0]
    assert first["gate_L1"] == pytest.approx(math.tanh(0.3), rel=1e-6)
    assert first["alpha"] == pytest.approx(0.1, rel=1e-6)
    assert first["log_alpha"] == pytest.approx(math.log(0.1), rel=1e-6)
    assert first["w_align_norm"] == 0.0  # zero init, read before the step-0 update
    # W_align moves under Muon once lr > 0; its norm is then logged as nonzero
    assert rows[-1]["w_align_norm"] > 0.0
    assert out.precision == "fp32" and out.notes == []


def test_router_off_logs_no_router_columns():
    student = TinyStudent(router=False)
    train, val = streams()
    out = train_cell(student, CE(CE.Params(), ctx()), train, val, None, config(), "cpu")
    cols = set(out.history[0])
    assert not cols & {"alpha", "log_alpha", "w_align_norm", "router_entropy", "teacher_match_cos"}
    assert {"ce", "gate_L1", "vcontrast_L2", "qdiv_L1"} <= cols


def test_bf16_on_cpu_runs_fp32_and_says_so():
    student = TinyStudent()
    train, val = streams()
    out = train_cell(student, kl_objective(), train, val, sidecar(),
                     config(steps=2, precision="bf16"), "cpu")
    assert out.precision == "fp32" and "bf16" in out.notes[0]


# --------------------------------------------------------------------------- faults


class NanLossAt:
    """Wraps an objective; its k-th call (0-based) returns a NaN loss."""

    def __init__(self, inner, k):
        self.inner, self.k, self.calls = inner, k, 0
        self.name, self.needs_router, self.needs_sidecar = inner.name, True, True

    def __call__(self, batch):
        result = self.inner(batch)
        if self.calls == self.k:
            result.loss = result.loss * float("nan")
        self.calls += 1
        return result


def test_non_finite_loss_raises_with_its_step():
    student = TinyStudent()
    train, val = streams()
    with pytest.raises(NumericalFault) as info:
        train_cell(student, NanLossAt(kl_objective(), 7), train, val, sidecar(),
                   config(name="cellA", log_every=5, eval_every=100), "cpu")
    assert (info.value.cell, info.value.step, info.value.what) == ("cellA", 7, "loss")


def test_non_finite_gradient_raises_before_any_checkpoint():
    student = TinyStudent()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 3 else grad  # the step-2 backward

    student.engram_injections["1"].gate.register_hook(poison)
    saves: list[dict] = []
    train, val = streams()
    with pytest.raises(NumericalFault) as info:
        train_cell(student, kl_objective(), train, val, sidecar(),
                   config(log_every=100, checkpoint_every=4), "cpu", save_state=saves.append)
    assert (info.value.step, info.value.what) == (2, "gradient")
    assert saves == []  # detected at the step-4 checkpoint, before writing it


# ------------------------------------------------------------------ router statistics


def _hand_router_stats(z: torch.Tensor, rows: torch.Tensor, side: torch.Tensor):
    """float64 per-position loops: mean entropy, and mean cos over positions with a row."""
    z, side = z.double().reshape(-1, z.shape[-1]), side.double()
    rows = rows.reshape(-1)
    entropies, cosines = [], []
    for i in range(z.shape[0]):
        p = torch.exp(z[i] - torch.logsumexp(z[i], 0))
        entropies.append(float(-(p * torch.log(p)).sum()))
        if rows[i] >= 0:
            t = torch.exp(side[rows[i]] - torch.logsumexp(side[rows[i]], 0))
            cosines.append(float((p @ t) / (p.norm() * t.norm())))
    return sum(entropies) / len(entropies), sum(cosines) / len(cosines)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_router_statistics_match_float64_hand_computation(chunk):
    gen = torch.Generator().manual_seed(5)
    z = 3.0 * torch.randn(3, 7, V, generator=gen)
    rows = torch.randint(-1, N_ROWS, (3, 7), generator=gen)
    side = sidecar()
    stats = router_statistics(z, rows, side, chunk=chunk)
    entropy, cos = _hand_router_stats(z, rows, side)
    assert stats["router_entropy"].item() == pytest.approx(entropy, rel=1e-5)
    assert stats["teacher_match_cos"].item() == pytest.approx(cos, rel=1e-5)
    assert math.isnan(router_statistics(z, torch.full((3, 7), -1), side)["teacher_match_cos"])


def test_logged_router_statistics_match_a_hand_computation_of_the_first_batch():
    cfg = config(steps=1)
    train, val = streams()
    student = TinyStudent()
    out = train_cell(student, kl_objective(), train, val, sidecar(), cfg, "cpu")
    row = out.history[0]

    fresh = TinyStudent()  # the step-0 weights
    inputs, _ = WindowSampler(train, cfg.batch, cfg.seq_len, cfg.data_seed)()
    with torch.no_grad():
        z_r = fresh(inputs, aux=False).router_logits
    # at step 0 W_align = 0: z_r = 0, P_r uniform, entropy ln V
    entropy, cos = _hand_router_stats(z_r, canonical_rows(inputs, N_ROWS, cfg.row_contract.seed), sidecar())
    assert entropy == pytest.approx(math.log(V))
    assert row["router_entropy"] == pytest.approx(entropy, rel=1e-6)
    assert row["teacher_match_cos"] == pytest.approx(cos, rel=1e-5)


# ---------------------------------------------------------------------------- sampler


def test_window_sampler_draws_consecutive_windows_over_every_start():
    stream = torch.arange(13)
    sampler = WindowSampler(stream, batch=64, seq_len=10, seed=0)
    starts = set()
    for _ in range(4):
        inputs, targets = sampler()
        assert inputs.shape == targets.shape == (64, 10)
        assert torch.equal(inputs - inputs[:, :1], torch.arange(10).expand(64, 10))
        assert torch.equal(targets, inputs + 1)
        starts |= set(inputs[:, 0].tolist())
    assert starts == {0, 1, 2}


def test_window_sampler_state_continues_the_stream():
    stream = torch.arange(500)
    a = WindowSampler(stream, 3, 16, seed=9)
    a()
    state = a.state_dict()
    expected = [a()[0] for _ in range(3)]
    b = WindowSampler(stream, 3, 16, seed=123)
    b.load_state_dict(state)
    assert all(torch.equal(x, b()[0]) for x in expected)


def test_window_sampler_rejects_a_short_stream():
    with pytest.raises(InputError, match=r"(?s)\b10 tokens.*\b12\b"):
        WindowSampler(torch.arange(10), 2, 11, seed=0)


def test_aux_lambda_ramp():
    assert [aux_lambda(s, 0.01, 200) for s in (0, 50, 199, 200, 5000)] == pytest.approx(
        [0.0, 0.0025, 0.00995, 0.01, 0.01])
    assert aux_lambda(0, 1.0, 0) == 1.0


def test_invalid_inputs_are_refused():
    train, val = streams()
    with pytest.raises(ValidationError, match="log_every"):  # TrainSpec's rules: the spec's and the loop's
        config(log_every=0)
    with pytest.raises(InputError, match="sidecar"):
        train_cell(TinyStudent(), kl_objective(), train, val, None, config(), "cpu")
    with pytest.raises(InputError, match="router"):
        train_cell(TinyStudent(router=False), kl_objective(), train, val, sidecar(), config(), "cpu")
    with pytest.raises(InputError, match="rows=7"):
        train_cell(TinyStudent(), kl_objective(), train, val, sidecar(), config(row_contract=RowContract(rows=7, seed=42)),
                   "cpu")


# ------------------------------------------------------------------- the real Student


def _real_student(router: bool = True):
    from ablate.model.backbone import Backbone, BackboneConfig
    from ablate.model.student import EngramConfig, Student

    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(vocab_size=V, hidden_dim=32, num_layers=4,
                                       num_query_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=48,
                                       max_seq_len=16, layers_per_block=2))
    student = Student(backbone, EngramConfig(inject_layers=(1, 2), engram_dim=8, num_heads=4,
                                             top_k=4, router=router), torch.randn(N_ROWS, 8))
    student.freeze_backbone()
    return student


def test_real_student_trains_with_the_kl_objective_and_resumes_exactly():
    cfg = config(steps=8, eval_every=3, eval_batches=2, log_every=2, seq_len=12)
    train, val = streams()

    student = _real_student()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    start = trainable(student)
    out = train_cell(student, kl_objective(), train, val, sidecar(), cfg, "cpu")
    assert math.isfinite(out.final_val_loss) and [e["step"] for e in out.evals] == [0, 3, 6, 8]
    row = out.history[-1]
    assert {"ce", "kl", "gate_L1", "gate_L2", "vcontrast_L2", "qdiv_L1", "alpha",
            "w_align_norm", "router_entropy", "teacher_match_cos"} <= set(row)
    assert all(math.isfinite(v) for r in out.history for v in r.values())
    after = trainable(student)
    assert any(not torch.equal(start[n], after[n]) for n in start)
    assert all(torch.equal(p, dict(student.named_parameters())[n]) for n, p in frozen.items())

    saved: list[dict] = []
    half = _real_student()
    train_cell(half, kl_objective(), train, val, sidecar(), cfg, "cpu",
               should_stop=stop_on_call(7), save_state=saved.append)
    resumed = _real_student()
    b_out = train_cell(resumed, kl_objective(), train, val, sidecar(), cfg, "cpu",
                       resume_state=through_disk(saved[0]))
    assert saved[0]["step"] == 4
    assert all(torch.equal(after[n], p) for n, p in trainable(resumed).items())
    assert b_out.final_val_loss == out.final_val_loss


def test_step_zero_evaluation_is_the_untrained_backbone_on_the_final_windows():
    """Step 0 = the frozen backbone's CE (gates closed, router zero) on the windows the final
    evaluation reads (here the second draw: the periodic evaluation at step 2 reads the first),
    so "before training" and "final" compare like with like."""
    cfg = config(steps=4, eval_every=2, eval_batches=2, seq_len=12)
    train, val = streams()
    student = _real_student()

    def ce64(logits_of, draws):
        losses = [F.cross_entropy(logits_of(x).double().flatten(0, 1), y.flatten()) for x, y in draws]
        return float(sum(losses) / len(losses))

    sampler = WindowSampler(val, cfg.batch, cfg.seq_len, cfg.val_seed, "cpu")
    for _ in range(2):
        sampler()  # the first draw: the windows of the periodic evaluation at step 2
    second = [sampler() for _ in range(2)]
    backbone = student.backbone
    with torch.no_grad():
        untrained = ce64(lambda x: backbone.logits(backbone(x)), second)
    out = train_cell(student, kl_objective(), train, val, sidecar(), cfg, "cpu")
    assert [e["step"] for e in out.evals] == [0, 2, 4]
    assert out.evals[0]["val_loss"] == pytest.approx(untrained, rel=1e-5)
    student.eval()
    with torch.no_grad():
        trained = ce64(lambda x: as_tensor(student(x, aux=False).logits), second)
    assert out.final_val_loss == pytest.approx(trained, rel=1e-5)


def test_a_forked_sampler_draws_ahead_and_leaves_the_original_alone():
    _, val = streams()
    reference = WindowSampler(val, 3, 8, seed=11)
    draws = [reference.draw() for _ in range(4)]
    a = WindowSampler(val, 3, 8, seed=11)
    fork = a.fork(skip_draws=2)
    assert torch.equal(fork.draw(), draws[2]) and torch.equal(fork.draw(), draws[3])
    assert torch.equal(a.draw(), draws[0])  # the original is untouched
