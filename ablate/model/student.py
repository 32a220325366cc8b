"""The student: a (frozen) backbone with gated engram injections and an optional router.

Reference: zeb139-experiment.md §1.1, §2.4, §3. After backbone layer i ∈ inject_layers:

    inj_i = tanh(a_i) · xattn_i(h);   h ← h + inject_mult · inj_i

The router reads e = inj_L of the last injection layer L (before the residual add, without
inject_mult), bypasses the remaining layers and the final norm, and its logits are added:

    logits = final_norm(h) · Eᵀ + z_r,   z_r = α · W_align(e) · Eᵀ = (α · W_align(e)) · Eᵀ

Every per-forward tensor is returned in StudentOutput; the module keeps no reference to any of
them, so a [B, T, V] router snapshot never outlives the caller's use of it (pitfall §9.9).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ablate.training import fastpath
from ablate.api.components import InjectionTrace, RouterState, Trace
from ablate.errors import InputError
from ablate.model.backbone import Backbone
from ablate.model.engram import EngramCrossAttention, GatedEngramInjection, XAttnOut
from ablate.model.logits import LinearLogits, Logits, as_tensor, product_dtype
from ablate.model.router import SkipToLogitRouter

TRAINABLE_PREFIXES = ("engram_injections.", "engram_skip_router.")
_COMPILED_FORWARDS: dict[str, Callable] = {}  # Student._forward through torch.compile, by backend


@dataclass
class EngramConfig:
    inject_layers: tuple[int, ...] = (2, 5)
    engram_dim: int = 128
    num_heads: int = 8
    top_k: int = 8
    retrieval_bias: float = 1.0
    gate_init: float = 0.0
    router: bool = False
    alpha_init: float = 0.1
    numerics: str = "ablate"  # "upstream": similarities in the autocast dtype, no router at inject_mult 0
    similarity: str = "auto"  # the top-k search under numerics "ablate" (EngramCrossAttention's modes)

    def trainable_parameters(self, hidden_dim: int) -> int:
        """The adapters' parameter count on a backbone of width d = hidden_dim, from the shapes alone;
        tests pin it to a built Student's. Per injection: W_r, W_k, W_v (E·d each), W_q, W_o (d²),
        the rows' LayerNorm (2E), the Q and K RMSNorms (d/heads each) and the gate; the router adds
        W_align (d²) and log_alpha."""
        d, E = hidden_dim, self.engram_dim
        injection = 3 * E * d + 2 * d * d + 2 * E + 2 * (d // self.num_heads) + 1
        return len(self.inject_layers) * injection + (d * d + 1 if self.router else 0)

    def check(self, num_layers: int, hidden_dim: int) -> None:
        """Raise InputError when this config cannot sit on a backbone of that shape."""
        layers = list(self.inject_layers)
        problems = []
        if self.router and not layers:
            problems.append("router=True needs at least one inject layer (it reads the last "
                            "injection's output)")
        if len(set(layers)) != len(layers):
            problems.append(f"inject_layers {layers} has duplicates")
        outside = [i for i in layers if not 0 <= i < num_layers]
        if outside:
            problems.append(f"inject_layers {outside} lie outside [0, {num_layers}) of this "
                            "backbone")
        if self.num_heads < 1 or hidden_dim % self.num_heads:
            problems.append(f"num_heads {self.num_heads} must divide hidden_dim {hidden_dim}")
        if self.top_k < 1 or self.engram_dim < 1:
            problems.append(f"top_k ({self.top_k}) and engram_dim ({self.engram_dim}) must be "
                            "positive")
        if problems:
            raise InputError("Invalid engram config: " + "; ".join(problems) + ".")


@dataclass
class LayerTrace:
    h_in: torch.Tensor  # [B, T, d] hidden state the injection reads
    inj: torch.Tensor  # [B, T, d] gated injection (before inject_mult)
    xattn: XAttnOut


@dataclass
class StudentOutput:
    logits: Logits  # [B, T, V] z_LM + z_r (a LinearLogits with the fused loss head, see Student.head)
    router_logits: Logits | None = None  # [B, T, V] z_r
    vc: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → V-contrast (aux=True)
    qd: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → Q-diversity (aux=True)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → tanh(a)
    traces: dict[int, LayerTrace] = field(default_factory=dict)  # when trace=True
    e: torch.Tensor | None = None  # [B, T, d] router input
    aligned: torch.Tensor | None = None  # [B, T, d] W_align(e)


class Student(nn.Module):
    def __init__(self, backbone: Backbone, cfg: EngramConfig, table: torch.Tensor):
        super().__init__()
        d = backbone.config.hidden_dim
        cfg.check(backbone.config.num_layers, d)
        self.cfg = cfg
        self.backbone = backbone
        self.engram_injections = nn.ModuleDict({
            str(i): GatedEngramInjection(
                EngramCrossAttention(d, cfg.engram_dim, cfg.num_heads, cfg.top_k, cfg.retrieval_bias,
                                     similarity="autocast" if cfg.numerics == "upstream" else cfg.similarity),
                gate_init=cfg.gate_init)
            for i in cfg.inject_layers
        })
        self.engram_skip_router = SkipToLogitRouter(d, cfg.alpha_init) if cfg.router else None
        self.router_layer = max(cfg.inject_layers) if cfg.router else None
        self.register_buffer("table", self._checked_table(table), persistent=False)
        self._compiled: str | None = None  # the compile backend, set by compile_hot_paths
        self.fused_head: bool | None = None  # None: the fused loss head where uses_fused_head says (CUDA)

    def _checked_table(self, table: torch.Tensor) -> torch.Tensor:
        if table.dim() != 2 or table.shape[1] != self.cfg.engram_dim:
            raise InputError(f"The engram table has shape {tuple(table.shape)}; expected "
                             f"[N, {self.cfg.engram_dim}] (engram_dim). Use a table built for "
                             "this engram_dim or change engram_dim.")
        if self.cfg.inject_layers and table.shape[0] < self.cfg.top_k:
            raise InputError(f"The engram table has {table.shape[0]} rows, fewer than "
                             f"top_k={self.cfg.top_k}; lower top_k or use a larger table.")
        return table.float()

    def set_table(self, table: torch.Tensor) -> None:
        """Swap the oracle table [N, E] (kept on the current table's device, float32)."""
        self.table = self._checked_table(table).to(self.table.device)

    def freeze_backbone(self) -> None:
        """Freeze everything except the injections and the router."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(TRAINABLE_PREFIXES))

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def compile_hot_paths(self) -> None:
        """Run the forward pass (trace=False) as one torch.compile'd graph, replayed as a CUDA
        graph (ablate.training.fastpath.compile_fn); parameters, state_dict and outputs are unchanged.
        The retrieval top-k and the V-contrast permutation run inside it as the same aten ops.
        Outputs of one call are valid until the next `fastpath.step_begin()`. The compiled
        function is shared by all students (same graphs, parameters as inputs)."""
        if fastpath.BACKEND not in _COMPILED_FORWARDS:
            _COMPILED_FORWARDS[fastpath.BACKEND] = fastpath.compile_fn(Student._forward,
                                                                      cuda_graphs=True)
        self._compiled = fastpath.BACKEND

    def forward(self, tokens: torch.Tensor, *, aux: bool = False, inject_mult: float = 1.0,
                trace: bool = False, generator: torch.Generator | None = None) -> StudentOutput:
        """tokens [B, T] int64 → StudentOutput.

        aux: compute the V-contrast and Q-diversity losses per injection layer.
        inject_mult: scales every injection's residual add (0 = zero-injection eval).
        trace: record each injection's input, output and retrieval in `traces`.
        generator: RNG for the V-contrast permutations (global RNG when None).
        """
        compiled = self._compiled is not None and not trace
        run = _COMPILED_FORWARDS[self._compiled] if compiled else Student._forward
        return run(self, tokens, aux=aux, inject_mult=inject_mult, trace=trace, generator=generator)

    def _forward(self, tokens: torch.Tensor, *, aux: bool, inject_mult: float, trace: bool,
                 generator: torch.Generator | None) -> StudentOutput:
        vc: dict[int, torch.Tensor] = {}
        qd: dict[int, torch.Tensor] = {}
        gates: dict[int, torch.Tensor] = {}
        traces: dict[int, LayerTrace] = {}
        e = None

        def after_layer(i: int, h: torch.Tensor) -> torch.Tensor:
            nonlocal e
            if str(i) not in self.engram_injections:
                return h
            inj, x, gates[i] = self.injection_step(i, h, aux=aux, generator=generator)
            if aux:
                vc[i], qd[i] = x.vc, x.qd
            if trace:
                traces[i] = LayerTrace(h_in=h, inj=inj, xattn=x)
            if i == self.router_layer:
                e = inj
            return h + inject_mult * inj

        logits, router_logits, aligned = self.head(self.backbone(tokens, after_layer), e, inject_mult)
        return StudentOutput(logits=logits, router_logits=router_logits, vc=vc, qd=qd,
                             gates=gates, traces=traces, e=e, aligned=aligned)

    def injection_step(self, layer: int, h: torch.Tensor, *, aux: bool, generator: torch.Generator | None = None,
                       perm: torch.Tensor | None = None) -> tuple[torch.Tensor, XAttnOut, torch.Tensor]:
        """The injection of `layer` on h [B, T, d] during a forward → (inj [B, T, d], its XAttnOut,
        the gate value tanh(a)). aux: the V-contrast branch too, its permutation `perm` or drawn."""
        injection = self.engram_injections[str(layer)]
        # through a view of h: its two uses inside the injection sum their gradients first, as they
        # do for a member of a fused group (ablate.model.fused), so the sums round alike
        inj, x = injection(h.view(h.shape), self.table, vcontrast=aux, generator=generator, perm=perm)
        return inj, x, torch.tanh(injection.gate)

    def uses_fused_head(self, device: torch.device) -> bool:
        """Whether `head` hands the losses LinearLogits (the fused loss head): under numerics "ablate"
        on CUDA, where the [B, T, V] logits and their gradient are the step's largest tensors, unless
        `fused_head` says otherwise. The CPU keeps whole logits: its runs are small, and its float32
        numbers stay those of z_LM + z_r summed after the products (the calibration's; a single seed's
        cross_run_cos is sensitive to that rounding, docs/calibration.md)."""
        if self.cfg.numerics == "upstream":
            return False
        return device.type == "cuda" if self.fused_head is None else self.fused_head

    def head(self, h: torch.Tensor, e: torch.Tensor | None, inject_mult: float = 1.0
             ) -> tuple[Logits, Logits | None, torch.Tensor | None]:
        """Final hidden state h [B, T, d] and router input e [B, T, d] (None with the router off)
        → (logits [B, T, V] = z_LM + z_r, z_r [B, T, V] or None, W_align(e) [B, T, d] or None).

        Both products share the tied E: z_LM + z_r = (final_norm(h) + α·W_align(e))·Eᵀ. With the
        fused loss head (`fused_head`) the logits come back as LinearLogits of those inputs (cast to
        the autocast dtype), which the losses form a chunk at a time; otherwise as the reference
        forms them: z_LM and z_r whole, z_r added to z_LM."""
        E = self.backbone.lm_head_weight
        normed = self.backbone.final_norm(h)
        routed = aligned = None
        skip_router = inject_mult == 0 and self.cfg.numerics == "upstream"  # the reference skips it there
        if self.engram_skip_router is not None and not skip_router:
            aligned = self.engram_skip_router.W_align(e)
            # α meets [B, T, d], not [B, T, V]: no [B, T, V] product is kept for α's gradient
            routed = self.engram_skip_router.alpha * aligned
        if not self.uses_fused_head(h.device):
            logits = F.linear(normed, E)
            if routed is None:
                return logits, None, aligned
            router_logits = F.linear(routed, E)
            return logits.add_(router_logits), router_logits, aligned  # in place: no second [B, T, V] buffer
        dtype = product_dtype(normed)
        if routed is None:
            return LinearLogits(normed.to(dtype), E), None, aligned
        return LinearLogits((normed + routed).to(dtype), E), LinearLogits(routed.to(dtype), E), aligned

    # ------------------------------------------------- the StudentView protocol (ablate.api.components)

    @contextmanager
    def _probing(self) -> Iterator[None]:
        """Eval mode, no grad, autocast off; the previous train/eval mode is restored."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), torch.autocast(device_type=self.table.device.type, enabled=False):
                yield
        finally:
            self.train(was_training)

    @property
    def injection_layers(self) -> list[int]:
        return sorted(int(k) for k in self.engram_injections)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, d] the live LM-head matrix E, detached."""
        return self.backbone.lm_head_weight.detach()

    @property
    def router(self) -> RouterState | None:
        r = self.engram_skip_router
        if r is None:
            return None
        return RouterState(W_align=r.W_align.weight.detach(), log_alpha=r.log_alpha.item(), alpha=r.alpha.item())

    def gate(self, layer: int) -> float:
        return math.tanh(self.engram_injections[str(layer)].gate.item())

    def trace(self, tokens: torch.Tensor) -> Trace:
        """tokens [B, T] int64 → Trace (the traced forward, inject_mult = 1)."""
        with self._probing():
            out = self(tokens.to(self.table.device), trace=True)
        layers = {l: InjectionTrace(h_in=tr.h_in, inj=tr.inj, out=tr.xattn.out, indices=tr.xattn.indices,
                                    sims=tr.xattn.sims, attn=tr.xattn.attn) for l, tr in out.traces.items()}
        return Trace(logits=out.logits, layers=layers, router_logits=out.router_logits, aligned=out.aligned)

    def inject(self, layer: int, h_in: torch.Tensor, table: torch.Tensor) -> InjectionTrace:
        """The injection of `layer` on h_in [B, T, d] against `table` [N', E] (moved to this device)."""
        with self._probing():
            inj, x = self.engram_injections[str(layer)](h_in, table.to(self.table.device))
        return InjectionTrace(h_in=h_in, inj=inj, out=x.out, indices=x.indices, sims=x.sims, attn=x.attn)

    def row_values(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [m] int64 → (LayerNorm(T[rows]) [m, E], W_v·LayerNorm(T[rows]) [m, d]) of `layer`."""
        xattn = self.engram_injections[str(layer)].xattn
        with self._probing():
            normed = xattn.row_norm(self.table[rows.to(self.table.device)])
            return normed, xattn.W_v(normed)
