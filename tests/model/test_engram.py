import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.errors import InputError
from ablate.model.engram import EngramCrossAttention, GatedEngramInjection

D, E, HEADS = 32, 8, 4


def make(top_k=3, retrieval_bias=1.0, seed=0, gate_init=0.0):
    torch.manual_seed(seed)
    return GatedEngramInjection(EngramCrossAttention(D, E, HEADS, top_k, retrieval_bias),
                                gate_init=gate_init)


def inputs(seed=0, N=20, B=2, T=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randn(N, E, generator=g)


def test_tiny_injection_parameter_count():
    with torch.device("meta"):
        inj = GatedEngramInjection(EngramCrossAttention(512, 128, num_heads=8))
    assert sum(p.numel() for p in inj.parameters()) == 721_281


def test_topk_matches_float64_brute_force():
    inj = make(top_k=4)
    h, table = inputs(N=50)
    x = inj.xattn(h, table)
    r = h.double() @ inj.xattn.W_r.weight.detach().double().T
    cos = F.normalize(r, dim=-1) @ F.normalize(table.double(), dim=-1).T
    best = cos.topk(4, dim=-1)
    assert torch.equal(x.indices, best.indices)
    torch.testing.assert_close(x.sims.double(), best.values, rtol=1e-5, atol=1e-5)


def test_output_matches_float64_reference():
    inj = make(top_k=3, retrieval_bias=0.7, gate_init=0.4)
    h, table = inputs(seed=1)
    xa = inj.xattn
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in (xa.row_norm.weight, xa.row_norm.bias, xa.q_norm.weight, xa.k_norm.weight):
            p.add_(0.3 * torch.randn_like(p))
    got, x = inj(h, table)

    w = {n: p.detach().double() for n, p in xa.named_parameters()}
    hd = D // HEADS
    B, T, _ = h.shape
    expected = torch.zeros(B, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            hv = h[b, t].double()
            r = hv @ w["W_r.weight"].T
            rows = table[x.indices[b, t]].double()  # [k, E]
            s = F.cosine_similarity(r[None], rows, dim=-1)
            mu, var = rows.mean(-1, keepdim=True), rows.var(-1, unbiased=False, keepdim=True)
            R = (rows - mu) / torch.sqrt(var + 1e-6) * w["row_norm.weight"] + w["row_norm.bias"]
            q, k, v = hv @ w["W_q.weight"].T, R @ w["W_k.weight"].T, R @ w["W_v.weight"].T
            heads = []
            for j in range(HEADS):
                sl = slice(j * hd, (j + 1) * hd)
                qj = q[sl] / torch.sqrt((q[sl] ** 2).mean() + 1e-6) * w["q_norm.weight"]
                kj = k[:, sl] / torch.sqrt((k[:, sl] ** 2).mean(-1, keepdim=True) + 1e-6)
                kj = kj * w["k_norm.weight"]
                a = torch.softmax(kj @ qj / math.sqrt(hd) + 0.7 * s, dim=0)
                heads.append(a @ v[:, sl])
            expected[b, t] = math.tanh(0.4) * (torch.cat(heads) @ w["W_o.weight"].T)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.attn.sum(-1), torch.ones(B, T, HEADS))


def test_closed_gate_gives_exactly_zero_but_gradient_reaches_gate():
    inj = make()
    assert torch.equal(make().xattn.W_o.weight, inj.xattn.W_o.weight)  # deterministic
    assert inj.xattn.W_o.weight.abs().sum() > 0  # re-initialised by the wrapper
    assert torch.equal(EngramCrossAttention(D, E, HEADS).W_o.weight, torch.zeros(D, D))
    h, table = inputs()
    out, _ = inj(h, table)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert inj.gate.grad.abs() > 0
    assert torch.equal(inj.xattn.W_o.weight.grad, torch.zeros(D, D))


def test_retrieval_bias_is_the_only_gradient_path_into_W_r():
    for bias, expect_grad in ((1.0, True), (0.0, False)):
        inj = make(retrieval_bias=bias, gate_init=0.5)
        h, table = inputs()
        out, _ = inj(h, table)
        (out ** 2).sum().backward()
        assert (inj.xattn.W_r.weight.grad.abs().sum() > 0) == expect_grad


def test_q_diversity_uniform_usage_is_one():
    N = 6
    inj = make(top_k=N)  # every position retrieves every row once
    h, table = inputs(N=N)
    qd = inj.xattn(h, table).qd
    torch.testing.assert_close(qd, torch.tensor(1.0))


def _aligned_setup(N, S, top_k):
    """W_r rank one (r ∝ +u for these h); rows 0..S-1 close to u, the rest opposite."""
    inj = make(top_k=top_k)
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(E, generator=g), torch.randn(D, generator=g)
    with torch.no_grad():
        inj.xattn.W_r.weight.copy_(torch.outer(u, v))
    h = torch.randn(2, 5, D, generator=g)
    h = h - (h @ v)[..., None] * v / (v @ v) + v  # ⟨v, h⟩ = ⟨v, v⟩ > 0
    table = -u.repeat(N, 1)
    table[:S] = u + 0.01 * torch.randn(S, E, generator=g)
    return inj, h, table


def test_q_diversity_collapse_is_N_and_S_row_usage_is_N_over_S():
    N = 10
    inj, h, table = _aligned_setup(N, S=1, top_k=1)
    x = inj.xattn(h, table)
    assert torch.equal(x.indices, torch.zeros_like(x.indices))
    torch.testing.assert_close(x.qd, torch.tensor(float(N)))
    inj, h, table = _aligned_setup(N, S=4, top_k=4)
    x = inj.xattn(h, table)
    assert set(x.indices.unique().tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(x.qd, torch.tensor(N / 4))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(3, 30))
def test_v_contrast_is_bounded(seed, N):
    inj = make(seed=seed % 1000)
    h, table = inputs(seed=seed, N=N)
    vc = inj.xattn(h, table, vcontrast=True, generator=torch.Generator().manual_seed(seed)).vc
    assert 0.0 <= vc.item() <= 1.0 + 1e-6


def test_v_contrast_is_one_when_all_rows_are_identical_and_reproducible():
    inj = make()
    h, table = inputs()
    same = table[:1].repeat(table.shape[0], 1)
    vc = inj.xattn(h, same, vcontrast=True).vc
    torch.testing.assert_close(vc, torch.tensor(1.0))
    a = inj.xattn(h, table, vcontrast=True, generator=torch.Generator().manual_seed(3)).vc
    b = inj.xattn(h, table, vcontrast=True, generator=torch.Generator().manual_seed(3)).vc
    assert torch.equal(a, b) and a.item() < 1.0
    assert inj.xattn(h, table).vc is None


def test_runs_under_bf16_autocast_with_float32_retrieval():
    inj = make(gate_init=0.3)
    h, table = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, x = inj(h, table)
    assert out.dtype == torch.bfloat16 and x.sims.dtype == torch.float32
    assert x.indices.dtype == torch.int64 and x.attn.shape == (2, 5, HEADS, 3)


U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits)


