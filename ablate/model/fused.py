"""One forward pass for a fused group of C students on one frozen backbone module, each with its
own adapters, oracle table and router (on or off):

    prefix = backbone layers 0..L₀ on tokens [B, T], once            (L₀ = first injection layer)
    h      = the prefix repeated per member                           [C·B, T, d]
    every backbone layer from L₀ on runs once on all C·B rows; at an injection layer i member c
    adds its own injection to its rows: h_c ← h_c + tanh(a_c) · xattn_c(h_c)
    logits_c = student_c.head(h_c, e_c)                                (its LM head and router)

The frozen backbone layers, where the FLOPs are, run as one batch; a member's injections, router and
LM-head product are its own module's calls on its own rows, the same operations as its separate
forward (Student._forward). On the CPU a member's outputs and gradients are bitwise those of its
separate forward: the frozen layers act on each row alone and need no weight gradient. The
V-contrast permutations are inputs (`perms`), drawn by the caller from each member's RNG stream as
its separate forward would draw them. Each member's logits are their own tensor, so each loss's
gradient lands in its own [B, T, V] buffer.
"""

from __future__ import annotations

import torch

from ablate.model.backbone import Prefix
from ablate.model.student import Student, StudentOutput
from ablate.training import fastpath

_COMPILED: dict[str, object] = {}  # fused_forward through torch.compile, by backend


def fused_forward(members: list[Student], tokens: torch.Tensor,
                  perms: list[dict[int, torch.Tensor]] | None) -> list[StudentOutput]:
    """tokens [B, T] int64 (every member's batch) and, with the aux losses on, each member's
    V-contrast permutations {layer: π [N]} → one StudentOutput per member (inject_mult 1, no
    traces). Every member's `backbone` must be the same module (ablate.training.fused.share_backbone)."""
    lead = members[0]
    C, (B, T) = len(members), tokens.shape
    layers = sorted(lead.cfg.inject_layers)
    aux = perms is not None
    vc: list[dict[int, torch.Tensor]] = [{} for _ in members]
    qd: list[dict[int, torch.Tensor]] = [{} for _ in members]
    gates: list[dict[int, torch.Tensor]] = [{} for _ in members]
    e: list[torch.Tensor | None] = [None] * C

    def after_layer(i: int, h: torch.Tensor) -> torch.Tensor:  # h [C·B, T, d]
        if i not in layers:
            return h
        rows = h.view(C, B, T, -1)
        injected = []
        for c, m in enumerate(members):
            inj, x, gates[c][i] = m.injection_step(i, rows[c], aux=aux, perm=perms[c][i] if aux else None)
            if aux:
                vc[c][i], qd[c][i] = x.vc, x.qd
            if i == m.router_layer:
                e[c] = inj
            injected.append(inj)
        return h + torch.stack(injected).view(C * B, T, -1)

    backbone = lead.backbone
    prefix = backbone.prefix(tokens, layers[0])
    shared = Prefix(prefix.layer, prefix.h.repeat(C, 1, 1), tuple(s.repeat(C, 1, 1) for s in prefix.summaries))
    final = backbone(tokens, after_layer, start=shared).view(C, B, T, -1)
    outputs = []
    for c, m in enumerate(members):
        logits, router_logits, aligned = m.head(final[c], e[c])
        outputs.append(StudentOutput(logits=logits, router_logits=router_logits, vc=vc[c], qd=qd[c],
                                     gates=gates[c], e=e[c], aligned=aligned))
    return outputs


def fused_forward_compiled(members: list[Student], tokens: torch.Tensor,
                           perms: list[dict[int, torch.Tensor]] | None) -> list[StudentOutput]:
    """fused_forward as one torch.compile'd graph replayed as a CUDA graph where the members' hot paths
    compile (Student.compile_hot_paths, on CUDA), else eager. Outputs are valid until the next
    `fastpath.step_begin()`."""
    if not fastpath.enabled_for(tokens.device) or not all(m._compiled for m in members):
        return fused_forward(members, tokens, perms)
    if fastpath.BACKEND not in _COMPILED:
        _COMPILED[fastpath.BACKEND] = fastpath.compile_fn(fused_forward, cuda_graphs=True)
    return _COMPILED[fastpath.BACKEND](members, tokens, perms)
