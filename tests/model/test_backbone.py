import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.errors import InputError
from ablate.model.backbone import (
    Attention, Backbone, BackboneConfig, RMSNorm, TransformerLayer, apply_rope, rope_tables,
)

SMALL = dict(vocab_size=128, hidden_dim=64, num_layers=4, num_query_heads=4, num_kv_heads=2,
             head_dim=16, ffn_dim=96, max_seq_len=32, layers_per_block=2)


def small(**overrides) -> Backbone:
    torch.manual_seed(0)
    return Backbone(BackboneConfig(**{**SMALL, **overrides}))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_parameter_counts_match_reference_table():
    # Reference §1.2: backbone 39,593,472 includes the inert legacy module (133,632), left out.
    with torch.device("meta"):
        backbone = Backbone(BackboneConfig())
        layer = TransformerLayer(BackboneConfig())
    assert count(backbone) == 39_593_472 - 133_632
    assert count(layer) == 2_884_224
    assert backbone.embed.weight.numel() == 16_384_000
    assert backbone.block_queries.shape == (3, 512)


def test_config_round_trip_and_unknown_keys():
    cfg = BackboneConfig(**SMALL)
    assert BackboneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="bogus"):
        BackboneConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("bad", [dict(num_kv_heads=3), dict(head_dim=15), dict(num_layers=3),
                                 dict(hidden_dim=0), dict(norm_eps=-1.0)])
def test_config_rejects_inconsistent_shapes(bad):
    with pytest.raises(InputError):
        BackboneConfig(**{**SMALL, **bad})


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.floats(1e-8, 1e-2), st.integers(0, 2**31 - 1))
def test_rmsnorm_matches_float64_formula(dim_half, eps, seed):
    g = torch.Generator().manual_seed(seed)
    dim = 2 * dim_half
    x = torch.randn(3, 5, dim, generator=g)
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
    x64, w64 = x.double(), norm.weight.detach().double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + eps) * w64
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 16), st.integers(1, 40), st.sampled_from([1e4, 1e6]),
       st.integers(0, 2**31 - 1))
