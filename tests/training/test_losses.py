"""ablate.training.losses against float64 formulas written out independently here (numpy explicit sums)."""

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ablate.training import losses
from ablate.errors import InputError

SETTINGS = settings(max_examples=30, deadline=None)
KINDS = ["forward", "reverse", "jsd"]


# ------------------------------------------------------------------ float64 references (numpy)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(sum(math.exp(v - m) for v in x))


def np_divergence(z: np.ndarray, s: np.ndarray, kind: str) -> float:
    """One position: z, s [V] float64 logits (already divided by T)."""
    lr, lt = np_log_softmax(z), np_log_softmax(s)
    pr, pt = np.exp(lr), np.exp(lt)
    V = len(z)
    if kind == "forward":
        return sum(pr[v] * (lr[v] - lt[v]) for v in range(V))
    if kind == "reverse":
        return sum(pt[v] * (lt[v] - lr[v]) for v in range(V))
    m = 0.5 * (pr + pt)
    return sum(0.5 * pr[v] * math.log(pr[v] / m[v]) + 0.5 * pt[v] * math.log(pt[v] / m[v]) for v in range(V))


def np_total(z, sidecar, rows, kind, temperature=1.0, weights=None):
    """(Σ_p w_p·D_p, Σ_p w_p) over positions with rows ≥ 0, in float64."""
    z = z.detach().double().numpy()
    s = sidecar.detach().double().numpy()
    r = rows.numpy()
    w = np.ones(r.shape) if weights is None else weights.double().numpy()
    total = weight = 0.0
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            if r[b, t] < 0:
                continue
            total += w[b, t] * np_divergence(z[b, t] / temperature, s[r[b, t]] / temperature, kind)
            weight += w[b, t]
    return total, weight


# ------------------------------------------------------------ float64 autograd reference (torch)


def torch64_total(z64, sidecar, rows, kind, temperature=1.0, weights=None):
    """The same formula in differentiable float64 torch, for gradient checks."""
    lr = torch.log_softmax(z64 / temperature, -1)
    lt = torch.log_softmax(sidecar.double()[rows.clamp(min=0)] / temperature, -1)
    pr, pt = lr.exp(), lt.exp()
    if kind == "forward":
        d = (pr * (lr - lt)).sum(-1)
    elif kind == "reverse":
        d = (pt * (lt - lr)).sum(-1)
    else:
        lm = torch.log(0.5 * (pr + pt))
        d = 0.5 * (pr * (lr - lm)).sum(-1) + 0.5 * (pt * (lt - lm)).sum(-1)
    w = (rows >= 0).double() if weights is None else weights.double() * (rows >= 0)
    return (d * w).sum()


@contextlib.contextmanager
def teacher_lse(mode: str):
    """mode "precomputed": the teacher rows' log-normalisers come from losses.row_logsumexp (the
    CUDA form) on the CPU as well; "in_chunk": each chunk reduces its teacher rows (the CPU's)."""
    saved = losses.PRECOMPUTED_LSE_DEVICES
    losses.PRECOMPUTED_LSE_DEVICES = ("cpu", "cuda") if mode == "precomputed" else ()
    try:
        yield
    finally:
        losses.PRECOMPUTED_LSE_DEVICES = saved


LSE_MODES = ["in_chunk", "precomputed"]


def divergence(kind, z, sidecar, rows, **kw):
    if kind == "jsd":
        return losses.jsd_rows(z, sidecar, rows, **kw)
    return losses.kl_rows(z, sidecar, rows, direction=kind, **kw)


