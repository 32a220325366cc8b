"""The skip-to-logit router (zeb139-experiment.md §3).

    z_r = α · W_align(e) · Eᵀ      e [B, T, d] → z_r [B, T, V],  α = exp(log_alpha)

e is the last injection layer's gated output; E is the live tied embedding / LM-head matrix,
passed in on every call and never registered here (no copy, no training, tying preserved).
W_align starts at exactly zero, so z_r = 0 at step 0 and log_alpha gets no gradient until
W_align moves.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.errors import InputError


class SkipToLogitRouter(nn.Module):
    def __init__(self, hidden_dim: int, alpha_init: float = 0.1):
        super().__init__()
        if not (math.isfinite(alpha_init) and alpha_init > 0):
            raise InputError(f"Router alpha_init must be finite and > 0, got {alpha_init!r}; "
                             "set it to a positive number such as 0.1.")
        self.W_align = nn.Linear(hidden_dim, hidden_dim, bias=False)
        nn.init.zeros_(self.W_align.weight)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha_init)))

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def logits_from_aligned(self, aligned: torch.Tensor,
                            lm_head_weight: torch.Tensor) -> torch.Tensor:
        """aligned = W_align(e) [B, T, d], E [V, d] → α · aligned · Eᵀ [B, T, V]."""
        return self.alpha * F.linear(aligned, lm_head_weight)

    def forward(self, e: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """e [B, T, d], E [V, d] → z_r [B, T, V]."""
        return self.logits_from_aligned(self.W_align(e), lm_head_weight)
