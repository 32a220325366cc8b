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
- Batching (`BatchedMuon`, the default): the matrices are grouped by their Newton–Schulz shape (a
  tall matrix enters transposed, so 512×128 and 128×512 weights share a group) and each group is
  orthogonalised as one stack of batched matrix products per step, instead of one Newton–Schulz
  per matrix (the per-matrix path launches ~35 kernels for each of 11 matrices; docs/performance.md).
  The arithmetic is the per-matrix optimiser's, matrix by matrix: under numerics = "ablate"
  torch.optim.Muon's (EMA buffer, bf16 iterations, clamped norm), under "upstream" ReferenceMuon's
  (float32); the momentum buffers stay one per parameter, so saved states load into either.
  `CellOptimizer(..., batched=False)` keeps the per-matrix optimisers (the reference the tests and
  `ablate bench` compare against).
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


def newton_schulz_batched(x: torch.Tensor, steps: int = MUON_NS_STEPS, eps: float = REFERENCE_NS_EPS,
                          clamp: bool = False) -> torch.Tensor:
    """`steps` quintic Newton–Schulz iterations on a stack [G, rows, cols] with rows ≤ cols (callers
    transpose tall matrices), in x's dtype, each matrix normalised by its own Frobenius norm:
    X/(‖X‖_F + eps) as the reference writes it, or X/max(‖X‖_F, eps) as torch.optim.Muon does
    (`clamp`). Per matrix the same products as `newton_schulz` / torch's, batched."""
    a, b, c = MUON_NS_COEFFICIENTS
    norm = torch.linalg.matrix_norm(x, keepdim=True)
    if clamp:  # torch.optim.Muon's operations, batched
        x = x / norm.clamp(min=eps)
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G·G
            x = torch.baddbmm(x, update, x, beta=a)  # a·X + (b·G + c·G²)·X
        return x
    x = x / (norm + eps)  # the reference's operations (`newton_schulz`), batched
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


class BatchedMuon(torch.optim.Optimizer):
    """Muon with one Newton–Schulz per group of same-shaped matrices per step (module docstring).

    numerics "ablate": torch.optim.Muon(nesterov=False, weight_decay=0, adjust_lr_fn="original",
    eps=(1 − momentum)·1e-7) batched: buffer ← lerp(buffer, grad, 1 − momentum); X = NS₅ of the
    buffer in bf16 with X/max(‖X‖, eps); p ← p − lr·√max(1, rows/cols)·X.
    numerics "upstream": ReferenceMuon batched, in float32: buffer ← momentum·buffer + grad;
    X = NS₅(buffer) with X/(‖X‖ + 1e-7); the same step.
    The param-group keys are torch.optim.Muon's, so a state saved by either loads into the other
    (step reads only lr and momentum from a group).
    """

    def __init__(self, params, lr: float, momentum: float = MUON_MOMENTUM, numerics: str = "ablate"):
        if numerics not in ("ablate", "upstream"):
            raise InputError(f'numerics must be "ablate" or "upstream" (got {numerics!r}).')
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "nesterov": False,
                    "ns_coefficients": MUON_NS_COEFFICIENTS, "ns_steps": MUON_NS_STEPS,
                    "eps": (1 - momentum) * REFERENCE_NS_EPS if numerics == "ablate" else REFERENCE_NS_EPS,
                    "adjust_lr_fn": "original"}
        super().__init__(params, defaults)
        self.numerics = numerics
        # read from here, not from the groups: a state saved by ReferenceMuon brings groups without it
        self.eps = defaults["eps"]
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise InputError(f"Muon updates 2-D weights only; got a parameter of shape {tuple(p.shape)}.")

    @staticmethod
    def shape_groups(params: list[nn.Parameter]) -> dict[tuple, list[nn.Parameter]]:
        """Parameters grouped by (device, dtype, Newton–Schulz shape): (rows, cols) with rows ≤ cols,
        a tall matrix counted transposed. Order within a group follows `params`."""
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in params:
            rows, cols = p.shape
            groups.setdefault((p.device, p.dtype, min(rows, cols), max(rows, cols)), []).append(p)
        return groups

    def _buffer(self, p: nn.Parameter) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = (torch.zeros_like(p, dtype=torch.float32) if self.numerics == "upstream"
                                        else torch.zeros_like(p.grad, memory_format=torch.preserve_format))
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        BatchedMuon.step_together([self])

    @staticmethod
    @torch.no_grad()
    def step_together(optimizers: list[BatchedMuon]) -> None:
        """The step of every optimiser in `optimizers` (a fused group's cells, or one), with one
        Newton–Schulz per shape group across all of them: each matrix's update is the one its own
        optimiser's step computes (the same momentum, iterations, scale and learning rate)."""
        kinds: dict[tuple[str, float], list[BatchedMuon]] = {}
        for opt in optimizers:
            kinds.setdefault((opt.numerics, opt.eps), []).append(opt)
        for (numerics, eps), opts in kinds.items():
            upstream = numerics == "upstream"
            entries: list[tuple[nn.Parameter, torch.Tensor, float]] = []  # (param, momentum buffer, lr)
            by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for opt in opts:
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        buffer = opt._buffer(p)
                        buffers, grads = by_momentum.setdefault(group["momentum"], ([], []))
                        buffers.append(buffer)
                        grads.append(p.grad)
                        entries.append((p, buffer, group["lr"]))
            for momentum, (buffers, grads) in by_momentum.items():
                if upstream:  # buffer ← momentum·buffer + grad, in float32
                    torch._foreach_mul_(buffers, momentum)
                    torch._foreach_add_(buffers, [g.float() for g in grads])
                else:  # torch.optim.Muon's EMA: buffer ← buffer + (1 − momentum)·(grad − buffer)
                    torch._foreach_lerp_(buffers, grads, 1 - momentum)
            buffer_of = {id(p): (buffer, lr) for p, buffer, lr in entries}
            for members in BatchedMuon.shape_groups([p for p, _, _ in entries]).values():
                stack = torch.stack([buffer_of[id(p)][0].mT if p.shape[0] > p.shape[1] else buffer_of[id(p)][0]
                                     for p in members])
                stack = stack.float() if upstream else stack.bfloat16()
                ortho = newton_schulz_batched(stack, MUON_NS_STEPS, eps, clamp=not upstream)
                # × √max(1, rows/cols), in float32 (bf16 × float32 promotes; exact for the factors 1
                # and 2 of the engram weights), then p ← p − lr·update, one call per learning rate
                ortho = ortho * _lr_scales(tuple(tuple(p.shape) for p in members), members[0].device)
                by_lr: dict[float, tuple[list[nn.Parameter], list[torch.Tensor]]] = {}
                for p, u in zip(members, ortho.unbind(0)):
                    params, updates = by_lr.setdefault(buffer_of[id(p)][1], ([], []))
                    params.append(p)
                    updates.append((u.mT if p.shape[0] > p.shape[1] else u).to(p.dtype))
                for lr, (params, updates) in by_lr.items():
                    torch._foreach_add_(params, updates, alpha=-lr)