@st.composite
def problems(draw):
    """Random (z_r [B,T,V], sidecar [N,V], rows [B,T] with −1 masks) from a drawn seed and scale."""
    B, T, V, N = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(2, 9)), draw(st.integers(1, 5))
    scale = draw(st.floats(0.1, 4.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(B, T, V, generator=g) * scale
    sidecar = torch.randn(N, V, generator=g) * scale
    rows = torch.randint(-1, N, (B, T), generator=g)
    return z, sidecar, rows


# ------------------------------------------------------------------------------ divergences


@SETTINGS
@given(problems(), st.sampled_from(KINDS), st.floats(0.25, 4.0), st.sampled_from(LSE_MODES))
def test_each_divergence_equals_its_formula(problem, kind, temperature, lse_mode):
    z, sidecar, rows = problem
    with teacher_lse(lse_mode):
        total, weight = divergence(kind, z, sidecar, rows, temperature=temperature)
    ref_total, ref_weight = np_total(z, sidecar, rows, kind, temperature)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(ref_total, rel=1e-4, abs=1e-5)
    assert weight.item() == ref_weight == int((rows >= 0).sum())


@SETTINGS
@given(problems(), st.sampled_from(KINDS))
def test_divergences_non_negative_and_zero_for_identical_inputs(problem, kind):
    z, sidecar, rows = problem
    total, _ = divergence(kind, z, sidecar, rows)
    assert total.item() >= -1e-5
    # Router logits equal to the gathered rows, plus an arbitrary per-position shift.
    shift = torch.randn(rows.shape)[..., None] * 10
    same = sidecar[rows.clamp(min=0)] + shift
    total, _ = divergence(kind, same, sidecar, rows)
    assert abs(total.item()) < 1e-5 * max(1, rows.numel())


@SETTINGS
@given(problems(), st.sampled_from(KINDS), st.floats(-50, 50))
def test_shift_invariance(problem, kind, c):
    z, sidecar, rows = problem
    base, _ = divergence(kind, z, sidecar, rows)
    shifted, _ = divergence(kind, z + c, sidecar - c, rows)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-4, abs=1e-4)


def test_forward_and_reverse_differ_and_follow_their_argument_order():
    z = torch.zeros(1, 1, 3)  # uniform router
    sidecar = torch.tensor([[4.0, 0.0, 0.0]])
    rows = torch.zeros(1, 1, dtype=torch.long)
    fwd, _ = losses.kl_rows(z, sidecar, rows, direction="forward")
    rev, _ = losses.kl_rows(z, sidecar, rows, direction="reverse")
    pt = np.exp(np_log_softmax(np.array([4.0, 0.0, 0.0])))
    pr = np.full(3, 1 / 3)
    assert fwd.item() == pytest.approx(float(np.sum(pr * np.log(pr / pt))), rel=1e-5)
    assert rev.item() == pytest.approx(float(np.sum(pt * np.log(pt / pr))), rel=1e-5)
    assert abs(fwd.item() - rev.item()) > 0.1


@SETTINGS
@given(problems(), st.sampled_from(KINDS), st.floats(0.25, 4.0))
def test_temperature_is_a_division_of_both_logits_and_one_is_plain(problem, kind, temperature):
    z, sidecar, rows = problem
    with_t, _ = divergence(kind, z, sidecar, rows, temperature=temperature)
    divided, _ = divergence(kind, z / temperature, sidecar / temperature, rows)
    assert with_t.item() == pytest.approx(divided.item(), rel=1e-4, abs=1e-5)
    t_one, _ = divergence(kind, z, sidecar, rows, temperature=1.0)
    plain, _ = np_total(z, sidecar, rows, kind)
    assert t_one.item() == pytest.approx(plain, rel=1e-4, abs=1e-5)


@SETTINGS
@given(problems(), st.sampled_from(KINDS))
def test_unit_weights_equal_unweighted_and_weights_follow_formula(problem, kind):
    z, sidecar, rows = problem
    plain = divergence(kind, z, sidecar, rows)
    ones = divergence(kind, z, sidecar, rows, weights=torch.ones(rows.shape))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])
    w = torch.rand(rows.shape, generator=torch.Generator().manual_seed(1))
    total, weight = divergence(kind, z, sidecar, rows, weights=w)
    ref_total, ref_weight = np_total(z, sidecar, rows, kind, weights=w)
    assert total.item() == pytest.approx(ref_total, rel=1e-4, abs=1e-5)
    assert weight.item() == pytest.approx(ref_weight, rel=1e-6, abs=1e-6)


