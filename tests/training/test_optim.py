"""CellOptimizer (Muon + Adam), the parameter partition and the WSD schedule against
independent float64 re-computations of the reference formulas (§5.2–5.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ablate.training.optim import CellOptimizer, partition, wsd_multiplier

A, B, C = 3.4445, -4.7750, 2.0315

# torch runs Newton–Schulz in bfloat16 (8 mantissa bits); five quintic iterations amplify the
# rounding, so the bf16 update matches the float64 reference to a few per cent (Frobenius).
NS_BF16_REL_TOL = 3e-2


def reference_muon_step(p: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, lr: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One reference Muon step in float64 (§5.2). Returns (new p, new buffer)."""
    buf = 0.95 * buf + grad
    x = buf / (torch.linalg.matrix_norm(buf) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(5):
        gram = x @ x.T
        x = A * x + B * gram @ x + C * gram @ gram @ x
    if tall:
        x = x.T
    rows, cols = p.shape
    return p - lr * math.sqrt(max(1.0, rows / cols)) * x, buf


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (32, 8)], ids=["square", "wide", "tall"])
def test_muon_matches_reference_update_over_three_steps(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    init = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = nn.Parameter(init.float().clone())
    opt = CellOptimizer([("block.W_q.weight", weight)], lr=0.02)
    ref_p, ref_buf = init.float().double(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        before = weight.detach().double().clone()
        weight.grad = grad.float()
        opt.step()
        new_ref, ref_buf = reference_muon_step(before, ref_buf, grad.float().double(), 0.02)
        got_delta = weight.detach().double() - before
        ref_delta = new_ref - before
        rel = (got_delta - ref_delta).norm() / ref_delta.norm()
        assert rel < NS_BF16_REL_TOL, f"relative update error {rel:.3g}"
        ref_p = new_ref
    assert torch.allclose(weight.detach().double(), ref_p, atol=0.02 * 3 * NS_BF16_REL_TOL)


def test_muon_tall_step_is_scaled_by_sqrt_rows_over_cols():
    # A 4:1 weight (like the 512×128 k/v projections) steps twice as far as NS alone gives:
    # compare against the reference without the factor, times 2.
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 16, generator=gen)
    tall = nn.Parameter(torch.zeros(64, 16))
    tall.grad = grad.clone()
    CellOptimizer([("k_proj.weight", tall)], lr=1.0).step()
    zeros = torch.zeros(16, 64, dtype=torch.float64)
    unscaled, _ = reference_muon_step(zeros, zeros, grad.double().T, 1.0)  # wide: factor 1
    rel = (tall.detach().double() - 2.0 * unscaled.T).norm() / (2.0 * unscaled).norm()
    assert rel < NS_BF16_REL_TOL


@pytest.mark.parametrize("buffer_norm", [1e-9, 1e-8, 3e-8, 1e-6])
def test_muon_tiny_buffer_regime_stays_near_the_reference(buffer_norm):
    # Below ‖B‖ ≈ 3e-6 neither torch's clamp nor our eps reproduces the reference's
    # B/(‖B‖ + 1e-7) exactly (see ablate.training.optim). With eps = 0.05·1e-7 the update stays within
    # ~30 % of the reference (measured ≤ 0.29 on these norms); torch's default eps = 1e-7 on its
    # 0.05-scaled EMA buffer would be off by up to 92 % (update ~20× too small at ‖B‖ = 1e-9).
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    grad = (grad / grad.norm() * buffer_norm).float()
    weight = nn.Parameter(torch.zeros(12, 12))
    weight.grad = grad.clone()
    CellOptimizer([("W_align.weight", weight)], lr=1.0).step()
    zeros = torch.zeros(12, 12, dtype=torch.float64)
    ref, _ = reference_muon_step(zeros, zeros, grad.double(), 1.0)
    rel = (weight.detach().double() - ref).norm() / ref.norm()
    assert rel < 0.35


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (32, 8)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("buffer_norm", [1e-9, 1e-6, 1.0, 1e3])
def test_upstream_muon_matches_the_float64_reference_to_float32_rounding(shape, buffer_norm):
    """numerics = "upstream": float32 Newton–Schulz with the reference's + 1e-7 and its undamped
    buffer, so three updates match float64 to float32 rounding at every buffer norm (the bf16
    path above is off by up to 3 %, and by 30 % for tiny buffers)."""
    gen = torch.Generator().manual_seed(sum(shape))
    weight = nn.Parameter(torch.zeros(shape))  # like W_align: the weight holds only the updates
    opt = CellOptimizer([("router.W_align.weight", weight)], lr=0.02, numerics="upstream")
    ref_p, ref_buf = weight.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = (grad / grad.norm() * buffer_norm).float()
        weight.grad = grad.clone()
        opt.step()
        ref_p, ref_buf = reference_muon_step(ref_p, ref_buf, grad.double(), 0.02)
        rel = (weight.detach().double() - ref_p).norm() / ref_p.norm()
        assert rel < 1e-5, f"relative error {rel:.3g}"
    assert opt.muon.state[weight]["momentum_buffer"].dtype == torch.float32


def test_adam_matches_textbook_formula():
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(5, generator=gen, dtype=torch.float64)
    gate = nn.Parameter(p0.clone())
    opt = CellOptimizer([("engram_injections.2.gate", gate)], lr=0.01)
    p, m, v = p0.clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    b1, b2, eps, lr = 0.9, 0.95, 1e-8, 0.01
    for t in range(1, 5):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        gate.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        assert torch.allclose(gate.detach(), p, rtol=0, atol=1e-12)


def test_set_lr_reaches_both_groups_and_zero_lr_freezes():
    w = nn.Parameter(torch.randn(4, 4))
    a = nn.Parameter(torch.randn(()))
    opt = CellOptimizer([("x.W_o.weight", w), ("x.gate", a)], lr=1.0)
    opt.set_lr(0.0)
    w0, a0 = w.detach().clone(), a.detach().clone()
    w.grad, a.grad = torch.ones(4, 4), torch.ones(())
    opt.step()
    assert torch.equal(w.detach(), w0) and torch.equal(a.detach(), a0)
    opt.zero_grad()
    assert w.grad is None and a.grad is None


def _pair(seed: int) -> tuple[nn.Parameter, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return (nn.Parameter(torch.randn(6, 3, generator=gen)),
            nn.Parameter(torch.randn(3, generator=gen)))


def test_state_dict_round_trip_resumes_exactly():
    grads = [(torch.randn(6, 3), torch.randn(3)) for _ in range(6)]

    def run(w, b, opt, steps):
        for gw, gb in steps:
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()

    w1, b1 = _pair(0)
    opt1 = CellOptimizer([("m.W_v.weight", w1), ("m.norm.bias", b1)], lr=0.05)
    run(w1, b1, opt1, grads)

    w2, b2 = _pair(0)
    opt2 = CellOptimizer([("m.W_v.weight", w2), ("m.norm.bias", b2)], lr=0.05)
    run(w2, b2, opt2, grads[:3])
    saved = opt2.state_dict()
    w3, b3 = nn.Parameter(w2.detach().clone()), nn.Parameter(b2.detach().clone())
    opt3 = CellOptimizer([("m.W_v.weight", w3), ("m.norm.bias", b3)], lr=0.05)
    opt3.load_state_dict(saved)
    run(w3, b3, opt3, grads[3:])
    assert torch.equal(w1.detach(), w3.detach()) and torch.equal(b1.detach(), b3.detach())


def test_partition_on_realistic_names():
    shapes = {
        "backbone.embed_tokens.weight": (32, 8),
        "backbone.lm_head.weight": (32, 8),
        "backbone.final_norm.weight": (8,),
        "engram_injections.2.gate": (),
        "engram_injections.2.xattn.W_r.weight": (8, 8),
        "engram_injections.2.xattn.W_q.weight": (8, 8),
        "engram_injections.2.xattn.k_proj.weight": (8, 2),
        "engram_injections.2.xattn.q_norm.weight": (4,),
        "engram_injections.5.xattn.norm_proj.weight": (8, 8),  # 2-D but named "norm"
        "engram_injections.5.xattn.W_o.weight": (8, 8),
        "engram_injections.5.xattn.W_o.bias": (8,),
        "engram_skip_router.W_align.weight": (8, 8),
        "engram_skip_router.log_alpha": (),
    }
    named = [(n, nn.Parameter(torch.zeros(s))) for n, s in shapes.items()]
    muon, adam = partition(named)
    by_id = {id(p): n for n, p in named}
    assert {by_id[id(p)] for p in muon} == {
        "engram_injections.2.xattn.W_r.weight", "engram_injections.2.xattn.W_q.weight",
        "engram_injections.2.xattn.k_proj.weight", "engram_injections.5.xattn.W_o.weight",
        "engram_skip_router.W_align.weight",
    }
    assert len(muon) + len(adam) == len(named)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (50, 0.5), (99, 0.99), (100, 1.0), (1000, 1.0), (1799, 1.0), (1800, 1.0),
    (1900, 0.5), (1999, 0.005), (2000, 0.0), (2500, 0.0),
])
def test_wsd_reference_points(step, expected):
    assert wsd_multiplier(step, 2000, 100) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 5000), warmup=st.integers(0, 300),
       decay_frac=st.floats(0.0, 1.0), step=st.integers(0, 6000))
