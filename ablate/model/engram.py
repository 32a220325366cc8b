"""Engram cross-attention over a fixed oracle table, its gated injection, and two aux losses.

Reference: zeb139-experiment.md §2.3–2.6. Per position, with h [B, T, d] and table [N, E]:

    r = W_r h;  s = cos(r, table rows) → top-k indices I [B, T, k] and their similarities s
    R = LayerNorm_E(table[I]);  Q = RMSNorm(W_q h), K = RMSNorm(W_k R), V = W_v R   (per head)
    attn = softmax_k(⟨Q, K⟩/√head_dim + β·s);  out = W_o concat_heads(Σ_k attn V)

The top-k choice is not differentiable; β·s is the only path by which W_r gets gradient. The
similarity search runs in float32 even under autocast, so bf16 rounding cannot reorder the
top-k; the full [B, T, N] similarity lives only inside a no-grad region and the k winning
similarities are recomputed with gradient. `similarity="bf16-rerank"` runs that search in
bfloat16 and re-ranks its best k + max(k, 8) candidates by their exact float32 cosines: the
float32 top-k unless a row's exact score lies within ≈2⁻⁶ of the k-th (bound in `retrieve`).
`similarity="auto"` (the spec's default, model.similarity) is "bf16-rerank" on CUDA and "float32"
elsewhere.
`similarity="autocast"` (numerics = "upstream")
computes the cosines in the autocast dtype as the reference does (§11.4: under bf16 another
top-8 set at ≈14% of positions) and keeps the k winners of that [B, T, N] tensor with gradient.

⟨Q, K⟩ and Σ_k attn·V run over k ≤ 16 rows per position: they are written as broadcast
products summed over one axis, which torch.compile fuses into one pass over K and V, instead of
B·T·H batched 1×D·D×k matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.errors import InputError
from ablate.model.backbone import RMSNorm
from ablate.model.search import top_indices


@dataclass
class XAttnOut:
    out: torch.Tensor  # [B, T, d] pre-gate output
    indices: torch.Tensor  # [B, T, k] int64 retrieved table rows
    sims: torch.Tensor  # [B, T, k] cosine similarities of the retrieved rows
    attn: torch.Tensor  # [B, T, H, k] attention weights
    vc: torch.Tensor | None  # scalar V-contrast loss (§2.5), when requested
    qd: torch.Tensor  # scalar Q-diversity loss (§2.6)


def q_diversity(indices: torch.Tensor, attn: torch.Tensor, num_rows: int) -> torch.Tensor:
    """N · Σ_i f[i]·P[i]. indices [B, T, k]; attn [B, T, H, k] → scalar.

    f[i] = share of the B·T·k retrievals that picked row i (no gradient); P[i] = attention mass
    on row i summed over heads, divided by B·T·H. 1 for uniform usage, N for one-row collapse.
    """
    flat = indices.reshape(-1)
    # index_add of ones, not bincount: bincount reads the largest index back to the host.
    counts = torch.zeros(num_rows, dtype=torch.int64, device=flat.device)
    f = counts.index_add_(0, flat, torch.ones_like(flat)).float() / flat.numel()
    mass = attn.float().sum(dim=2).reshape(-1)  # [B·T·k], summed over heads
    positions, num_heads = indices[..., 0].numel(), attn.shape[2]
    P = torch.zeros(num_rows, device=mass.device).index_add(0, flat, mass)
    P = P / (positions * num_heads)
    return num_rows * (f * P).sum()


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def v_contrast(out: torch.Tensor, out_swapped: torch.Tensor) -> torch.Tensor:
    """Mean over positions of cos(out, out_swapped)². [B, T, d] twice → scalar in [0, 1]."""
    return F.cosine_similarity(out.float(), out_swapped.float(), dim=-1).pow(2).mean()


class EngramCrossAttention(nn.Module):
    def __init__(self, hidden_dim: int, engram_dim: int, num_heads: int = 8, top_k: int = 8,
                 retrieval_bias: float = 1.0, similarity: str = "float32"):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_dim // num_heads
        self.top_k, self.retrieval_bias = top_k, retrieval_bias
        if similarity not in ("auto", "float32", "bf16-rerank", "autocast"):
            raise InputError(f"Unknown engram similarity {similarity!r}; use 'auto', 'float32' (exact), "
                             "'bf16-rerank' or 'autocast' (the reference's).")
        self.similarity = similarity  # "auto" | "float32" (exact) | "bf16-rerank" | "autocast"
        self.W_r = nn.Linear(hidden_dim, engram_dim, bias=False)
        self.row_norm = nn.LayerNorm(engram_dim, eps=1e-6)
        self.W_q = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.W_k = nn.Linear(engram_dim, hidden_dim, bias=False)
        self.W_v = nn.Linear(engram_dim, hidden_dim, bias=False)
        self.W_o = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, 1e-6)
        self.k_norm = RMSNorm(self.head_dim, 1e-6)
        nn.init.zeros_(self.W_o.weight)  # the ungated module is a no-op at step 0 (§2.3)

    def retrieve(self, h: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, d], table [N, E] → (indices [B, T, k] int64, sims [B, T, k] float32, or the
        autocast dtype with similarity="autocast").

        "float32" (exact): top-k of the float32 [B, T, N] cosines. "bf16-rerank": unit r and
        rows rounded to bfloat16, their [B, T, N] scores (float32 output through torch.mm's
        out_dtype on CUDA, bfloat16 elsewhere), the top-k' candidates (ablate.model.search.top_indices),
        k' = min(N, k + max(k, 8)), then the top-k of those by float32 cosine, sorted descending.

        Bound: rounding to bf16 (8 significant bits) costs each element a relative u = 2⁻⁸, so
        for unit vectors (Cauchy–Schwarz) |bf16 score − exact| ≤ δ = 2u + u² ≈ 2⁻⁷, plus the
        float32 accumulation (≲ E·2⁻²⁴) and, for a bfloat16 output, u·|score|. A row outside the
        candidates has bf16 score ≤ m, the smallest candidate's, so exact score ≤ m + δ: the
        result is the exact float32 top-k whenever the exact k-th best among the candidates
        exceeds m + δ. Otherwise a row whose exact score lies within 2δ of the returned k-th may
        be missed. The margin: a true top-k row is pushed out of the candidates only by rows whose
        exact score lies within 2δ of its own; max(k, 8) leaves room for that many, at the price
        of a top-k' for a top-k and a [B, T, k', E] gather.

        The k winners' sims are recomputed with gradient by the float32 expression, so the
        gradients equal the "float32" mode's wherever the indices do.
        """
        r = self.W_r(h)
        if self.similarity == "autocast":
            cos = torch.einsum("btd,nd->btn", F.normalize(r, dim=-1, eps=1e-8),
                               F.normalize(table, dim=-1, eps=1e-8))
            best = cos.topk(self.top_k, dim=-1)
            return best.indices, best.values
        with torch.autocast(device_type=h.device.type, enabled=False):
            r = F.normalize(r.float(), dim=-1, eps=1e-8)
            rows = F.normalize(table.float(), dim=-1, eps=1e-8)
            with torch.no_grad():
                if self.similarity == "bf16-rerank" or (self.similarity == "auto" and r.device.type == "cuda"):
                    N = rows.shape[0]
                    r16, rows16 = r.bfloat16(), rows.bfloat16()
                    if r.device.type == "cuda":  # mm's out_dtype: bf16 inputs, float32 output
                        scores = torch.mm(r16.reshape(-1, r16.shape[-1]), rows16.T,
                                          out_dtype=torch.float32).reshape(*r.shape[:-1], N)
                    else:
                        scores = r16 @ rows16.T
                    cand = top_indices(scores, min(N, self.top_k + max(self.top_k, 8)))
                    exact = (r.unsqueeze(-2) * rows[cand]).sum(dim=-1)  # [B, T, k']
                    indices = cand.gather(-1, exact.topk(self.top_k, dim=-1).indices)
                else:
                    indices = (r @ rows.T).topk(self.top_k, dim=-1).indices
            sims = (r.unsqueeze(-2) * rows[indices]).sum(dim=-1)
        return indices, sims

    def attend(self, h: torch.Tensor, rows: torch.Tensor,
               sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, d], raw rows [B, T, k, E], sims [B, T, k]
        → (out [B, T, d], attn [B, T, H, k]).

        Rows are LayerNorm-ed here; sims is the additive retrieval bias (scaled by β).
        """
        B, T, _ = h.shape
        H, D, k = self.num_heads, self.head_dim, rows.shape[2]
        rows = self.row_norm(rows)
        q = self.q_norm(self.W_q(h).view(B, T, H, D))
        key = self.k_norm(self.W_k(rows).view(B, T, k, H, D))
        value = self.W_v(rows).view(B, T, k, H, D)
        scores = (_wide(q).unsqueeze(2) * _wide(key)).sum(dim=-1).transpose(2, 3) / math.sqrt(D)
        attn = (scores + self.retrieval_bias * sims.unsqueeze(2)).softmax(dim=-1)  # [B, T, H, k]
        weights = attn.transpose(2, 3).unsqueeze(-1).to(value.dtype)  # [B, T, k, H, 1]
        mixed = (weights * value).sum(dim=2)  # [B, T, H, D]
        return self.W_o(mixed.reshape(B, T, H * D)), attn

    def forward(self, h: torch.Tensor, table: torch.Tensor, *, vcontrast: bool = False,
                generator: torch.Generator | None = None, perm: torch.Tensor | None = None) -> XAttnOut:
        """h [B, T, d], table [N, E] → XAttnOut.

        vcontrast: also run the value-swapped branch (§2.5): a permutation π [N] of the rows
        (`perm` when given, else drawn from `generator`, else from the global RNG), rows
        table[π[I]] at the same indices and the same similarity bias; vc = mean cos(out, out')².
        """
        indices, sims = self.retrieve(h, table)
        out, attn = self.attend(h, table[indices], sims)
        vc = None
        if vcontrast:
            if perm is None:
                perm_device = generator.device if generator is not None else table.device
                perm = torch.randperm(table.shape[0], generator=generator, device=perm_device)
            swapped, _ = self.attend(h, table[perm.to(table.device)[indices]], sims)
            vc = v_contrast(out, swapped)
        return XAttnOut(out=out, indices=indices, sims=sims, attn=attn, vc=vc,
                        qd=q_diversity(indices, attn, table.shape[0]))


class GatedEngramInjection(nn.Module):
    """inj(h) = tanh(gate) · xattn(h).out (§2.4).

    With gate 0 the injection is exactly zero. W_o is re-initialised Xavier-uniform: a zero gate
    and a zero W_o together would leave both without gradient forever.
    """

    def __init__(self, xattn: EngramCrossAttention, gate_init: float = 0.0):
        super().__init__()
        self.xattn = xattn
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        nn.init.xavier_uniform_(xattn.W_o.weight)

    def forward(self, h: torch.Tensor, table: torch.Tensor, *, vcontrast: bool = False,
                generator: torch.Generator | None = None,
                perm: torch.Tensor | None = None) -> tuple[torch.Tensor, XAttnOut]:
        """h [B, T, d], table [N, E] → (inj [B, T, d], XAttnOut). The gate value is cast to the
        injection's dtype so a bf16 activation stays bf16 under autocast."""
        x = self.xattn(h, table, vcontrast=vcontrast, generator=generator, perm=perm)
        return torch.tanh(self.gate).to(x.out.dtype) * x.out, x
