"""The cell optimiser (Muon for hidden 2-D weights, Adam for the rest) and the WSD schedule.

Reference §5.2–5.3. Muon is torch's own `torch.optim.Muon`; how it relates to the reference
update (buffer ← 0.95·buffer + grad; X = NS₅(buffer/(‖buffer‖_F + 1e-7)); p ← p − lr·√max(1,
rows/cols)·X):

- Learning-rate scale: `adjust_lr_fn="original"` multiplies lr by √max(1, rows/cols) with
  (rows, cols) = the weight's shape, exactly the reference factor (a 512×128 weight steps ×2).
- Momentum buffer: torch keeps an EMA, buffer ← 0.95·buffer + 0.05·grad, i.e. 0.05 × the
  reference buffer at every step (both start at zero). Newton–Schulz first divides by the
  Frobenius norm, so the scale cancels except inside the epsilon guard. Torch also clamps
  (X / max(‖X‖, eps)) where the reference adds (X / (‖X‖ + eps)). We pass eps = 0.05·1e-7 so
  torch's guard acts at the same reference-buffer norm (1e-7). The scale of the normalised
  Newton–Schulz input is then min(1, ‖B‖/1e-7) against the reference's ‖B‖/(‖B‖ + 1e-7) (B =
  reference buffer): identical up to a relative 1e-7/‖B‖ for large buffers, never more than 2×
  apart (at ‖B‖ = 1e-7). torch's default eps = 1e-7 would give min(1, ‖B‖/2e-6), up to 20×
  too small for ‖B‖ < 2e-6 — the regime of W_align's first gradients (§3) — so this
  deliberately departs from passing eps=1e-7.
- Precision: torch runs the Newton–Schulz iterations in bfloat16 and adds the bf16 update to the
  fp32 weight. The reference runs them in float32 (reference §11.4: ≈2% relative difference per
  update); `numerics = "upstream"` uses `ReferenceMuon`, the reference's update exactly as §5.2
  writes it, in float32 (torch.optim.Muon has no float32 Newton–Schulz, hence our own).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ablate.errors import InputError

MUON_MOMENTUM = 0.95
MUON_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
MUON_NS_STEPS = 5
REFERENCE_NS_EPS = 1e-7  # the reference's "+ 1e-7" on the reference (un-averaged) buffer
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8

_ADAM_NAME_MARKERS = ("embed", "norm", "lm_head")


def partition(named_params: Iterable[tuple[str, nn.Parameter]]
              ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split (name, parameter) pairs into (muon_params, adam_params) (§5.2).

    2-D weights whose name contains none of "embed", "norm", "lm_head" go to Muon; everything
    else (gate scalars, log_alpha, norm weights and biases, embeddings) goes to Adam.
    """
    muon, adam = [], []
    for name, param in named_params:
        lowered = name.lower()
        if param.ndim == 2 and not any(marker in lowered for marker in _ADAM_NAME_MARKERS):
            muon.append(param)
        else:
            adam.append(param)
    return muon, adam


def newton_schulz(buffer: torch.Tensor, steps: int = MUON_NS_STEPS, eps: float = REFERENCE_NS_EPS) -> torch.Tensor:
    """The reference's orthogonalisation of a 2-D buffer [rows, cols], in the buffer's dtype: a
    tall matrix is transposed, X ← X/(‖X‖_F + eps), then `steps` times X ← aX + b(XXᵀ)X + c(XXᵀ)²X."""
    a, b, c = MUON_NS_COEFFICIENTS
    tall = buffer.shape[0] > buffer.shape[1]
    x = buffer.mT if tall else buffer
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class ReferenceMuon(torch.optim.Optimizer):
    """Muon as the reference runs it (§5.2, §11.4), in float32: buffer ← 0.95·buffer + grad;
    p ← p − lr·√max(1, rows/cols)·NS₅(buffer). No Nesterov, no weight decay."""

    def __init__(self, params, lr: float, momentum: float = MUON_MOMENTUM):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad.float())
                scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                p.add_(newton_schulz(buffer).to(p.dtype), alpha=-group["lr"] * scale)


class CellOptimizer:
    """Muon + Adam sharing one learning rate, driven as one optimiser.

    named_params: (name, parameter) pairs of the trainable parameters (see `partition`).
    numerics: "ablate" (torch.optim.Muon, bf16 Newton–Schulz) or "upstream" (ReferenceMuon).
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], lr: float, numerics: str = "ablate"):
        muon_params, adam_params = partition(named_params)
        if not muon_params and not adam_params:
            raise InputError(
                "the cell optimiser got no trainable parameters; check that the student "
                "exposes its engram parameters through trainable_named_parameters()."
            )
        if not muon_params:
            self.muon = None
        elif numerics == "upstream":
            self.muon = ReferenceMuon(muon_params, lr=lr)
        else:
            self.muon = torch.optim.Muon(
                muon_params, lr=lr, momentum=MUON_MOMENTUM, nesterov=False, weight_decay=0.0,
                ns_coefficients=MUON_NS_COEFFICIENTS, eps=(1 - MUON_MOMENTUM) * REFERENCE_NS_EPS,
                ns_steps=MUON_NS_STEPS, adjust_lr_fn="original",
            )
        self.adam = torch.optim.Adam(
            adam_params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
        ) if adam_params else None

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.muon, self.adam) if opt is not None]

    def set_lr(self, lr: float) -> None:
        for opt in self._optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for opt in self._optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict() if self.muon else None,
                "adam": self.adam.state_dict() if self.adam else None}

    def load_state_dict(self, state: dict) -> None:
        for key, opt in (("muon", self.muon), ("adam", self.adam)):
            saved = state.get(key)
            if (saved is None) != (opt is None):
                raise InputError(
                    f"the saved optimiser state has {'no' if saved is None else 'a'} {key} "
                    f"group but this student has {'none' if opt is None else 'one'}; resume "
                    "with the same model configuration that wrote the checkpoint."
                )
            if opt is not None:
                opt.load_state_dict(saved)


def wsd_multiplier(step: int, total: int, warmup: int, decay_frac: float = 0.1) -> float:
    """Warmup–stable–decay lr multiplier (§5.3).

    step/warmup while step < warmup (so step 0 uses lr 0); 1 until
    decay_start = total − ⌊decay_frac·total⌋; then 1 − (step − decay_start)/(total − decay_start);
    never below 0.
    """
    if step < warmup:
        return step / warmup
    decay_start = total - math.floor(decay_frac * total)
    if step < decay_start:
        return 1.0
    if decay_start >= total:  # no decay phase: past the end
        return 0.0
    return max(0.0, 1.0 - (step - decay_start) / (total - decay_start))
