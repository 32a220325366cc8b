"""Logits kept as the two factors of their product, so no [B, T, V] tensor has to exist.

    logits = inputs · weightᵀ      inputs [B, T, d], weight [V, d] (the tied LM head E) → [B, T, V]

The student's LM head and router are both products with E: the merged logits are
(final_norm(h) + α·W_align(e)) · Eᵀ and the router's z_r = (α·W_align(e)) · Eᵀ. The losses in
ablate.training.losses form such logits one chunk of positions at a time (a fused loss head);
`materialize()` forms the whole tensor for code that needs it (probes, plugin objectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearLogits:
    """inputs [..., d] (already in the dtype the product runs in), weight [V, d]."""

    inputs: torch.Tensor
    weight: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.inputs.shape[:-1], self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def materialize(self) -> torch.Tensor:
        """The whole product [..., V] in the inputs' dtype."""
        return _product(self.inputs, self.weight)


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., d] · weightᵀ [d, V] in x's dtype."""
    return F.linear(x, weight.to(x.dtype))


Logits = torch.Tensor | LinearLogits  # [B, T, V], whole or as a product


def logit_rows(logits: Logits, start: int, stop: int) -> torch.Tensor:
    """Positions start..stop of the flattened logits: [stop − start, V], formed from the factors
    (in the inputs' dtype) when they are a LinearLogits."""
    if isinstance(logits, LinearLogits):
        return _product(logits.inputs.reshape(-1, logits.inputs.shape[-1])[start:stop], logits.weight)
    return logits.reshape(-1, logits.shape[-1])[start:stop]


def as_tensor(logits: Logits) -> torch.Tensor:
    """The [B, T, V] tensor itself, formed from its factors when it is a LinearLogits."""
    return logits.materialize() if isinstance(logits, LinearLogits) else logits


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product on x runs in here: the autocast dtype while autocast is on for
    x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