_scales_cache: dict[tuple, torch.Tensor] = {}


def _lr_scales(shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """[G, 1, 1] float32 √max(1, rows/cols) per matrix shape (Muon's lr adjustment), cached."""
    cached = _scales_cache.get((shapes, device))
    if cached is None:
        cached = torch.tensor([math.sqrt(max(1.0, r / c)) for r, c in shapes], dtype=torch.float32,
                              device=device).view(-1, 1, 1)
        _scales_cache[(shapes, device)] = cached
    return cached


class CellOptimizer:
    """Muon + Adam sharing one learning rate, driven as one optimiser.

    named_params: (name, parameter) pairs of the trainable parameters (see `partition`).
    numerics: "ablate" (torch.optim.Muon's arithmetic, bf16 Newton–Schulz) or "upstream"
    (ReferenceMuon's, float32). batched: one Newton–Schulz per group of same-shaped matrices
    (BatchedMuon, the default); False: the per-matrix optimisers (torch.optim.Muon /
    ReferenceMuon), the reference the tests and the bench compare against.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], lr: float, numerics: str = "ablate",
                 batched: bool = True):
        muon_params, adam_params = partition(named_params)
        if not muon_params and not adam_params:
            raise InputError(
                "the cell optimiser got no trainable parameters; check that the student "
                "exposes its engram parameters through trainable_named_parameters()."
            )
        if not muon_params:
            self.muon = None
        elif batched:
            self.muon = BatchedMuon(muon_params, lr=lr, numerics=numerics)
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

    @staticmethod
    def step_together(optimizers: list[CellOptimizer]) -> None:
        """Every optimiser's step, the batched Muon matrices of all of them in one Newton–Schulz
        per shape group (BatchedMuon.step_together); each parameter's update is its own step's."""
        batched = [o.muon for o in optimizers if isinstance(o.muon, BatchedMuon)]
        BatchedMuon.step_together(batched)
        for o in optimizers:
            for opt in o._optimizers:
                if not isinstance(opt, BatchedMuon):
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
