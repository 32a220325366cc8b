"""The student backbone: a pre-norm grouped-query transformer with Block Attention Residuals.

Reference: zeb139-experiment.md §1.1 (HarmonyModel, preset `tiny`).

    tokens [B, T] → embed → for each layer i:
        (block mixing if i starts a block > 0) → layer i → after_layer(i, h) → (store summary
        if layer i ends a block)
    → h [B, T, d]          (Backbone.forward: the hidden state BEFORE the final norm)
    logits = final_norm(h) · Eᵀ   (Backbone.logits: the LM head is the tied embedding E)

Each layer: h ← h + attn(norm(h)); h ← h + mlp(norm(h)). Attention is causal GQA with QK-norm
(RMSNorm over head_dim) applied before rotate-half RoPE; the MLP is SwiGLU; nothing has a bias.

The reference model also always builds a legacy "gated residual" engram module (133,632 params)
that only fires when hashed embeddings are passed in, which never happens in these experiments.
It is inert, so it is left out here: the `tiny` backbone has 39,459,840 parameters, not
39,593,472.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.errors import InputError


@dataclass
class BackboneConfig:
    vocab_size: int = 32000
    hidden_dim: int = 512
    num_layers: int = 8
    num_query_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1365
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_seq_len: int = 4096
    layers_per_block: int = 2

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if f.type == "int" and not (number and isinstance(value, int) and value >= 1):
                problems.append(f"{f.name} must be a positive integer, got {value!r}")
            elif f.type == "float" and not (number and value > 0):
                problems.append(f"{f.name} must be a positive number, got {value!r}")
            elif f.type == "float":
                setattr(self, f.name, float(value))
        if not problems:
            if self.num_query_heads % self.num_kv_heads:
                problems.append(f"num_query_heads ({self.num_query_heads}) must be a multiple "
                                f"of num_kv_heads ({self.num_kv_heads})")
            if self.head_dim % 2:
                problems.append(f"head_dim ({self.head_dim}) must be even for rotate-half RoPE")
            if self.num_layers % self.layers_per_block:
                problems.append(f"num_layers ({self.num_layers}) must be a multiple of "
                                f"layers_per_block ({self.layers_per_block})")
        if problems:
            raise InputError("Invalid backbone config: " + "; ".join(problems) + ".")

    @property
    def num_blocks(self) -> int:
        return self.num_layers // self.layers_per_block

    def num_parameters(self) -> int:
        """The Backbone's parameter count from the shapes alone (no tensors are built: `ablate plan`
        runs before any model exists); tests pin it to a built Backbone's."""
        d, hd = self.hidden_dim, self.head_dim
        attention = d * hd * 2 * (self.num_query_heads + self.num_kv_heads) + 2 * hd  # q, k, v, o; QK-norms
        layer = 2 * d + attention + 3 * d * self.ffn_dim  # two RMSNorms, attention, SwiGLU
        return self.vocab_size * d + self.num_layers * layer + (self.num_blocks - 1) * d + d

    def rope_elements(self) -> int:
        """Elements of the RoPE cos and sin buffers together, [max_seq_len, head_dim/2] each."""
        return 2 * self.max_seq_len * (self.head_dim // 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"Unknown backbone config key(s) {unknown}; the known keys are "
                             f"{sorted(known)}. Remove or rename them.")
        return cls(**d)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x², last dim) + eps) · scale. Half precision is computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim/2] float32 of position·θ^(−2j/head_dim), computed in
    `dtype`: float64 (ablate's default), or float32 as the reference does (§11.4: logits move by
    ≈1e-5 at T = 2048)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=dtype), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [B, H, T, D]; cos, sin [T, D/2]. Pairs (x[j], x[j + D/2])."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with QK-norm before RoPE. [B, T, d] → [B, T, d]."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        d, hd = config.hidden_dim, config.head_dim
        self.num_query_heads, self.num_kv_heads, self.head_dim = (
            config.num_query_heads, config.num_kv_heads, hd)
        self.q_proj = nn.Linear(d, config.num_query_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_query_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps)
        self.k_norm = RMSNorm(hd, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_query_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = self.num_query_heads // self.num_kv_heads  # query head j reads kv head j // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)). [B, T, d] → [B, T, d]."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.hidden_dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerLayer(nn.Module):
    """Pre-norm layer: h + attn(norm(h)), then + mlp(norm(h)). [B, T, d] → [B, T, d]."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


def mix_blocks(summaries: list[torch.Tensor], h: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Block Attention Residuals: softmax-weighted sum over candidates {summaries..., h}.

    summaries: each [B, T, d]; h [B, T, d]; query [d]. The weight of candidate c at a position
    is softmax_c(⟨c, query⟩ / √d). Returns [B, T, d].
    """
    candidates = torch.stack([*summaries, h], dim=-2)  # [B, T, C, d]
    scores = (candidates * query).sum(dim=-1) / math.sqrt(h.shape[-1])  # [B, T, C]
    weights = scores.softmax(dim=-1).unsqueeze(-1)
    return (weights * candidates).sum(dim=-2).to(h.dtype)


AfterLayer = Callable[[int, torch.Tensor], torch.Tensor]


class Prefix(NamedTuple):
    """The frozen layers 0..layer of one batch (Backbone.prefix): h after layer `layer` (before its
    after_layer hook) and the block summaries stored before it."""

    layer: int
    h: torch.Tensor  # [B, T, d]
    summaries: tuple[torch.Tensor, ...]


class Backbone(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.embed = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.block_queries = nn.Parameter(torch.randn(config.num_blocks - 1, d) / math.sqrt(d))
        self.final_norm = RMSNorm(d, config.norm_eps)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear ~ N(0, 1/fan_in); then the embedding (= LM head) ~ N(0, 1/d), last."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        nn.init.normal_(self.embed.weight, std=self.config.hidden_dim ** -0.5)

    def use_float32_rope(self) -> None:
        """Recompute the RoPE tables in float32, as the reference does (numerics = "upstream")."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, torch.float32)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The tied LM head [V, d]: the embedding matrix itself."""
        return self.embed.weight

    def forward(self, tokens: torch.Tensor, after_layer: AfterLayer | None = None,
                start: Prefix | None = None) -> torch.Tensor:
        """tokens [B, T] int64 → final hidden state [B, T, d] before the final norm.

        after_layer(i, h) runs after layer i and before that layer's block-summary store; its
        return value becomes the new h (the hook engram injections use).
        start: `prefix(tokens, start.layer)`, computed before (a fused group's, its rows repeated per
        cell): layers 0..start.layer are not run again; after_layer runs from start.layer on.
        """
        cos, sin = self._rope(tokens.shape[1])
        if start is None:
            return self._run(self.embed(tokens), [], 0, len(self.layers), after_layer, cos, sin)
        h, summaries = start.h, list(start.summaries)
        h = after_layer(start.layer, h) if after_layer is not None else h
        if (start.layer + 1) % self.config.layers_per_block == 0:
            summaries.append(h)
        return self._run(h, summaries, start.layer + 1, len(self.layers), after_layer, cos, sin)

    def prefix(self, tokens: torch.Tensor, layer: int) -> Prefix:
        """Layers 0..layer on tokens [B, T] without any after_layer hook, stopping before layer
        `layer`'s hook and summary store: what forward(tokens, after_layer, start=…) continues from."""
        cos, sin = self._rope(tokens.shape[1])
        summaries: list[torch.Tensor] = []
        h = self._run(self.embed(tokens), summaries, 0, layer, None, cos, sin)
        return Prefix(layer, self._layer(layer, h, summaries, cos, sin), tuple(summaries))

    def _rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.config.max_seq_len:
            raise InputError(f"Sequence length {T} exceeds the backbone's max_seq_len "
                             f"{self.config.max_seq_len}; use shorter sequences.")
        return self.rope_cos[:T], self.rope_sin[:T]

    def _layer(self, i: int, h: torch.Tensor, summaries: list[torch.Tensor], cos, sin) -> torch.Tensor:
        """Layer i on h [B, T, d], after mixing the block summaries in where a block starts."""
        if i > 0 and i % self.config.layers_per_block == 0:
            h = mix_blocks(summaries, h, self.block_queries[i // self.config.layers_per_block - 1])
        return self.layers[i](h, cos, sin)

    def _run(self, h: torch.Tensor, summaries: list[torch.Tensor], first: int, stop: int,
             after_layer: AfterLayer | None, cos, sin) -> torch.Tensor:
        """Layers first..stop-1 on h, each followed by its hook and, at a block's end, its summary store
        (appended to `summaries`)."""
        for i in range(first, stop):
            h = self._layer(i, h, summaries, cos, sin)
            if after_layer is not None:
                h = after_layer(i, h)
            if (i + 1) % self.config.layers_per_block == 0:
                summaries.append(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] → final_norm(h) · Eᵀ [B, T, V]."""
        return F.linear(self.final_norm(h), self.embed.weight)
