"""Every fast path of the cell step against the plain path it replaces, on the CPU.

- engram attention with ⟨Q, K⟩ and Σ attn·V as broadcast products vs the einsum (batched
  matrix product) formulation of reference §2.3, values and gradients;
- Q-diversity's index_add counts vs a bincount, in float64;
- the router scale folded into W_align(e) vs α·(W_align(e)·Eᵀ), values and gradients;
- the loss functions' gradient-in-forward vs float64 autograd of the plain formulas;
- torch.compile'd graphs (traced with the aot_eager backend: no code generation on the CPU)
  vs eager, for the student, the loss chunks and whole training steps;
- no host-synchronising op in a training step that does not log.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ablate.model.logits import as_tensor
from ablate.training import fastpath

from ablate.training import losses
from ablate.api.components import ObjectiveContext
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.engram import EngramCrossAttention, GatedEngramInjection, q_diversity, v_contrast
from ablate.model.student import EngramConfig, Student
from ablate.oracle.hashing import RowContract
from ablate.training.train import CellRun, TrainConfig
from ablate_builtins.objectives import KLCE

SETTINGS = settings(max_examples=25, deadline=None)
V, N_ROWS = 64, 23


# -------------------------------------------------------------------------------- engram


def plain_attend(xa: EngramCrossAttention, h, rows, sims):
    """Reference §2.3 as written, with einsums for ⟨Q, K⟩ and Σ attn·V."""
    B, T, _ = h.shape
    H, D, k = xa.num_heads, xa.head_dim, rows.shape[2]
    R = xa.row_norm(rows)
    q = xa.q_norm(xa.W_q(h).view(B, T, H, D))
    key = xa.k_norm(xa.W_k(R).view(B, T, k, H, D))
    value = xa.W_v(R).view(B, T, k, H, D)
    scores = torch.einsum("bthd,btjhd->bthj", q, key) / math.sqrt(D)
    attn = (scores + xa.retrieval_bias * sims.unsqueeze(2)).softmax(dim=-1)
    mixed = torch.einsum("bthj,btjhd->bthd", attn, value)
    return xa.W_o(mixed.reshape(B, T, H * D)), attn


def engram_objective(out, attn, vc):
    return (out ** 2).sum() + (attn ** 3).sum() + vc


@SETTINGS
@given(st.integers(0, 10_000), st.integers(2, 6), st.floats(0.0, 2.0))
def test_engram_attention_broadcast_products_equal_einsum_formulation(seed, top_k, bias):
    torch.manual_seed(seed)
    inj = GatedEngramInjection(EngramCrossAttention(16, 8, 4, top_k, bias), gate_init=0.3).double()
    xa = inj.xattn
    with torch.no_grad():
        for p in (xa.row_norm.weight, xa.row_norm.bias, xa.q_norm.weight, xa.k_norm.weight):
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    table = torch.randn(13, 8, generator=g, dtype=torch.float64)

    fast = xa(h, table, vcontrast=True, generator=torch.Generator().manual_seed(1))
    engram_objective(fast.out, fast.attn, fast.vc).backward()
    fast_grads = {n: p.grad.clone() for n, p in xa.named_parameters()}
    xa.zero_grad()

    indices, sims = xa.retrieve(h, table)
    out, attn = plain_attend(xa, h, table[indices], sims)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(1))
    swapped, _ = plain_attend(xa, h, table[perm[indices]], sims)
    vc = v_contrast(out, swapped)  # unchanged by the fast path (float32 cosine)
    engram_objective(out, attn, vc).backward()

    torch.testing.assert_close(fast.out, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.attn, attn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.vc, vc, rtol=1e-10, atol=1e-12)
    for name, p in xa.named_parameters():
        torch.testing.assert_close(fast_grads[name], p.grad, rtol=1e-9, atol=1e-11, msg=name)


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 5))
def test_q_diversity_counts_equal_a_float64_bincount(seed, num_rows, top_k):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, num_rows, (2, 7, top_k), generator=g)
    attn = torch.rand(2, 7, 3, top_k, generator=g)
    f = torch.bincount(indices.reshape(-1), minlength=num_rows).double() / indices.numel()
    P = torch.zeros(num_rows, dtype=torch.float64).index_add(
        0, indices.reshape(-1), attn.double().sum(2).reshape(-1)) / (2 * 7 * 3)
    expected = num_rows * (f * P).sum()
    assert q_diversity(indices, attn, num_rows).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------- student


SMALL = dict(vocab_size=V, hidden_dim=32, num_layers=6, num_query_heads=4, num_kv_heads=2,
             head_dim=8, ffn_dim=48, max_seq_len=32, layers_per_block=2)


def small_student(router: bool = True, seed: int = 0, dtype=torch.float32) -> Student:
    torch.manual_seed(seed)
    student = Student(Backbone(BackboneConfig(**SMALL)),
                      EngramConfig(inject_layers=(1, 3), engram_dim=8, num_heads=4, top_k=3,
                                   router=router), torch.randn(N_ROWS, 8))
    student.freeze_backbone()
    with torch.no_grad():  # open gates and a non-zero router, so every path carries gradient
        for inj in student.engram_injections.values():
            inj.gate.fill_(0.5)
        if router:
            student.engram_skip_router.W_align.weight.copy_(0.1 * torch.randn(32, 32))
    return student.to(dtype)


def tokens(seed: int = 0, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_router_scale_folded_into_aligned_equals_scaling_the_logits():
    student = small_student(dtype=torch.float64)
    router, E = student.engram_skip_router, student.backbone.lm_head_weight
    out = student(tokens(), trace=True)
    z_r = as_tensor(out.router_logits)
    plain = router.alpha * (out.aligned @ E.T)
    torch.testing.assert_close(z_r, plain, rtol=1e-12, atol=1e-12)
    weights = torch.randn(z_r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fast_grads = torch.autograd.grad((z_r * weights).sum(),
                                     [router.log_alpha, router.W_align.weight], retain_graph=True)
    plain_grads = torch.autograd.grad((plain * weights).sum(), [router.log_alpha, router.W_align.weight])
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- losses


def plain_kl_ce(logits, router_logits, targets, sidecar, rows, lam):
    """The naive float64 objective: full-vocabulary log-softmaxes of whole tensors."""
    ce = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    log_r = torch.log_softmax(router_logits.double(), -1)
    log_t = torch.log_softmax(sidecar.double()[rows.clamp(min=0)], -1)
    kl = (log_r.exp() * (log_r - log_t)).sum(-1)
    mask = (rows >= 0).double()
    return (1 - lam) * ce + lam * (kl * mask).sum() / mask.sum().clamp(min=1)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_kl_ce_gradient_in_forward_equals_plain_autograd(dtype, rtol):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 9, V, generator=g)).to(dtype).requires_grad_()
    router_logits = (2 * torch.randn(2, 9, V, generator=g)).to(dtype).requires_grad_()
    sidecar = 3 * torch.randn(N_ROWS, V, generator=g)
    targets = torch.randint(0, V, (2, 9), generator=g)
    rows = torch.randint(-1, N_ROWS, (2, 9), generator=g)
    objective = KLCE(KLCE.Params.model_validate({"lambda": 0.3}),
                     ObjectiveContext(V, torch.ones(V, dtype=torch.float64)))
    from ablate.api.components import ObjectiveBatch

    result = objective(ObjectiveBatch(logits=logits, targets=targets, tokens=targets,
                                      router_logits=router_logits, teacher_rows=rows, sidecar=sidecar))
    (2.5 * result.loss).backward()
    z, zr = logits.detach().double().requires_grad_(), router_logits.detach().double().requires_grad_()
    expected = plain_kl_ce(z, zr, targets, sidecar, rows, 0.3)
    (2.5 * expected).backward()
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad.double(), z.grad, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(router_logits.grad.double(), zr.grad, rtol=rtol, atol=rtol * 1e-2)


def test_losses_without_gradient_keep_nothing_and_give_the_same_value():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, V, generator=g)
    sidecar, rows = torch.randn(N_ROWS, V, generator=g), torch.randint(-1, N_ROWS, (3, 5), generator=g)
    with_grad, _ = losses.kl_rows(z.clone().requires_grad_(), sidecar, rows, chunk=4)
    plain, _ = losses.kl_rows(z, sidecar, rows, chunk=4)
    assert plain.grad_fn is None and plain.item() == with_grad.item()
    ce = losses.cross_entropy(z, rows.clamp(min=0), chunk=4)
    assert ce.item() == pytest.approx(F.cross_entropy(z.flatten(0, 1), rows.clamp(min=0).flatten()).item(),
                                      rel=1e-6)


# ------------------------------------------------------------------- compiled vs eager


@pytest.fixture
def compile_on_cpu(monkeypatch):
    """Make ablate.training.fastpath compile on the CPU, tracing with aot_eager (no code generation)."""
    monkeypatch.setattr(fastpath, "BACKEND", "aot_eager")
    monkeypatch.setattr(fastpath, "enabled_for", lambda device: True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def student_loss(out):
    return (as_tensor(out.logits).float().logsumexp(-1).mean() + as_tensor(out.logits).float()[..., 3].mean()
            + sum(out.vc.values()) + sum(out.qd.values()))


def test_compiled_student_equals_eager(compile_on_cpu):
    eager, compiled = small_student(), small_student()
    compiled.compile_hot_paths()
    compiled.compile_hot_paths()  # idempotent
    x = tokens()
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(3)
        out = model(x, aux=True)
        student_loss(out).backward()
        outs.append(out)
    torch.testing.assert_close(as_tensor(outs[1].logits), as_tensor(outs[0].logits), rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(eager.trainable_named_parameters(), compiled.trainable_named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the inference graph too
        torch.testing.assert_close(as_tensor(compiled(x).logits), as_tensor(eager(x).logits), rtol=1e-5, atol=1e-5)


def test_compiled_loss_chunks_equal_eager(compile_on_cpu):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 6, V, generator=g)
    sidecar, rows = torch.randn(N_ROWS, V, generator=g), torch.randint(-1, N_ROWS, (2, 6), generator=g)
    targets = rows.clamp(min=0)
    results = []
    for compiled in (False, True):
        fastpath.enabled_for = (lambda device: True) if compiled else (lambda device: False)
        zc = z.clone().requires_grad_()
        total, _ = losses.kl_rows(zc, sidecar, rows, chunk=5)
        ce = losses.cross_entropy(zc, targets, chunk=5)
        (total + ce).backward()
        results.append((total.item(), ce.item(), zc.grad))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-7)


def test_compiled_hashing_equals_eager(compile_on_cpu):
    from ablate.oracle.hashing import canonical_rows
    from ablate.training.train import compiled_canonical_rows

    tokens = torch.randint(0, 2**31, (3, 40), generator=torch.Generator().manual_seed(6))
    assert torch.equal(compiled_canonical_rows(tokens, 10_007, 42), canonical_rows(tokens, 10_007, 42))


def cell_run(student, steps: int = 3, compile: bool = True) -> CellRun:
    g = torch.Generator().manual_seed(5)
    train, val = torch.randint(0, V, (2000,), generator=g), torch.randint(0, V, (500,), generator=g)
    cfg = TrainConfig(steps=steps, batch=2, seq_len=16, warmup=1, aux_warmup=1, log_every=1,
                      precision="fp32", row_contract=RowContract(rows=N_ROWS, seed=42), lr=1e-2, compile=compile)
    objective = KLCE(KLCE.Params.model_validate({"lambda": 0.5}),
                     ObjectiveContext(V, torch.ones(V, dtype=torch.float64)))
    return CellRun(student, objective, train, val, 2 * torch.randn(N_ROWS, V, generator=g), cfg, "cpu")


def test_compiled_training_steps_equal_eager(monkeypatch):
    run = cell_run(small_student())
    eager_rows = []
    torch.manual_seed(7)
    for s in range(3):
        eager_rows.append(run.advance(s))
    monkeypatch.setattr(fastpath, "BACKEND", "aot_eager")
    monkeypatch.setattr(fastpath, "enabled_for", lambda device: True)
    torch._dynamo.reset()
    run = cell_run(small_student())
    assert run.student._compiled
    torch.manual_seed(7)
    compiled_rows = [run.advance(s) for s in range(3)]
    torch._dynamo.reset()
    for a, b in zip(eager_rows, compiled_rows):
        for key in ("loss", "ce", "kl", "grad_norm", "alpha", "router_entropy", "vcontrast_L3", "qdiv_L1"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_compile_off_keeps_the_cell_eager_where_compilation_is_enabled(monkeypatch):
    monkeypatch.setattr(fastpath, "enabled_for", lambda device: True)
    student = small_student()
    run = cell_run(student, compile=False)
    assert not run.compiled and not getattr(student, "_compiled", False)


def test_auto_compiles_only_runs_long_enough_to_repay_it():
    import tomllib
    from pathlib import Path

    from ablate.training.cells import COMPILE_MIN_STEPS, cell_key, compile_cells
    from ablate.api.plugins import load_registry
    from ablate.config.spec import spec_from_dict

    registry = load_registry()
    raw = tomllib.loads((Path(__file__).resolve().parents[2] / "specs" / "demo.toml").read_text())
    n_cells = len(raw["cells"])

    def spec(steps, mode):
        return spec_from_dict(raw, overrides=[f"train.steps={steps}", f"train.compile={mode}"], registry=registry)

    just_enough = -(-COMPILE_MIN_STEPS // n_cells)
    assert compile_cells(spec(just_enough, "auto")) and not compile_cells(spec(just_enough - 1, "auto"))
    assert compile_cells(spec(1, "on")) and not compile_cells(spec(10**6, "off"))
    # the same math either way: the choice does not change a cell's key (its cache and resume state)
    keys = {mode: cell_key(spec(50, mode), spec(50, mode).cells[2], {"backbone": "b", "oracle": "o"},
                           registry.get("objective", "kl_ce")) for mode in ("on", "off", "auto")}
    assert len(set(keys.values())) == 1


# ------------------------------------------------------------------------- host syncs


class _SyncingOps(TorchDispatchMode):
    """Records ops that make the host wait for the device when their input is on CUDA, except
    reads of `host_tensors` (tensors that stay on the host on CUDA too)."""

    SYNCING = {"_local_scalar_dense", "bincount", "nonzero", "unique", "_unique2", "masked_select",
               "repeat_interleave", "item", "equal", "is_nonzero"}

    def __init__(self, host_tensors):
        super().__init__()
        self.host_ids = {id(t) for t in host_tensors}
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING and not (args and id(args[0]) in self.host_ids):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_a_training_step_between_log_steps_has_no_host_sync():
    run = cell_run(small_student(), steps=12)
    run.cfg.log_every = 10
    run.advance(0)  # a log step: it syncs, by design
    # Adam keeps its step counters on the host (capturable=False), on CUDA as well
    counters = [state["step"] for state in run.optimizer.adam.state.values()]
    with _SyncingOps(counters) as mode:
        assert run.advance(1) is None
    assert mode.seen == []


# ------------------------------------------------------------------------ oracle pass


@SETTINGS
@given(st.integers(0, 10_000), st.integers(1, 30), st.integers(1, 40), st.integers(1, 8),
       st.sampled_from([torch.float32, torch.float64]))
def test_sparse_row_accumulation_equals_index_add_per_column(seed, n_rows, positions, columns, dtype):
    from ablate.oracle.build import RowAccumulator, RowPairs

    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-1, n_rows, (positions, columns), generator=g)
    values = torch.randn(positions, 5, generator=g, dtype=torch.float64)
    fast, plain = RowAccumulator(n_rows, 5, "cpu", dtype), RowAccumulator(n_rows, 5, "cpu", dtype)
    for _ in range(2):  # sums carry over between batches
        fast.add_pairs(RowPairs.of(rows, n_rows), values)
        for column in rows.unbind(dim=1):
            plain.add(column, values)
    assert torch.equal(fast.counts, plain.counts)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fast.sums, plain.sums, rtol=tol, atol=tol)
    expected = torch.zeros(n_rows + 1, 5, dtype=torch.float64)
    for p in range(positions):
        for c in range(columns):
            expected[rows[p, c] if rows[p, c] >= 0 else n_rows] += 2 * values[p]
    torch.testing.assert_close(fast.sums.double(), expected, rtol=tol, atol=tol)