def test_wsd_matches_piecewise_definition(total, warmup, decay_frac, step):
    decay_start = total - math.floor(decay_frac * total)
    if step < warmup:
        expected = step / warmup
    elif step < decay_start:
        expected = 1.0
    else:
        expected = max(0.0, 1.0 - (step - decay_start) / max(1, total - decay_start))
        if decay_start == total:
            expected = 0.0
    got = wsd_multiplier(step, total, warmup, decay_frac)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= got <= max(1.0, step / max(warmup, 1))


# ------------------------------------------------------------------------------ batched Muon
# BatchedMuon (the default) runs one Newton–Schulz per group of same-shaped matrices; the
# per-matrix optimisers (CellOptimizer(batched=False): torch.optim.Muon, ReferenceMuon) are the
# reference. Float32 (numerics = "upstream"): equal to float32 rounding (a tall matrix enters the
# batch as a contiguous transposed copy, the per-matrix path as a view: measured ≤ 5e-6 relative).
# bf16 (numerics = "ablate"): the same bf16 operations; bitwise equal on the CPU, bf16 rounding allowed.
BATCHED_FP32_REL_TOL = 2e-5
BATCHED_BF16_REL_TOL = 1e-2

from ablate.training.optim import BatchedMuon, newton_schulz, newton_schulz_batched  # noqa: E402