def rerank_bound(engram_dim: int, bf16_output: bool) -> float:
    """retrieve's bound δ on |bf16 score − exact|, float32 accumulation included."""
    delta = 2 * U + U * U + engram_dim * 2.0 ** -24
    return delta + U * (1 + delta) if bf16_output else delta


def check_bf16_rerank(xa, h, table, delta):
    """xa.retrieve(h, table) (h [B, T, d], table [N, E], N > k) against float64 cosines → the
    [B, T] mask of certified positions, where it must equal the float64 top-k.

    Always: sims sorted descending, each its row's cosine; a missed row costs ≤ 2δ. Certified:
    at most k' rows within 2δ of the exact k-th (then every true top-k row is a candidate: one
    left out has k' candidates scoring ≥ it in bf16, hence ≥ it − 2δ exactly) and the first
    k + 1 exact scores apart by more than float32 resolution.
    """
    k = xa.top_k
    kc = min(table.shape[0], k + max(k, 8))
    indices, sims = xa.retrieve(h, table)
    r = h.double() @ xa.W_r.weight.detach().double().T
    cos = F.normalize(r, dim=-1) @ F.normalize(table.double(), dim=-1).T  # [B, T, N]
    got = cos.gather(-1, indices)
    assert (sims[..., :-1] >= sims[..., 1:]).all()
    torch.testing.assert_close(sims.double(), got, rtol=0, atol=1e-5)
    ranked = cos.sort(dim=-1, descending=True).values
    s_k = ranked[..., k - 1]
    assert (got[..., -1] >= s_k - 2 * delta - 1e-6).all()
    near = (cos >= (s_k - 2 * delta - 1e-6)[..., None]).sum(dim=-1)
    gaps = (ranked[..., :k] - ranked[..., 1:k + 1]).amin(dim=-1)
    certified = (near <= kc) & (gaps > 1e-5)
    assert torch.equal(indices[certified], cos.topk(k, dim=-1).indices[certified])
    return certified


