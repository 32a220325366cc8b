"""Built-in probes (zeb139-experiment.md §7): what a trained cell, or a real/shuffled pair of
cells, measures. Every probe reads the CellView's fixed probe batches ([B, T+1]; inputs are
[:, :-1]) through the view's StudentView only (`view.student.trace(...)` runs in eval mode,
fp32 with autocast off, no_grad, and restores the mode); the arithmetic on what it returns runs
inside `measuring(view)` (no grad, autocast off). None installs a hook, so nothing is left
behind. The rest of the η-B battery (W, A, X, Q, V of §7.5) is in ablate_builtins.battery,
registered by the hook below. Like every plugin, this module imports only ablate.api.

Cosines of an all-zero vector read 0 (eps-guarded), e.g. router logits while W_align = 0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ablate.api import CellView, Metric, Probe, Trace, hookimpl

ENTROPY_CLAMP = 1e-12  # P is clamped here inside the log (§7.1)
COS_EPS = 1e-12
POSITIONS_PER_PASS = 1024  # the probes' [positions, V] arithmetic runs this many positions at a time
NOOP_RTOL = 1e-5  # retrieval-control: equal within this relative tolerance


# ----------------------------------------------------------------------------- helpers


@contextmanager
def measuring(view: CellView) -> Iterator[None]:
    """No grad, autocast off: the arithmetic a probe does on what the view returns."""
    with torch.no_grad(), torch.autocast(device_type=view.device.type, enabled=False):
        yield


def traced(view: CellView, i: int) -> Trace:
    """The traced forward of probe batch i."""
    return view.student.trace(view.inputs(i))


def per_position(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn over chunks of POSITIONS_PER_PASS positions of tensors [..., n] (equal leading shapes),
    its [chunk] results joined → [...]. fn reduces each position's last dim on its own, so the
    result is fn's on the whole tensors; its float32 temporaries are [chunk, n], not [B·T, V]."""
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    parts = [fn(*(t[i:i + POSITIONS_PER_PASS] for t in flat)) for i in range(0, flat[0].shape[0], POSITIONS_PER_PASS)]
    return torch.cat(parts).reshape(tensors[0].shape[:-1])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(COS_EPS)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine over the last dim, fp32; a zero vector gives 0. [..., n] × 2 → [...]."""
    return per_position(_cosine, a, b)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.float().softmax(dim=-1)
    return -(p * p.clamp_min(ENTROPY_CLAMP).log()).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """−Σ P log max(P, 1e-12) over the last dim, nats. [..., V] → [...]."""
    return per_position(_entropy, logits)


def teacher_match(z: torch.Tensor, sidecar: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """cos(softmax(z), softmax(sidecar[rows])) per position: z [..., V] logits, sidecar [N, V],
    rows [...] (≥ 0) → [...]."""

    def match(z_part: torch.Tensor, rows_part: torch.Tensor) -> torch.Tensor:
        teacher = sidecar[rows_part[:, 0]].float().softmax(dim=-1)
        return _cosine(z_part.float().softmax(dim=-1), teacher)

    return per_position(match, z, rows.unsqueeze(-1))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def w_align_drift(W: torch.Tensor) -> float:
    """‖W − W_init‖_F / √(d/3) for W_align [d, d] (W_init = 0, §3): the drift in units of the
    Frobenius norm a default-initialised nn.Linear(d, d) would have (entries U(−1/√d, 1/√d),
    E‖W‖_F² = d/3), since '2× init' means nothing at a zero init (engine.CONVENTIONS)."""
    return float(W.double().norm() / math.sqrt(W.shape[1] / 3))


def last_val_loss(view: CellView) -> float | None:
    return float(view.evals[-1]["val_loss"]) if view.evals else None


# ------------------------------------------------------------------------------ cell probes

CONTENT_GAIN_CONVENTION = (
    "content_gain = val_loss(shuffled-oracle cell) − val_loss(real-oracle cell), in nats: POSITIVE when the real "
    "oracle content lowers the loss. The reference's Δ-diff is the opposite sign (real − shuffled); convert before "
    "comparing with upstream numbers.")
W_ALIGN_DRIFT_CONVENTION = (
    "w_align_drift = ‖W_align − W_align(init)‖_F / √(d/3), W_align(init) = 0. The reference's '> 2× init' is "
    "undefined for a zero init (its §10.2), so the unit is the init W_align would have had as a default "
    "nn.Linear(d, d): entries U(−1/√d, 1/√d), variance 1/(3d), so E‖W‖_F² = d/3 and ‖W‖_F ≈ √(d/3) (13.0639 at "
    "d = 512). The zeb136/138/139 threshold 0.3 (‖W_align‖_F > 3.9192 at d = 512) is about 2× the drift of the "
    "CE-only router (ZEB-136: ‖W_align‖_F 1.9108 → 0.1463): '2× init' read as '2× the CE attractor's own drift', "
    "the comparison the reference's findings made; ZEB-139's 1.3461 and 0.5786 read 0.1030 and 0.0443 (HOLD, as "
    "recorded upstream).")


class FinalLoss(Probe):
    name = "final-loss"
    scope = "cell"
    description = "Validation loss of the cell: the last evaluation, and step 0 when it was evaluated."
    metrics = (
        Metric("val_loss", "last validation cross-entropy of the cell, nats per token", "nats per token",
               "validation loss"),
        Metric("val_loss_step0", "validation cross-entropy at step 0 (gates closed, router zero) on the windows of "
                                 "the final evaluation, nats per token", "nats per token", "validation loss"),
    )

    def run(self, view: CellView) -> dict[str, float]:
        out = {}
        if view.evals:
            out["val_loss"] = last_val_loss(view)
        step0 = [e for e in view.evals if int(e["step"]) == 0]
        if step0:
            out["val_loss_step0"] = float(step0[0]["val_loss"])
        return out


class Gates(Probe):
    name = "gates"
    scope = "cell"
    description = "tanh of each injection's gate scalar."
    metrics = (Metric("gate_L{l}", "tanh(a) of the engram injection after layer l (signed, unitless, in [−1, 1])",
                      "unitless", "gates"),)

    def run(self, view: CellView) -> dict[str, float]:
        return {f"gate_L{l}": view.student.gate(l) for l in view.student.injection_layers}


FINGERPRINT = "router fingerprint"


class RouterFingerprint(Probe):
    name = "router-fingerprint"
    scope = "cell"
    description = "The skip-to-logit router's scale, weight size and output distribution (§7.1)."
    metrics = (
        Metric("log_alpha", "the router's log scale log_alpha (nats)", "nats", FINGERPRINT),
        Metric("alpha", "α = exp(log_alpha), the router's logit scale (unitless; a logit multiplier, not a mixture "
                        "weight)", "unitless", FINGERPRINT,
               convention="α = exp(log_alpha), the router's logit scale (added in logit space, not a probability "
                          "mixture)."),
        Metric("w_align_norm", "‖W_align‖_F, Frobenius norm of the router's d×d alignment matrix (unitless)",
               "unitless", FINGERPRINT),
        Metric("w_align_drift", "‖W_align − W_align_init‖_F / √(d/3) with W_align_init = 0: the drift in units of "
                                "the Frobenius norm of a default-initialised d×d nn.Linear (U(−1/√d, 1/√d), "
                                "E‖W‖_F² = d/3; 13.0639 at d = 512), so 1.0 = moved as far as a fresh layer is "
                                "large; the reference specs' threshold 0.3 ≈ 2× the CE-only router's drift "
                                "(unitless)", "unitless", FINGERPRINT, convention=W_ALIGN_DRIFT_CONVENTION),
        Metric("engram_logit_entropy", "mean over positions of −Σ_v P_r log P_r, P_r = softmax(z_r), P clamped at "
                                       "1e-12 inside the log (nats; uniform = ln V)", "nats", FINGERPRINT),
        Metric("max_lm_head_row_cos", "mean over positions of max_v |cos(W_align e, E_v)| over the LM-head rows E_v "
                                      "(unitless, in [0, 1])", "unitless", FINGERPRINT),
        Metric("teacher_match_cos", "mean over valid positions (p ≥ 2) of cos(P_router, P_teacher), probability "
                                    "vectors, P_teacher = softmax(sidecar row) (unitless, in [0, 1])", "unitless",
               FINGERPRINT),
        Metric("log_vocab", "ln V, the entropy of a uniform distribution over the vocabulary (nats)", "nats",
               FINGERPRINT),
    )

    def run(self, view: CellView) -> dict[str, float]:
        router = view.student.router
        if router is None:
            return {}
        W = router.W_align.float()
        E = view.student.lm_head_weight.float()
        out = {
            "log_alpha": router.log_alpha,
            "alpha": router.alpha,
            "w_align_norm": float(W.norm()),
            "w_align_drift": w_align_drift(W),
            "log_vocab": math.log(E.shape[0]),
        }
        E_unit = F.normalize(E, dim=-1, eps=COS_EPS)
        ent, row_cos, match = [], [], []
        with measuring(view):
            for i in range(len(view.val_batches)):
                res = traced(view, i)
                z = res.router_logits.float()
                ent.append(float(entropy(z).mean()))
                a_unit = F.normalize(res.aligned.float(), dim=-1, eps=COS_EPS)
                row_cos.append(float(per_position(lambda a: (a @ E_unit.T).abs().amax(dim=-1), a_unit).mean()))
                if view.sidecar is not None and i < len(view.teacher_rows):
                    rows = view.teacher_rows[i].to(z.device)
                    valid = rows >= 0
                    if valid.any():
                        match.append(float(teacher_match(z, view.sidecar, rows.clamp(min=0))[valid].mean()))
        if ent:
            out["engram_logit_entropy"] = mean(ent)
            out["max_lm_head_row_cos"] = mean(row_cos)
        if match:
            out["teacher_match_cos"] = mean(match)
        return out


class KLTrajectory(Probe):
    name = "kl-trajectory"
    scope = "cell"
    description = "The logged training KL at its first and last logged step."
    metrics = (
        Metric("kl_first", "training-batch KL term at the first logged step (nats per token)", "nats per token",
               "training KL"),
        Metric("kl_last", "training-batch KL term at the last logged step (nats per token)", "nats per token",
               "training KL"),
        Metric("kl_change", "kl_last − kl_first (nats per token; negative = the KL fell)", "nats per token",
               "training KL"),
    )

    def run(self, view: CellView) -> dict[str, float]:
        kl = [float(row["kl"]) for row in view.history if "kl" in row]
        if not kl:
            return {}
        return {"kl_first": kl[0], "kl_last": kl[-1], "kl_change": kl[-1] - kl[0]}


RETRIEVAL = "retrieval battery"


class RetrievalBattery(Probe):
    name = "retrieval-battery"
    scope = "cell"
    description = "Per injection layer: retrieval diversity, peakedness, attention entropy, injection size (§7.5 D/P/E/M)."
    metrics = (
        Metric("retrieval_unique_rows_L{l}", "D: number of distinct table rows among the B·T·k retrieved slots of a "
                                             "batch, averaged over batches (rows)", "rows", RETRIEVAL),
        Metric("retrieval_unique_frac_L{l}", "distinct table rows among the B·T·k retrieved slots of a batch, as a "
                                             "fraction of B·T·k, averaged over batches (unitless)", "unitless",
               RETRIEVAL),
        Metric("retrieval_top1_L{l}", "mean cosine similarity of the best retrieved row (unitless)", "unitless",
               RETRIEVAL),
        Metric("retrieval_topk_L{l}", "mean cosine similarity of the k-th retrieved row (unitless)", "unitless",
               RETRIEVAL),
        Metric("retrieval_gap_L{l}", "retrieval_top1 − retrieval_topk (unitless)", "unitless", RETRIEVAL),
        Metric("attn_entropy_L{l}", "mean over tokens and heads of the k-way attention entropy divided by ln k "
                                    "(unitless, 1 = uniform)", "unitless", RETRIEVAL),
        Metric("inj_ratio_L{l}", "mean over tokens of ‖injection‖/‖hidden state it is added to‖ (unitless)",
               "unitless", RETRIEVAL),
    )

    def run(self, view: CellView) -> dict[str, float]:
        per: dict[str, list[float]] = {}
        with measuring(view):
            for i in range(len(view.val_batches)):
                for l, tr in traced(view, i).layers.items():
                    for key, v in battery(l, tr).items():
                        per.setdefault(key, []).append(v)
        return {key: mean(vs) for key, vs in per.items()}


def battery(l: int, tr) -> dict[str, float]:
    """D/P/E/M of one layer's InjectionTrace (indices, sims [B, T, k]; attn [B, T, H, k]; inj, h_in [B, T, d])."""
    k = tr.indices.shape[-1]
    sims, attn = tr.sims.float(), tr.attn.float()
    top1, topk = sims.amax(-1).mean(), sims.amin(-1).mean()
    attn_entropy = -torch.special.xlogy(attn, attn).sum(-1) / math.log(k)
    ratio = tr.inj.float().norm(dim=-1) / tr.h_in.float().norm(dim=-1).clamp_min(COS_EPS)
    unique = tr.indices.unique().numel()
    return {
        f"retrieval_unique_rows_L{l}": float(unique),
        f"retrieval_unique_frac_L{l}": unique / tr.indices.numel(),
        f"retrieval_top1_L{l}": float(top1),
        f"retrieval_topk_L{l}": float(topk),
        f"retrieval_gap_L{l}": float(top1 - topk),
        f"attn_entropy_L{l}": float(attn_entropy.mean()),
        f"inj_ratio_L{l}": float(ratio.mean()),
    }