MATRIX_DIMS = (4, 8, 12, 32)


def _run_pair(shapes, numerics, steps, seed, lr=0.02):
    """The same gradients through the batched and the per-matrix Muon; → [(delta batched, delta
    per-matrix)] per matrix, float64."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    batched = [nn.Parameter(t.clone()) for t in init]
    single = [nn.Parameter(t.clone()) for t in init]
    names = [f"inj.{i}.W_q.weight" for i in range(len(shapes))]
    opt_b = CellOptimizer(list(zip(names, batched)), lr=lr, numerics=numerics)
    opt_s = CellOptimizer(list(zip(names, single)), lr=lr, numerics=numerics, batched=False)
    assert isinstance(opt_b.muon, BatchedMuon) and not isinstance(opt_s.muon, BatchedMuon)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(batched, single, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_b.step()
        opt_s.step()
    return [((p.detach() - t).double(), (q.detach() - t).double()) for p, q, t in zip(batched, single, init)]


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.tuples(st.sampled_from(MATRIX_DIMS), st.sampled_from(MATRIX_DIMS)), min_size=1, max_size=7),
       numerics=st.sampled_from(["ablate", "upstream"]), seed=st.integers(0, 2**16))
def test_batched_muon_equals_per_matrix_muon(shapes, numerics, seed):
    """Any mix of shapes (groups of one or several matrices, wide, tall and square, a tall matrix
    sharing a group with its transposed shape): three steps of the batched optimiser move every
    matrix as the per-matrix optimiser does."""
    tol = BATCHED_FP32_REL_TOL if numerics == "upstream" else BATCHED_BF16_REL_TOL
    for got, want in _run_pair(shapes, numerics, steps=3, seed=seed):
        rel = (got - want).norm() / want.norm()
        assert rel <= tol, f"{numerics}: relative difference {rel:.3g} for shape {tuple(got.shape)}"


def test_batched_muon_groups_by_newton_schulz_shape():
    params = [nn.Parameter(torch.zeros(s)) for s in [(8, 8), (4, 8), (8, 4), (8, 4), (8, 8), (6, 4)]]
    groups = BatchedMuon.shape_groups(params)
    sizes = {key[2:]: len(members) for key, members in groups.items()}
    assert sizes == {(8, 8): 2, (4, 8): 3, (4, 6): 1}  # 8×4 enters transposed, beside 4×8


@settings(max_examples=20, deadline=None)
@given(group=st.integers(1, 5), rows=st.sampled_from([3, 8, 16]), extra=st.sampled_from([0, 5, 24]),
       scale=st.sampled_from([1e-9, 1e-6, 1.0, 1e3]), seed=st.integers(0, 2**16))
def test_batched_newton_schulz_matches_float64_per_matrix(group, rows, extra, scale, seed):
    """The batched iteration in float64 equals the per-matrix one to float64 rounding, and in float32
    the reference's float32 formula (X/(‖X‖ + 1e-7)) stays within float32 rounding of float64."""
    gen = torch.Generator().manual_seed(seed)
    stack = torch.randn(group, rows, rows + extra, generator=gen, dtype=torch.float64) * scale
    want = torch.stack([newton_schulz(m) for m in stack])
    assert torch.allclose(newton_schulz_batched(stack), want, rtol=0, atol=1e-12)
    got32 = newton_schulz_batched(stack.float()).double()
    rel = (got32 - want).norm() / want.norm()
    assert rel < 1e-5


