"""Built-in objectives: blends, exact endpoints, the §6 sanity anchor, params validation."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ablate.api.components import ObjectiveBatch, ObjectiveContext
from ablate.errors import InputError
from ablate.api.plugins import load_registry
from ablate_builtins.objectives import CE, JSD, KLCE, MaskedKL, TemperatureKL

B, T, V, N = 3, 7, 11, 5


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def np_kl_per_position(z_r, sidecar, rows, temperature=1.0, direction="forward"):
    """[B, T] float64 KL per position (nan where masked), written out with explicit sums."""
    z, s, r = z_r.detach().double().numpy(), sidecar.double().numpy(), rows.numpy()
    out = np.full(r.shape, np.nan)
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            if r[b, t] >= 0:
                lr = np_log_softmax(z[b, t] / temperature)
                lt = np_log_softmax(s[r[b, t]] / temperature)
                if direction == "forward":
                    out[b, t] = sum(math.exp(lr[v]) * (lr[v] - lt[v]) for v in range(len(lr)))
                else:
                    out[b, t] = sum(math.exp(lt[v]) * (lt[v] - lr[v]) for v in range(len(lr)))
    return out


def np_ce(logits, targets):
    z, y = logits.detach().double().numpy(), targets.numpy()
    return np.mean([-np_log_softmax(z[b, t])[y[b, t]] for b in range(y.shape[0]) for t in range(y.shape[1])])


def make_batch(seed=0, router=None):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, V, (B, T + 1), generator=g)
    rows = torch.randint(0, N, (B, T), generator=g)
    rows[:, :2] = -1  # p < 2 has no trigram row
    z_r = torch.randn(B, T, V, generator=g) * 2 if router is None else router
    return ObjectiveBatch(
        logits=(torch.randn(B, T, V, generator=g) * 2).requires_grad_(),
        targets=stream[:, 1:], tokens=stream[:, :-1],
        router_logits=z_r.clone().requires_grad_(), teacher_rows=rows,
        sidecar=torch.randn(N, V, generator=g) * 2)


CTX = ObjectiveContext(vocab_size=V, token_frequencies=torch.arange(V, dtype=torch.float64) ** 2 * 10)


def build(cls, **params):
    return cls(cls.Params(**params), CTX)


def test_registered_names():
    names = load_registry().names("objective")
    assert {"ce", "kl_ce", "temperature_kl", "masked_kl", "jsd"} <= set(names)


def test_ce_matches_formula_and_needs_nothing():
    batch = make_batch()
    result = build(CE)(batch)
    assert result.loss.item() == pytest.approx(np_ce(batch.logits, batch.targets), rel=1e-5)
    assert CE.needs_router is False and CE.needs_sidecar is False
    for cls in (KLCE, TemperatureKL, MaskedKL, JSD):
        assert cls.needs_router is True and cls.needs_sidecar is True


def test_lambda_zero_is_exactly_ce_and_still_logs_kl():
    batch = make_batch()
    ce = build(CE)(batch).loss
    result = build(KLCE, **{"lambda": 0.0})(batch)
    assert torch.equal(result.loss, ce)
    assert torch.equal(result.terms["ce"], ce.detach())
    kl = np.nanmean(np_kl_per_position(batch.router_logits, batch.sidecar, batch.teacher_rows))
    assert result.terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    result.loss.backward()
    assert batch.router_logits.grad is None and batch.logits.grad is not None


def test_lambda_one_is_exactly_the_kl_term():
    batch = make_batch()
    result = build(KLCE, lam=1.0)(batch)
    kl = np.nanmean(np_kl_per_position(batch.router_logits, batch.sidecar, batch.teacher_rows))
    assert result.loss.item() == pytest.approx(kl, rel=1e-5)  # the KL alone: no CE term left in it
    assert result.terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    result.loss.backward()
    assert batch.logits.grad is None and batch.router_logits.grad is not None


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_blend_matches_formula(direction):
    batch = make_batch(seed=1)
    result = build(KLCE, lam=0.3, direction=direction)(batch)
    kl = np.nanmean(np_kl_per_position(batch.router_logits, batch.sidecar, batch.teacher_rows,
                                       direction=direction))
    ce = np_ce(batch.logits, batch.targets)
    assert result.loss.item() == pytest.approx(0.7 * ce + 0.3 * kl, rel=1e-5)
    assert result.terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert not result.terms["kl"].requires_grad and not result.terms["ce"].requires_grad
    batch.sidecar.requires_grad_()
    build(KLCE, lam=0.3, direction=direction)(batch).loss.backward()
    assert batch.sidecar.grad is None


def test_sanity_anchor_uniform_router():
    """§6: z_r = 0 ⇒ KL_p = −ln V − mean_v log P_t(v) for each valid position."""
    batch = make_batch(seed=2, router=torch.zeros(B, T, V))
    s, rows = batch.sidecar.double().numpy(), batch.teacher_rows.numpy()
    anchors = [-math.log(V) - np.mean(np_log_softmax(s[r])) for r in rows.reshape(-1) if r >= 0]
    result = build(KLCE, lam=1.0)(batch)
    assert result.loss.item() == pytest.approx(np.mean(anchors), rel=1e-5)


def test_params_validation():
    with pytest.raises(ValidationError):
        KLCE.Params(**{"lambda": 1.5})
    with pytest.raises(ValidationError):
        KLCE.Params(lam=-0.1)
    with pytest.raises(ValidationError):
        KLCE.Params()  # λ is required
    with pytest.raises(ValidationError):
        KLCE.Params(lam=0.5, temperature=2.0)  # unknown field
    with pytest.raises(ValidationError):
        KLCE.Params(lam=0.5, direction="sideways")
    with pytest.raises(ValidationError):
        TemperatureKL.Params(lam=0.5, t2_scale=True)  # missing temperature
    with pytest.raises(ValidationError):
        TemperatureKL.Params(lam=0.5, temperature=0.0, t2_scale=True)
    with pytest.raises(ValidationError):
        TemperatureKL.Params(lam=0.5, temperature=2.0)  # t2_scale must be explicit
    with pytest.raises(ValidationError, match="top_k"):
        MaskedKL.Params(lam=0.5, key="current", weighting="drop_top_k")
    with pytest.raises(ValidationError, match="top_k only applies"):
        MaskedKL.Params(lam=0.5, key="current", weighting="inverse_frequency", top_k=3)
    with pytest.raises(ValidationError):
        MaskedKL.Params(lam=0.5, key="current", weighting="inverse_frequency", exponent=-1.0)
    assert KLCE.Params(**{"lambda": 0.25}).lam == 0.25


@pytest.mark.parametrize("t2_scale", [True, False])
def test_temperature_kl(t2_scale):
    batch = make_batch(seed=3)
    temperature = 2.5
    result = build(TemperatureKL, lam=1.0, temperature=temperature, t2_scale=t2_scale)(batch)
    kl = np.nanmean(np_kl_per_position(batch.router_logits, batch.sidecar, batch.teacher_rows, temperature))
    expected = kl * temperature**2 if t2_scale else kl
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("key", ["current", "target"])
def test_masked_kl_drop_top_k_removes_exactly_those_positions(key):
    batch = make_batch(seed=4)
    top_k = 3  # frequencies are 10·v², so the top 3 are tokens V−1, V−2, V−3
    result = build(MaskedKL, lam=1.0, key=key, weighting="drop_top_k", top_k=top_k)(batch)
    keys = (batch.tokens if key == "current" else batch.targets).numpy()
    kl = np_kl_per_position(batch.router_logits, batch.sidecar, batch.teacher_rows)
    keep = (batch.teacher_rows.numpy() >= 0) & (keys < V - top_k)
    assert keep.sum() > 0 and keep.sum() < (batch.teacher_rows.numpy() >= 0).sum()
    assert result.loss.item() == pytest.approx(kl[keep].mean(), rel=1e-5)


@pytest.mark.parametrize("exponent", [0.0, 0.5, 2.0])
def test_masked_kl_inverse_frequency(exponent):
    batch = make_batch(seed=5)
    result = build(MaskedKL, lam=1.0, key="target", weighting="inverse_frequency", exponent=exponent)(batch)
    counts = CTX.token_frequencies.numpy()
    w = (counts[batch.targets.numpy()] + 1.0) ** (-exponent)
    kl = np_kl_per_position(batch.router_logits, batch.sidecar, batch.teacher_rows)
    valid = batch.teacher_rows.numpy() >= 0
    assert result.loss.item() == pytest.approx((w * kl)[valid].sum() / w[valid].sum(), rel=1e-5)


def test_masked_kl_rejects_mismatched_frequencies_and_dropping_everything():
    params = MaskedKL.Params(lam=0.5, key="current", weighting="drop_top_k", top_k=V)
    with pytest.raises(InputError):
        MaskedKL(params, CTX)
    bad = ObjectiveContext(vocab_size=V, token_frequencies=torch.ones(V + 1, dtype=torch.float64))
    with pytest.raises(InputError):
        MaskedKL(MaskedKL.Params(lam=0.5, key="current", weighting="inverse_frequency"), bad)


def test_jsd_matches_formula():
    batch = make_batch(seed=6)
    result = build(JSD, lam=0.5)(batch)
    z, s, r = batch.router_logits.detach().double().numpy(), batch.sidecar.double().numpy(), batch.teacher_rows.numpy()
    per = []
    for b, t in zip(*np.nonzero(r >= 0)):
        pr, pt = np.exp(np_log_softmax(z[b, t])), np.exp(np_log_softmax(s[r[b, t]]))
        m = 0.5 * (pr + pt)
        per.append(0.5 * np.sum(pr * np.log(pr / m)) + 0.5 * np.sum(pt * np.log(pt / m)))
    expected = 0.5 * np_ce(batch.logits, batch.targets) + 0.5 * np.mean(per)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0 <= result.terms["kl"].item() <= math.log(2)


def test_missing_router_is_an_input_error():
    batch = make_batch()
    batch.router_logits = None
    with pytest.raises(InputError, match="router_logits"):
        build(KLCE, lam=0.5)(batch)


def test_formula_contains_parameter_values():
    assert "λ = 0.37" in build(KLCE, lam=0.37).formula()
    assert "KL(P_teacher‖P_router)" in build(KLCE, lam=0.37, direction="reverse").formula()
    f = build(TemperatureKL, lam=0.5, temperature=2.5, t2_scale=True).formula()
    assert "λ = 0.5" in f and "T = 2.5" in f and "T²" in f
    f = build(MaskedKL, lam=0.2, key="target", weighting="drop_top_k", top_k=4).formula()
    assert "λ = 0.2" in f and "4 most frequent" in f and "y[p]" in f
    f = build(MaskedKL, lam=0.2, key="current", weighting="inverse_frequency", exponent=0.75).formula()
    assert "−0.75" in f and "t[p]" in f
    assert "λ = 0.9" in build(JSD, lam=0.9).formula()
    assert "CE" in build(CE).formula()
