"""The fused loss head: losses of LinearLogits x·Eᵀ formed a chunk at a time, against float64 autograd
of the whole product, and without any [B, T, V] tensor."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ablate.model.logits import LinearLogits, as_tensor
from ablate.training import losses
from tests.training.test_losses import KINDS, divergence, torch64_total

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def heads(draw):
    """(x [B, T, d], E [V, d], sidecar [N, V], rows [B, T] with −1 masks, targets [B, T], chunk)."""
    B, T, d, V, N = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 5)),
                     draw(st.integers(2, 11)), draw(st.integers(1, 4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.floats(0.2, 2.0))
    x = torch.randn(B, T, d, generator=g) * scale
    E = torch.randn(V, d, generator=g)
    sidecar = torch.randn(N, V, generator=g) * 2
    rows = torch.randint(-1, N, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    return x, E, sidecar, rows, targets, draw(st.integers(1, 7))


def _grads(loss_of, x, E, upstream):
    """(value, ∂/∂x, ∂/∂E) of loss_of(x, E) · upstream."""
    x, E = x.clone().requires_grad_(), E.clone().requires_grad_()
    value = loss_of(x, E)
    (value * upstream).backward()
    return value.detach(), x.grad, E.grad


@SETTINGS
@given(heads(), st.sampled_from(KINDS), st.floats(0.5, 3.0), st.floats(-2.0, 2.0))
def test_divergence_of_a_product_matches_float64_autograd(head, kind, temperature, upstream):
    x, E, sidecar, rows, _, chunk = head
    w = torch.rand(rows.shape, generator=torch.Generator().manual_seed(1))
    fused = _grads(lambda x, E: divergence(kind, LinearLogits(x, E), sidecar, rows, weights=w,
                                           temperature=temperature, chunk=chunk)[0], x, E, upstream)
    ref = _grads(lambda x, E: torch64_total(x @ E.T, sidecar, rows, kind, temperature, w),
                 x.double(), E.double(), upstream)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(heads(), st.floats(-2.0, 2.0))
def test_cross_entropy_of_a_product_matches_float64_autograd(head, upstream):
    x, E, _, _, targets, chunk = head
    fused = _grads(lambda x, E: losses.cross_entropy(LinearLogits(x, E), targets, chunk=chunk), x, E, upstream)
    ref = _grads(lambda x, E: torch.nn.functional.cross_entropy((x @ E.T).flatten(0, 1), targets.flatten()),
                 x.double(), E.double(), upstream)
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_product_equals_the_materialised_logits_in_bf16():
    """The same bf16 products, whole or per chunk: values and x-gradients agree to bf16 rounding."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 8, generator=g).bfloat16()
    E = torch.randn(21, 8, generator=g)
    sidecar, rows = torch.randn(5, 21, generator=g).bfloat16(), torch.randint(-1, 5, (2, 9), generator=g)
    targets = torch.randint(0, 21, (2, 9), generator=g)
    out = {}
    for name, make in (("fused", lambda x: LinearLogits(x, E)), ("whole", lambda x: as_tensor(LinearLogits(x, E)))):
        xr = x.clone().requires_grad_()
        total, _ = losses.kl_rows(make(xr), sidecar, rows, chunk=4)
        ce = losses.cross_entropy(make(xr), targets, chunk=4)
        (total + ce).backward()
        out[name] = (total, ce, xr.grad)
    assert out["fused"][2].dtype == torch.bfloat16
    for got, want in zip(out["fused"], out["whole"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_no_gradient_is_kept_without_grad():
    x, E = torch.randn(1, 4, 3), torch.randn(6, 3)
    with torch.no_grad():
        ce = losses.cross_entropy(LinearLogits(x, E), torch.zeros(1, 4, dtype=torch.long))
    assert ce.grad_fn is None and torch.isfinite(ce)


class _LargestLogits(TorchDispatchMode):
    """Records the largest tensor (any dtype) whose last dimension is V."""

    def __init__(self, V: int):
        super().__init__()
        self.V, self.largest = V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.V:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_no_tensor_of_all_positions_by_vocabulary_exists(kind):
    B, T, d, V, chunk = 2, 40, 6, 50, 8
    x = torch.randn(B, T, d).bfloat16().requires_grad_()
    E = torch.randn(V, d)
    sidecar, rows = torch.randn(6, V).bfloat16(), torch.randint(-1, 6, (B, T))
    with _LargestLogits(V) as mode:
        total, _ = divergence(kind, LinearLogits(x, E), sidecar, rows, chunk=chunk)
        ce = losses.cross_entropy(LinearLogits(x, E), rows.clamp(min=0), chunk=chunk)
        (total + ce).backward()
    assert x.grad.shape == x.shape
    assert mode.largest <= chunk * V < B * T * V


@pytest.mark.cuda
def test_fused_head_on_cuda_equals_the_materialised_logits_at_zeb139_dimensions():
    """bf16 under autocast, compiled chunks, 4 × 2048 positions, V = 32,000, d = 512: the fused
    KL+CE loss and its input gradients equal those of the materialised logits (bf16 rounding), and
    the fused head's peak memory above its inputs is below half the whole logits' (measured on an
    H200: 0.56 GiB; the whole logits and their gradient alone are 2 × 0.49 GiB)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    P, d, V, N = 4 * 2048, 512, 32_000, 10_000
    E = torch.randn(V, d, device="cuda", generator=g) / d ** 0.5
    x = torch.randn(1, P, d, device="cuda", generator=g).bfloat16()
    sidecar = (2 * torch.randn(N, V, device="cuda", generator=g)).bfloat16()
    rows = torch.randint(-1, N, (1, P), device="cuda", generator=g)
    targets = torch.randint(0, V, (1, P), device="cuda", generator=g)
    results = {}
    for name in ("fused", "whole"):
        xr = x.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = LinearLogits(xr, E) if name == "fused" else as_tensor(LinearLogits(xr, E))
            total, weight = losses.kl_rows(logits, sidecar, rows)
            loss = 0.5 * losses.cross_entropy(logits, targets) + 0.5 * losses.masked_mean(total, weight)
        loss.backward()
        torch.cuda.synchronize()
        results[name] = (loss.detach().float(), xr.grad.float(), torch.cuda.max_memory_allocated() - base)
    (fused_loss, fused_grad, fused_peak), (loss, grad, whole_peak) = results["fused"], results["whole"]
    torch.testing.assert_close(fused_loss, loss, rtol=1e-3, atol=1e-3)
    assert float((fused_grad - grad).norm() / grad.norm()) < 2e-2
    assert 2 * P * V * 2 < whole_peak and fused_peak < whole_peak / 2


@pytest.mark.parametrize("router, kind", [(False, "ce"), (True, "kl_ce")])
def test_a_cell_step_with_the_fused_head_logs_what_whole_logits_log(router, kind):
    """One CPU fp32 training step of a cell (the step-0 evaluation, the loss and its terms, the aux
    losses, router statistics, the gradient norm, then the evaluation after the update) with the fused
    loss head forced on, against whole logits: every logged number within 1e-6 relative. (Over more
    steps the two drift apart as any two roundings do: (n + r)·Eᵀ and n·Eᵀ + r·Eᵀ differ in the last
    bits, and Muon's orthogonalisation amplifies such differences in near-zero gradients.)"""
    from tests.training.test_fused import TIMING, build, config, objective, sidecar, streams
    from ablate.training.train import train_cell

    outs = []
    for fused in (False, True):
        train, val = streams()
        student = build(router, 0)
        assert not student.uses_fused_head(torch.device("cpu"))  # the CPU's default: whole logits
        student.fused_head = fused
        outs.append(train_cell(student, objective(kind), train, val, sidecar() if router else None,
                               config("cell", steps=1), "cpu"))
    whole, fused = outs
    assert len(whole.history) == len(fused.history) == 1 and len(whole.evals) == len(fused.evals) == 2
    for a, b in [*zip(whole.history, fused.history), *zip(whole.evals, fused.evals)]:
        assert a.keys() == b.keys()
        for k in a.keys() - set(TIMING):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