@pytest.mark.parametrize("shapes", [[(16, 16), (16, 16), (8, 24)], [(32, 8), (8, 32), (32, 8)]],
                         ids=["square+wide", "tall+wide"])
@pytest.mark.parametrize("buffer_norm", [1e-9, 1.0, 1e3])
def test_batched_upstream_muon_matches_the_float64_reference(shapes, buffer_norm):
    """numerics = "upstream", batched: three updates match the float64 reference (§5.2) to float32
    rounding, as the per-matrix ReferenceMuon does (test above)."""
    gen = torch.Generator().manual_seed(len(shapes))
    weights = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = CellOptimizer([(f"x.{i}.W_o.weight", w) for i, w in enumerate(weights)], lr=0.02, numerics="upstream")
    refs = [(torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64)) for s in shapes]
    for _ in range(3):
        grads = []
        for s in shapes:
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            grads.append((g / g.norm() * buffer_norm).float())
        for w, g in zip(weights, grads):
            w.grad = g.clone()
        opt.step()
        refs = [reference_muon_step(p, buf, g.double(), 0.02) for (p, buf), g in zip(refs, grads)]
        for w, (p, _) in zip(weights, refs):
            rel = (w.detach().double() - p).norm() / p.norm()
            assert rel < 1e-5, f"relative error {rel:.3g}"
    assert all(opt.muon.state[w]["momentum_buffer"].dtype == torch.float32 for w in weights)


@pytest.mark.parametrize("numerics", ["ablate", "upstream"])
def test_saved_states_move_between_batched_and_per_matrix(numerics):
    """A state saved by the per-matrix optimiser (e.g. a resume state written before batching)
    continues in the batched one exactly as in the per-matrix one, and back."""
    shapes = [(12, 12), (12, 4), (4, 12)]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    names = [f"a.{i}.W_v.weight" for i in range(len(shapes))]

    def run(batched_first: bool, batched_then: bool):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = CellOptimizer(list(zip(names, params)), 0.05, numerics, batched=batched_first)
        for step, gs in enumerate(grads):
            if step == 2:
                saved = opt.state_dict()
                params = [nn.Parameter(p.detach().clone()) for p in params]
                opt = CellOptimizer(list(zip(names, params)), 0.05, numerics, batched=batched_then)
                opt.load_state_dict(saved)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach().double() for p in params]

    tol = BATCHED_FP32_REL_TOL if numerics == "upstream" else BATCHED_BF16_REL_TOL
    reference = run(False, False)
    for first, then in ((False, True), (True, False)):
        for got, want, t in zip(run(first, then), reference, init):
            assert (got - want).norm() / (want - t.double()).norm() <= tol


@settings(max_examples=20, deadline=None)
@given(members=st.lists(st.lists(st.tuples(st.sampled_from(MATRIX_DIMS), st.sampled_from(MATRIX_DIMS)),
                                 min_size=1, max_size=4), min_size=1, max_size=4),
       numerics=st.sampled_from(["ablate", "upstream"]), seed=st.integers(0, 2**16))
def test_optimisers_stepped_together_move_every_matrix_as_alone(members, numerics, seed):
    """A fused group's optimisers (CellOptimizer.step_together: one Newton–Schulz per shape group
    across members, each member with its own learning rate, an Adam group too) move every
    parameter exactly as each optimiser's own step does: bitwise on the CPU, in float32 and bf16."""
    gen = torch.Generator().manual_seed(seed)
    inits = [[torch.randn(s, generator=gen) for s in shapes] + [torch.randn(3, generator=gen)] for shapes in members]
    names = [[f"inj.{i}.W_q.weight" for i in range(len(shapes))] + ["gate.bias"] for shapes in members]

    def build():
        params = [[nn.Parameter(t.clone()) for t in init] for init in inits]
        opts = [CellOptimizer(list(zip(n, ps)), lr=0.01 * (1 + i), numerics=numerics)
                for i, (n, ps) in enumerate(zip(names, params))]
        return params, opts

    together, alone = build(), build()
    for _ in range(3):
        grads = [[torch.randn(t.shape, generator=gen) for t in init] for init in inits]
        for (params, _), in [(together,), (alone,)]:
            for ps, gs in zip(params, grads):
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
        CellOptimizer.step_together(together[1])
        for opt in alone[1]:
            opt.step()
    for ps, qs in zip(together[0], alone[0]):
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