def test_rope_matches_complex_rotation(half, T, theta, seed):
    head_dim = 2 * half
    x = torch.randn(2, 3, T, head_dim, generator=torch.Generator().manual_seed(seed))
    cos, sin = rope_tables(head_dim, T, theta)
    got = apply_rope(x, cos, sin)
    # pair j ↔ (x[j], x[j+half]) as a complex number, rotated by pos · θ^(−2j/head_dim)
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freq = torch.tensor([theta ** (-2 * j / head_dim) for j in range(half)], dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_matches_explicit_gqa_reference():
    torch.manual_seed(1)
    cfg = BackboneConfig(**SMALL)
    attn = Attention(cfg).double()
    T = 7
    x = torch.randn(2, T, cfg.hidden_dim, dtype=torch.float64)
    cos, sin = rope_tables(cfg.head_dim, T, cfg.rope_theta)
    got = attn(x, cos.double(), sin.double())

    def qk_norm(t, w):
        return t / torch.sqrt((t ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(t):  # t [T, D], explicit per-position 2-D rotations
        half = cfg.head_dim // 2
        out = torch.empty_like(t)
        for p in range(T):
            for j in range(half):
                a = p * cfg.rope_theta ** (-2 * j / cfg.head_dim)
                out[p, j] = t[p, j] * math.cos(a) - t[p, j + half] * math.sin(a)
                out[p, j + half] = t[p, j + half] * math.cos(a) + t[p, j] * math.sin(a)
        return out

    hd, groups = cfg.head_dim, cfg.num_query_heads // cfg.num_kv_heads
    Wq, Wk, Wv, Wo = (m.weight.detach()
                      for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    qw, kw = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
    expected = torch.zeros_like(got)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for b in range(2):
        heads = []
        for j in range(cfg.num_query_heads):
            kv = j // groups
            q = rope(qk_norm(x[b] @ Wq[j * hd:(j + 1) * hd].T, qw))
            k = rope(qk_norm(x[b] @ Wk[kv * hd:(kv + 1) * hd].T, kw))
            v = x[b] @ Wv[kv * hd:(kv + 1) * hd].T
            scores = (q @ k.T / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        expected[b] = torch.cat(heads, dim=-1) @ Wo.T
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # float32 RoPE tables


def test_causality():
    backbone = small().eval()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    t = 6
    changed[:, t] = (changed[:, t] + 1) % 128
    with torch.no_grad():
        a, b = backbone(tokens), backbone(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


def test_block_attention_residual_mixing_by_hand():
    # 6 layers, 2 per block: summaries after layers 1 and 3; before layer 4 the input is
    # softmax-weighted over {S1, S3, h=S3} with query block_queries[1].
    backbone = small(num_layers=6).double()
    with torch.no_grad():
        for layer in backbone.layers:  # make every layer the identity
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    d = backbone.config.hidden_dim
    g = torch.Generator().manual_seed(5)
    forced = {i: torch.randn(1, 3, d, generator=g, dtype=torch.float64) for i in range(6)}
    seen = {}

    def after_layer(i, h):
        seen[i] = h
        return forced[i]

    backbone(torch.zeros(1, 3, dtype=torch.long), after_layer)

    def mix(candidates, q):
        out = torch.zeros(3, d, dtype=torch.float64)
        for p in range(3):
            scores = torch.tensor([float(c[0, p] @ q) / math.sqrt(d) for c in candidates])
            w = torch.exp(scores - scores.max())
            w = w / w.sum()
            for c, wc in zip(candidates, w):
                out[p] += wc.item() * c[0, p]
        return out

    q1, q2 = (backbone.block_queries[i].detach() for i in (0, 1))
    torch.testing.assert_close(seen[1][0], forced[0][0])  # inside block 0: no mixing
    torch.testing.assert_close(seen[2][0], mix([forced[1], forced[1]], q1))  # = S1
    torch.testing.assert_close(seen[4][0], mix([forced[1], forced[3], forced[3]], q2))
    torch.testing.assert_close(seen[5][0], forced[4][0])


def test_init_statistics_and_tied_head():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(**{**SMALL, "hidden_dim": 256, "ffn_dim": 512}))
    assert backbone.lm_head_weight is backbone.embed.weight
    assert backbone.embed.weight.var().item() == pytest.approx(1 / 256, rel=0.05)
    mlp = backbone.layers[0].mlp
    assert mlp.down_proj.weight.var().item() == pytest.approx(1 / 512, rel=0.05)
    assert mlp.gate_proj.weight.var().item() == pytest.approx(1 / 256, rel=0.05)
    assert backbone.block_queries.var().item() == pytest.approx(1 / 256, rel=0.3)
    for name, p in backbone.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert set(backbone.state_dict()) == {n for n, _ in backbone.named_parameters()}


def test_logits_use_final_norm_and_tied_embedding():
    backbone = small().double()
    h = torch.randn(2, 5, 64, dtype=torch.float64)
    w = backbone.final_norm.weight.detach()
    normed = h / torch.sqrt((h ** 2).mean(-1, keepdim=True) + 1e-6) * w
    expected = normed @ backbone.embed.weight.detach().T
    torch.testing.assert_close(backbone.logits(h), expected)


def test_sequence_longer_than_max_is_an_input_error():
    with pytest.raises(InputError, match="max_seq_len"):
        small()(torch.zeros(1, 33, dtype=torch.long))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 64), st.integers(1, 3), st.integers(1, 3), st.sampled_from([2, 4, 6]), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 40), st.integers(1, 24))
def test_num_parameters_and_rope_elements_count_a_built_backbone(vocab, blocks, per_block, head_dim, kv_heads,
                                                                 groups, ffn, max_seq_len):
    """BackboneConfig's counts from the shapes (what `ablate plan` uses) equal a built Backbone's
    parameters and RoPE buffers, over random shapes."""
    config = BackboneConfig(vocab_size=vocab, hidden_dim=8 * groups, num_layers=blocks * per_block,
                            num_query_heads=kv_heads * groups, num_kv_heads=kv_heads, head_dim=head_dim,
                            ffn_dim=ffn, max_seq_len=max_seq_len, layers_per_block=per_block)
    with torch.device("meta"):
        backbone = Backbone(config)
    assert config.num_parameters() == sum(p.numel() for p in backbone.parameters())
    assert config.rope_elements() == sum(b.numel() for b in backbone.buffers())
