"""`ablate bench`'s loss-head row: the KL+CE loss of one router-on step alone, forward and backward
to the head inputs, three ways on the same inputs:

    naive:       z = n·Eᵀ + z_r, z_r = r·Eᵀ whole; float32 log-softmaxes of whole [P, V] tensors
    chunked:     the same [P, V] logits; ablate's chunked losses (gradient in the forward pass)
    fused:       LinearLogits (n + r)·Eᵀ and r·Eᵀ; the chunked losses form each chunk's logits
                 from the factors, so no [P, V] tensor exists (ablate's default under "ablate")

n = final_norm(h) [P, d], r = α·W_align(e) [P, d] (bf16 on CUDA), E the frozen LM head [V, d],
P = B·T. The loss is (1−λ)·CE + λ·KL(P_r‖P_t) over positions with a sidecar row. Each variant's
loss and its gradients w.r.t. n and r are compared with the naive variant's (the equal-work check).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ablate.model.logits import LinearLogits
from ablate.training import losses


def _naive(n, r, E, sidecar, rows, targets, lam):
    z_r = F.linear(r, E)
    log_p = F.log_softmax((F.linear(n, E) + z_r).float(), dim=-1)
    ce = F.nll_loss(log_p, targets)
    log_r = F.log_softmax(z_r.float(), dim=-1)
    log_t = F.log_softmax(sidecar[rows.clamp(min=0)].float(), dim=-1)
    mask = (rows >= 0).float()
    kl = ((log_r.exp() * (log_r - log_t)).sum(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    return (1 - lam) * ce + lam * kl


def _blend(logits, router_logits, sidecar, rows, targets, lam):
    ce = losses.cross_entropy(logits, targets[None])
    kl = losses.masked_mean(*losses.kl_rows(router_logits, sidecar, rows[None]))
    return (1 - lam) * ce + lam * kl


def _chunked(n, r, E, sidecar, rows, targets, lam):
    z_r = F.linear(r, E)
    return _blend((F.linear(n, E) + z_r)[None], z_r[None], sidecar, rows, targets, lam)


def _fused(n, r, E, sidecar, rows, targets, lam):
    return _blend(LinearLogits((n + r)[None], E), LinearLogits(r[None], E), sidecar, rows, targets, lam)


VARIANTS: dict[str, Callable] = {"naive": _naive, "chunked": _chunked, "fused": _fused}


def bench_loss_head(size, device: torch.device, time_steps: Callable, tolerance: float) -> dict:
    """Time each variant (forward + backward) on one fixed set of inputs at `size`'s dimensions;
    report ms, peak memory, and the loss / gradient differences to the naive variant."""
    P, d, V = size.batch * size.seq_len, size.backbone.hidden_dim, size.backbone.vocab_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    E = (torch.randn(V, d, generator=g) / d ** 0.5).to(device, dtype)
    n = torch.randn(P, d, generator=g).to(device, dtype)
    r = (0.3 * torch.randn(P, d, generator=g)).to(device, dtype)
    sidecar = (2 * torch.randn(size.rows, V, generator=g)).to(device, dtype)
    rows = torch.randint(-1, size.rows, (P,), generator=g).to(device)
    targets = torch.randint(0, V, (P,), generator=g).to(device)

    def run(variant: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nn_, rr = n.clone().requires_grad_(), r.clone().requires_grad_()
        loss = variant(nn_, rr, E, sidecar, rows, targets, size.lam)
        loss.backward()
        return loss.detach(), nn_.grad, rr.grad

    result: dict = {"positions": P, "vocab": V, "hidden": d}
    reference = run(_naive)
    for name, variant in VARIANTS.items():
        result[name] = time_steps(lambda _s, variant=variant: run(variant), 2, max(3, size.steps // 3), device)
    compared = [k for k in VARIANTS if k != "naive"]
    for name in compared:
        got = run(VARIANTS[name])
        result[name]["loss_relative_difference"] = float((got[0] - reference[0]).abs() / reference[0].abs())
        result[name]["grad_relative_difference"] = max(
            float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(got[1:], reference[1:]))
    result["tolerance"] = tolerance
    result["ok"] = all(result[k]["loss_relative_difference"] <= tolerance
                       and result[k]["grad_relative_difference"] <= tolerance for k in compared)
    result["speedup_vs_naive"] = result["naive"]["ms_per_step"] / result["fused"]["ms_per_step"]
    result["speedup_vs_chunked"] = result["chunked"]["ms_per_step"] / result["fused"]["ms_per_step"]
    return result


def table_row(head: dict) -> tuple[str, ...]:
    """The bench table's row for the fused loss head."""
    def gib(m: dict) -> str:
        value = m["peak_memory_gib"]
        return "—" if value is None else f"{value:.2f}"

    f, c, n = head["fused"], head["chunked"], head["naive"]
    return (f"KL+CE loss head alone, fused ({head['positions']} × {head['vocab']})", f"{f['ms_per_step']:.2f}", "",
            "", f"{gib(f)} / —",
            f"{head['speedup_vs_naive']:.2f}× vs naive ({n['ms_per_step']:.2f} ms, {gib(n)} GiB), "
            f"{head['speedup_vs_chunked']:.2f}× vs chunked on whole logits ({c['ms_per_step']:.2f} ms, "
            f"{gib(c)} GiB){'' if head['ok'] else ', MISMATCH'}")
