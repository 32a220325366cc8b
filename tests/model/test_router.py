import math

import pytest
import torch

from ablate.errors import InputError
from ablate.model.router import SkipToLogitRouter


def test_parameter_count_at_tiny_width():
    with torch.device("meta"):
        router = SkipToLogitRouter(512)
    assert sum(p.numel() for p in router.parameters()) == 262_145
    assert set(router.state_dict()) == {"W_align.weight", "log_alpha"}


def test_init_alpha_and_zero_output():
    router = SkipToLogitRouter(16, alpha_init=0.1)
    assert router.log_alpha.item() == pytest.approx(-2.302585, abs=1e-6)
    assert router.alpha.item() == pytest.approx(0.1)
    z = router(torch.randn(2, 3, 16), torch.randn(40, 16))
    assert z.shape == (2, 3, 40) and torch.equal(z, torch.zeros_like(z))


@pytest.mark.parametrize("bad", [0.0, -0.5, math.inf, math.nan])
def test_alpha_init_must_be_finite_and_positive(bad):
    with pytest.raises(InputError, match="alpha_init"):
        SkipToLogitRouter(16, alpha_init=bad)


def test_logits_match_float64_formula():
    torch.manual_seed(0)
    router = SkipToLogitRouter(16, alpha_init=0.3)
    with torch.no_grad():
        router.W_align.weight.normal_()
    e, E = torch.randn(2, 3, 16), torch.randn(40, 16)
    W = router.W_align.weight.detach().double()
    expected = 0.3 * (e.double() @ W.T) @ E.double().T
    torch.testing.assert_close(router(e, E).double(), expected, rtol=1e-5, atol=1e-5)


def test_embedding_gets_gradient_only_if_caller_lets_it():
    router = SkipToLogitRouter(8)
    E = torch.randn(10, 8)  # frozen matrix passed in, never registered
    with torch.no_grad():
        router.W_align.weight.normal_()
    router(torch.randn(1, 2, 8), E).sum().backward()
    assert E.grad is None and router.log_alpha.grad.abs() > 0