@SETTINGS
@given(problems(), st.sampled_from(KINDS))
def test_per_token_mean_is_invariant_to_batch_duplication_and_sequence_repetition(problem, kind):
    z, sidecar, rows = problem
    base = losses.masked_mean(*divergence(kind, z, sidecar, rows)).item()
    batch2 = losses.masked_mean(*divergence(kind, torch.cat([z, z]), sidecar, torch.cat([rows, rows])))
    time2 = losses.masked_mean(*divergence(kind, torch.cat([z, z], 1), sidecar, torch.cat([rows, rows], 1)))
    assert batch2.item() == pytest.approx(base, rel=1e-5, abs=1e-6)
    assert time2.item() == pytest.approx(base, rel=1e-5, abs=1e-6)  # not batchmean: no ×2


@SETTINGS
@given(problems(), st.sampled_from(KINDS), st.sampled_from(LSE_MODES))
def test_masked_positions_contribute_nothing(problem, kind, lse_mode):
    z, sidecar, rows = problem
    masked = (rows < 0)[..., None]
    z = z.clone().requires_grad_()
    noisy = (z.detach() + masked * torch.randn(z.shape) * 100).requires_grad_()
    with teacher_lse(lse_mode):
        total, weight = divergence(kind, z, sidecar, rows)
        total_noisy, _ = divergence(kind, noisy, sidecar, rows)
    assert torch.equal(total, total_noisy)
    (grad,) = torch.autograd.grad(total, z)
    assert torch.all(grad[rows < 0] == 0)
    if weight.item() == 0:
        assert losses.masked_mean(total, weight).item() == 0.0


@SETTINGS
@given(problems(), st.sampled_from(KINDS), st.floats(0.5, 3.0), st.floats(-2.0, 2.0), st.sampled_from(LSE_MODES))
def test_gradient_matches_float64_autograd(problem, kind, temperature, upstream, lse_mode):
    z, sidecar, rows = problem
    w = torch.rand(rows.shape, generator=torch.Generator().manual_seed(2))
    z = z.requires_grad_()
    sidecar = sidecar.requires_grad_()  # data: must receive no gradient
    with teacher_lse(lse_mode):
        total, _ = divergence(kind, z, sidecar, rows, weights=w, temperature=temperature, chunk=4)
    (total * upstream).backward()
    z64 = z.detach().double().requires_grad_()
    (torch64_total(z64, sidecar.detach(), rows, kind, temperature, w) * upstream).backward()
    torch.testing.assert_close(z.grad, z64.grad.float(), rtol=1e-4, atol=1e-6)
    assert sidecar.grad is None


@SETTINGS
@given(problems(), st.sampled_from(KINDS))
def test_chunk_size_does_not_change_results(problem, kind):
    z, sidecar, rows = problem
    z1 = z.clone().requires_grad_()
    zbig = z.clone().requires_grad_()
    one, w_one = divergence(kind, z1, sidecar, rows, chunk=1)
    big, w_big = divergence(kind, zbig, sidecar, rows, chunk=100_000)
    one.backward()
    big.backward()
    assert one.item() == pytest.approx(big.item(), rel=1e-5, abs=1e-6)
    assert torch.equal(w_one, w_big)
    torch.testing.assert_close(z1.grad, zbig.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_are_accepted_with_fp32_maths(kind):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 5, 13, generator=g) * 3).bfloat16().requires_grad_()
    sidecar = (torch.randn(4, 13, generator=g) * 3).bfloat16()
    rows = torch.tensor([[-1, -1, 0, 3, 1], [-1, -1, 2, 2, 0]])
    total, _ = divergence(kind, z, sidecar, rows)
    total.backward()
    ref, _ = np_total(z, sidecar, rows, kind)  # the bf16 values, upcast exactly
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    z64 = z.detach().double().requires_grad_()
    torch64_total(z64, sidecar, rows, kind).backward()
    assert z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-2, atol=1e-3)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_no_float32_tensor_larger_than_one_chunk(kind):
    B, T, V, chunk = 2, 40, 50, 8
    z = torch.randn(B, T, V).bfloat16().requires_grad_()
    sidecar = torch.randn(6, V).bfloat16()
    rows = torch.randint(-1, 6, (B, T))
    with _LargestFloat32() as mode:
        total, _ = divergence(kind, z, sidecar, rows, chunk=chunk)
        total.backward()
        ce = losses.cross_entropy(z, rows.clamp(min=0), chunk=chunk)
        ce.backward()
    assert mode.largest <= chunk * V < B * T * V