def make_mode(similarity, top_k=3, seed=0, gate_init=0.5):
    torch.manual_seed(seed)
    return GatedEngramInjection(EngramCrossAttention(D, E, HEADS, top_k, similarity=similarity),
                                gate_init=gate_init)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(0, 300), st.integers(1, 3),
       st.integers(1, 6), st.sampled_from([1.0, 0.02]))
def test_bf16_rerank_is_the_float64_top_k_where_certified(seed, k, extra, B, T, spread):
    """N from k' to k' + 300 rows; spread 0.02 clusters the rows so that scores nearly tie."""
    xa = make_mode("bf16-rerank", top_k=k, seed=seed % 1000).xattn
    h, table = inputs(seed=seed, N=k + max(k, 8) + extra, B=B, T=T)
    table = table[:1] + spread * table
    certified = check_bf16_rerank(xa, h, table, rerank_bound(E, bf16_output=True))
    if spread == 1.0:
        assert certified.any()


def test_bf16_rerank_equals_float32_indices_and_W_r_gradients_when_scores_are_separated():
    """Rows at cosines 0.95, 0.9, … to a direction u with r ≈ u: gaps ≫ 2δ, so the same indices
    (the three best rows) and the same W_r gradient as similarity="float32"."""
    g = torch.Generator().manual_seed(11)
    N = 40
    u = F.normalize(torch.randn(E, generator=g), dim=0)
    c = torch.linspace(0.95, -0.9, N)[:, None]  # steps of 0.047
    w = torch.randn(N, E, generator=g)
    w = F.normalize(w - (w @ u)[:, None] * u, dim=-1)  # ⟂ u
    perm = torch.randperm(N, generator=g)
    table = (c * u + (1 - c ** 2).sqrt() * w)[perm]  # old row j at index perm.argsort()[j]
    v = torch.randn(D, generator=g)
    h = torch.randn(2, 5, D, generator=g)
    h = h - (h @ v)[..., None] * v / (v @ v) + v  # ⟨v, h⟩ = ⟨v, v⟩ > 0
    W_r = torch.outer(u, v) + 0.002 * torch.randn(E, D, generator=g)
    grads, indices = [], []
    for mode in ("float32", "bf16-rerank"):
        inj = make_mode(mode)
        with torch.no_grad():
            inj.xattn.W_r.weight.copy_(W_r)
        out, x = inj(h, table)
        (out ** 2).sum().backward()
        grads.append(inj.xattn.W_r.weight.grad)
        indices.append(x.indices)
    assert torch.equal(indices[0], perm.argsort()[:3].expand(2, 5, 3))
    assert torch.equal(indices[1], indices[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_auto_similarity_is_bf16_rerank_on_cuda_and_float32_elsewhere(device):
    g = torch.Generator().manual_seed(5)
    h, table = torch.randn(2, 64, D, generator=g).to(device), torch.randn(300, E, generator=g).to(device)
    picked = {}
    for mode in ("auto", "float32", "bf16-rerank"):
        torch.manual_seed(0)
        xa = EngramCrossAttention(D, E, HEADS, 4, similarity=mode).to(device)
        picked[mode] = xa.retrieve(h, table)
    expected = picked["bf16-rerank" if device == "cuda" else "float32"]
    for got, want in zip(picked["auto"], expected):
        assert torch.equal(got, want)


def test_unknown_similarity_is_an_input_error():
    with pytest.raises(InputError, match="'float32'.*'bf16-rerank'.*'autocast'"):
        EngramCrossAttention(D, E, HEADS, similarity="bf16")


@pytest.mark.cuda
def test_bf16_rerank_on_cuda_at_zeb139_dimensions():
    """The float32-output (mm out_dtype) path: d 512, E 128, k 8, N 10,000, 4 × 256 positions.
    The certified share is ≈ 0.73 for these random rows (measured in float64 on the CPU)."""
    torch.manual_seed(0)
    xa = EngramCrossAttention(512, 128, 8, 8, similarity="bf16-rerank").cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4, 256, 512, device="cuda", generator=g)
    table = torch.randn(10_000, 128, device="cuda", generator=g)
    certified = check_bf16_rerank(xa, h, table, rerank_bound(128, bf16_output=False))
    assert certified.float().mean() > 0.5
