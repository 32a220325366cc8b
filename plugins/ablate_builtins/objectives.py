"""Built-in objectives: CE, and CE blended with a per-token divergence to the sidecar teacher.

Every KL-family objective computes L = (1−λ)·CE + λ·L_div, with L_div a per-token mean over
positions that have a sidecar row (teacher_rows ≥ 0, i.e. p ≥ 2). λ = 0 returns exactly CE
and λ = 1 exactly L_div; the other term is still computed (without a graph) for the log.
Logged terms: "ce" and "kl" (the divergence term L_div that enters the blend, whichever
divergence it is).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ablate.api import (InputError, Objective, ObjectiveBatch, ObjectiveContext, ObjectiveResult, Params, hookimpl,
                        losses)

_MASK_NOTE = "masked per-token mean over positions with a sidecar row (p ≥ 2), denominator max(1, |M|)"
_P_DEFS = "P_r = softmax(z_r[p]), P_t = softmax(S[row(p)]) in fp32"


def _lam_field():
    return Field(alias="lambda", ge=0.0, le=1.0, description="blend weight λ of the divergence term")


class CE(Objective):
    name = "ce"
    accepts_linear_logits = True
    description = "Plain next-token cross-entropy on the merged logits (the router, if any, is not supervised)."

    def formula(self) -> str:
        return "L = CE = −(1/(B·T))·Σ_p log softmax(z[p])[y[p]], mean over all B·T positions"

    def __call__(self, batch: ObjectiveBatch) -> ObjectiveResult:
        ce = losses.cross_entropy(batch.logits, batch.targets)
        return ObjectiveResult(ce, {"ce": ce.detach()})


class _Blend(Objective):
    """(1−λ)·CE + λ·L_div; subclasses implement `divergence` → (Σ w·D, Σ w)."""

    needs_router = True
    needs_sidecar = True
    accepts_linear_logits = True

    def divergence(self, batch: ObjectiveBatch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _teacher_inputs(self, batch: ObjectiveBatch):
        missing = [n for n in ("router_logits", "teacher_rows", "sidecar") if getattr(batch, n) is None]
        if missing:
            raise InputError(f"Objective {self.name!r} needs the router logits, teacher rows and "
                             f"sidecar, but the batch lacks {', '.join(missing)}. Turn the router "
                             f"and the oracle sidecar on for this cell, or use objective 'ce'.")
        return batch.router_logits, batch.sidecar, batch.teacher_rows

    def __call__(self, batch: ObjectiveBatch) -> ObjectiveResult:
        lam = self.params.lam
        self._teacher_inputs(batch)
        if lam == 0.0:
            ce = losses.cross_entropy(batch.logits, batch.targets)
            with torch.no_grad():
                div = losses.masked_mean(*self.divergence(batch))
            loss = ce
        elif lam == 1.0:
            div = losses.masked_mean(*self.divergence(batch))
            with torch.no_grad():
                ce = losses.cross_entropy(batch.logits, batch.targets)
            loss = div
        else:
            ce = losses.cross_entropy(batch.logits, batch.targets)
            div = losses.masked_mean(*self.divergence(batch))
            loss = (1.0 - lam) * ce + lam * div
        return ObjectiveResult(loss, {"ce": ce.detach(), "kl": div.detach()})


class KLCE(_Blend):
    name = "kl_ce"
    description = ("CE blended with the per-token KL between the router distribution and the "
                   "sidecar teacher row (forward = KL(P_router‖P_teacher), the ZEB-139 term).")

    class Params(Params):
        lam: float = _lam_field()
        direction: Literal["forward", "reverse"] = "forward"

    def formula(self) -> str:
        p = self.params
        if p.direction == "forward":
            kl = "KL(P_router‖P_teacher), KL_p = Σ_v P_r(v)·(log P_r(v) − log P_t(v))"
        else:
            kl = "KL(P_teacher‖P_router), KL_p = Σ_v P_t(v)·(log P_t(v) − log P_r(v))"
        return (f"L = (1−λ)·CE + λ·L_KL, λ = {p.lam!r}; L_KL = {kl} ({p.direction}); "
                f"{_P_DEFS}; KL per token, {_MASK_NOTE}")

    def divergence(self, batch):
        z_r, sidecar, rows = self._teacher_inputs(batch)
        return losses.kl_rows(z_r, sidecar, rows, direction=self.params.direction)


class TemperatureKL(_Blend):
    name = "temperature_kl"
    description = ("CE blended with KL(softmax(z_r/T)‖softmax(S/T)), temperature on both sides; "
                   "optionally scaled by T² (classic distillation scaling).")

    class Params(Params):
        lam: float = _lam_field()
        temperature: float = Field(gt=0.0, description="softmax temperature T on router and teacher")
        t2_scale: bool = Field(description="multiply the KL term by T²")

    def formula(self) -> str:
        p = self.params
        scale = "T²·" if p.t2_scale else ""
        note = "T² scaling on" if p.t2_scale else "no T² scaling"
        return (f"L = (1−λ)·CE + λ·{scale}L_KL,T, λ = {p.lam!r}, T = {p.temperature!r} ({note}); "
                f"L_KL,T = KL(softmax(z_r/T)‖softmax(S[row]/T)), KL_p = Σ_v P_r(v)·(log P_r(v) − "
                f"log P_t(v)) with P = softmax(·/T) in fp32; KL per token, {_MASK_NOTE}")

    def divergence(self, batch):
        z_r, sidecar, rows = self._teacher_inputs(batch)
        total, weight = losses.kl_rows(z_r, sidecar, rows, temperature=self.params.temperature)
        if self.params.t2_scale:
            total = total * self.params.temperature ** 2
        return total, weight


class MaskedKL(_Blend):
    name = "masked_kl"
    description = ("CE blended with a frequency-weighted per-token forward KL: positions whose "
                   "current or target token is frequent in the train stream count less.")

    class Params(Params):
        lam: float = _lam_field()
        key: Literal["current", "target"] = Field(
            description="which token's frequency weights position p: input t[p] or target y[p]")
        weighting: Literal["inverse_frequency", "drop_top_k"]
        exponent: float = Field(1.0, ge=0.0, description="inverse_frequency: w = (count+1)^(−exponent)")
        top_k: int = Field(0, ge=0, description="drop_top_k: weight 0 for the top_k most frequent tokens")

        @model_validator(mode="after")
        def _check_weighting(self):
            if self.weighting == "drop_top_k" and self.top_k < 1:
                raise ValueError("weighting='drop_top_k' needs top_k ≥ 1 (how many of the most "
                                 "frequent tokens to drop); set top_k, e.g. top_k: 100")
            if self.weighting == "drop_top_k" and "exponent" in self.model_fields_set:
                raise ValueError("exponent only applies to weighting='inverse_frequency'; remove "
                                 "it or switch the weighting")
            if self.weighting == "inverse_frequency" and "top_k" in self.model_fields_set:
                raise ValueError("top_k only applies to weighting='drop_top_k'; remove it or "
                                 "switch the weighting")
            return self

    def __init__(self, params: Params, ctx: ObjectiveContext):
        super().__init__(params, ctx)
        counts = ctx.token_frequencies.detach().to("cpu", torch.float64)
        if counts.shape != (ctx.vocab_size,):
            raise InputError(f"Token frequencies have shape {tuple(counts.shape)} but the vocabulary "
                             f"has {ctx.vocab_size} tokens; recount them over the train stream.")
        if params.weighting == "drop_top_k":
            if params.top_k >= ctx.vocab_size:
                raise InputError(f"masked_kl top_k = {params.top_k} would drop every token of the "
                                 f"{ctx.vocab_size}-token vocabulary; choose top_k < {ctx.vocab_size}.")
            weights = torch.ones_like(counts)
            weights[torch.topk(counts, params.top_k).indices] = 0.0
        else:
            weights = (counts + 1.0).pow(-params.exponent)
            weights = weights / weights.max()  # largest weight 1 keeps fp32 away from underflow
        self.token_weights = weights.float()  # [V]

    def formula(self) -> str:
        p = self.params
        tok = "t[p] (current input token)" if p.key == "current" else "y[p] (target token)"
        if p.weighting == "inverse_frequency":
            w = f"w_p = (n(x_p) + 1)^(−{p.exponent!r}) with n the train-stream count of x_p = {tok}"
        else:
            w = f"w_p = 0 if x_p = {tok} is among the {p.top_k} most frequent train tokens, else 1"
        return (f"L = (1−λ)·CE + λ·L_KL,w, λ = {p.lam!r}; L_KL,w = Σ_p w_p·KL_p / Σ_p w_p over "
                f"positions with a sidecar row (p ≥ 2), 0 when Σ_p w_p = 0; {w}; "
                f"KL_p = Σ_v P_r(v)·(log P_r(v) − log P_t(v)), {_P_DEFS}")

    def position_weights(self, batch: ObjectiveBatch) -> torch.Tensor:
        """[B, T] weight of each position from its key token's train frequency."""
        keys = batch.tokens if self.params.key == "current" else batch.targets
        if self.token_weights.device != keys.device:
            self.token_weights = self.token_weights.to(keys.device)
        return self.token_weights[keys]

    def divergence(self, batch):
        z_r, sidecar, rows = self._teacher_inputs(batch)
        return losses.kl_rows(z_r, sidecar, rows, weights=self.position_weights(batch))


class JSD(_Blend):
    name = "jsd"
    description = ("CE blended with the per-token Jensen–Shannon divergence between the router "
                   "distribution and the sidecar teacher row (symmetric, bounded by ln 2).")

    class Params(Params):
        lam: float = _lam_field()

    def formula(self) -> str:
        return (f"L = (1−λ)·CE + λ·L_JSD, λ = {self.params.lam!r}; JSD_p = ½·KL(P_r‖M) + "
                f"½·KL(P_t‖M), M = ½·(P_r + P_t); {_P_DEFS}; JSD per token, {_MASK_NOTE}")

    def divergence(self, batch):
        z_r, sidecar, rows = self._teacher_inputs(batch)
        return losses.jsd_rows(z_r, sidecar, rows)


@hookimpl
def ablate_objectives(register):
    for cls in (CE, KLCE, TemperatureKL, MaskedKL, JSD):
        register(cls)