def test_invalid_arguments_raise_input_errors():
    z, sidecar, rows = torch.zeros(1, 3, 4), torch.zeros(2, 4), torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(InputError):
        losses.kl_rows(z, torch.zeros(2, 5), rows)
    with pytest.raises(InputError):
        losses.kl_rows(z, sidecar, rows[:, :2])
    with pytest.raises(InputError):
        losses.kl_rows(z, sidecar, rows, direction="backward")
    with pytest.raises(InputError):
        losses.kl_rows(z, sidecar, rows, temperature=0.0)


# --------------------------------------------------------------------------- cross-entropy


@SETTINGS
@given(problems(), st.integers(1, 7))
def test_cross_entropy_matches_formula_and_gradient(problem, chunk):
    z, _, _ = problem
    B, T, V = z.shape
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    z = z.requires_grad_()
    ce = losses.cross_entropy(z, targets, chunk=chunk)
    zn, tn = z.detach().double().numpy(), targets.numpy()
    ref = np.mean([-np_log_softmax(zn[b, t])[tn[b, t]] for b in range(B) for t in range(T)])
    assert ce.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    ce.backward()
    z64 = z.detach().double().requires_grad_()
    picked = torch.log_softmax(z64, -1).gather(-1, targets[..., None])
    (-picked.mean()).backward()
    torch.testing.assert_close(z.grad, z64.grad.float(), rtol=1e-4, atol=1e-6)


def test_cross_entropy_bf16():
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(2, 3, 17, generator=g) * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 17, (2, 3), generator=g)
    ce = losses.cross_entropy(z, targets, chunk=2)
    ref = torch.nn.functional.cross_entropy(z.detach().double().reshape(-1, 17), targets.reshape(-1))
    assert ce.dtype == torch.float32
    assert ce.item() == pytest.approx(ref.item(), rel=1e-5)
    ce.backward()
    assert z.grad.dtype == torch.bfloat16


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2500), st.integers(1, 40), st.floats(0.25, 4.0), st.integers(0, 2**31 - 1))
def test_row_logsumexp_equals_float64_and_is_kept_until_the_sidecar_changes(N, V, temperature, seed):
    """In passes of 1,024 rows, equal to float64's per-row logsumexp; the same tensor for the same
    sidecar and temperature; recomputed after an in-place change or for another temperature."""
    sidecar = torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * 4
    lse = losses.row_logsumexp(sidecar, temperature)
    want = torch.logsumexp(sidecar.double() / temperature, dim=-1)
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-5)
    assert losses.row_logsumexp(sidecar, temperature) is lse
    assert losses.row_logsumexp(sidecar, temperature * 2) is not lse
    sidecar[N // 2].add_(10.0)
    changed = losses.row_logsumexp(sidecar, temperature)
    torch.testing.assert_close(changed.double(), torch.logsumexp(sidecar.double() / temperature, dim=-1),
                               rtol=1e-6, atol=1e-5)
    assert losses.row_logsumexp(sidecar.clone(), temperature) is not changed  # another tensor: computed anew