# ------------------------------------------------------------------------------ pair probes


class ContentGain(Probe):
    name = "content-gain"
    scope = "pair"
    description = "Final validation loss of the shuffled cell minus that of the real cell."
    metrics = (
        Metric("content_gain", "val_loss(shuffled) − val_loss(real), nats per token: POSITIVE when real oracle "
                               "content lowers the loss; the reference's Δ-diff (real − shuffled) has the OPPOSITE "
                               "sign", "nats per token", "validation loss", role="gain_over_control",
               convention=CONTENT_GAIN_CONVENTION),
    )

    def run(self, real: CellView, shuffled: CellView) -> dict[str, float]:
        a, b = last_val_loss(real), last_val_loss(shuffled)
        if a is None or b is None:
            return {}
        return {"content_gain": b - a}


class CrossRun(Probe):
    name = "cross-run"
    scope = "pair"
    description = "How alike the real and shuffled cells' router logits and injections are on the same tokens."
    metrics = (
        Metric("cross_run_cos", "mean over positions of cos(z_r real, z_r shuffled) of the raw router logits (not "
                                "probabilities, not centred), averaged over batches (unitless, in [−1, 1])",
               "unitless", "cross-run",
               convention="cross_run_cos = mean over positions of cos(z_r(real), z_r(shuffled)) on the raw router "
                          "logits (not probabilities, not centred), same validation tokens for both cells."),
        Metric("cross_run_inj_cos_L{l}", "C: mean signed cosine between the two cells' injections after layer l at "
                                         "matched tokens (unitless, in [−1, 1])", "unitless", "cross-run"),
        Metric("cross_run_inj_abs_cos_L{l}", "C |abs|: mean absolute cosine between the two cells' injections after "
                                             "layer l at matched tokens (unitless, in [0, 1])", "unitless",
               "cross-run"),
    )

    def run(self, real: CellView, shuffled: CellView) -> dict[str, float]:
        a, b = real.student, shuffled.student
        both_routed = a.router is not None and b.router is not None
        layers = set(a.injection_layers) & set(b.injection_layers)
        per: dict[str, list[float]] = {}
        with measuring(real), measuring(shuffled):
            for i in range(len(real.val_batches)):
                ra, rb = traced(real, i), traced(shuffled, i)
                if both_routed:
                    per.setdefault("cross_run_cos", []).append(float(cosine(ra.router_logits, rb.router_logits).mean()))
                for l in sorted(layers):
                    c = cosine(ra.layers[l].inj, rb.layers[l].inj)
                    per.setdefault(f"cross_run_inj_cos_L{l}", []).append(float(c.mean()))
                    per.setdefault(f"cross_run_inj_abs_cos_L{l}", []).append(float(c.abs().mean()))
        return {key: mean(vs) for key, vs in per.items()}


class RetrievalControl(Probe):
    name = "retrieval-control"
    scope = "pair"
    description = ("Is the control oracle a no-op for retrieval? The real cell's cross-attention, on its own "
                   "captured hidden states, against its table and against the control cell's table.")
    metrics = (
        Metric("retrieval_control_max_diff_L{l}", "max |out_real − out_control| of the real cell's pre-gate "
                                                  "cross-attention output after layer l, same hidden states, real vs "
                                                  "control table (activation units; the gate scales both alike and "
                                                  "is left out)", "activation units", "retrieval control",
               role="retrieval_diff"),
        Metric("retrieval_control_noop_L{l}", "1.0 when those outputs are equal within 1e-5 relative (a row "
                                              "permutation under dense cosine top-k retrieves the same content, "
                                              "§2.9), else 0.0", "flag (1.0 or 0.0)", "retrieval control",
               role="retrieval_noop"),
    )

    def run(self, real: CellView, shuffled: CellView) -> dict[str, float]:
        student, control_table = real.student, shuffled.student.table
        diff: dict[int, float] = {}
        scale: dict[int, float] = {}
        with measuring(real):
            for i in range(len(real.val_batches)):
                for l, tr in traced(real, i).layers.items():
                    a = student.inject(l, tr.h_in, student.table).out.float()
                    b = student.inject(l, tr.h_in, control_table).out.float()
                    diff[l] = max(diff.get(l, 0.0), float((a - b).abs().max()))
                    scale[l] = max(scale.get(l, 0.0), float(a.abs().max()))
        out = {}
        for l in sorted(diff):
            out[f"retrieval_control_max_diff_L{l}"] = diff[l]
            out[f"retrieval_control_noop_L{l}"] = 1.0 if diff[l] <= NOOP_RTOL * scale[l] else 0.0
        return out


BUILTIN_PROBES = (FinalLoss, Gates, RouterFingerprint, KLTrajectory, RetrievalBattery,
                  ContentGain, CrossRun, RetrievalControl)


@hookimpl
def ablate_probes(register):
    from ablate_builtins.battery import BATTERY_PROBES  # imported here: battery uses this module's helpers

    for probe in (*BUILTIN_PROBES, *BATTERY_PROBES):
        register(probe)
