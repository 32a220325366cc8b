"""The cell training loop (reference §5, §2.5–2.7, §6).

Per step s (0-based; s optimiser updates are done before it):
    lr = cfg.lr · wsd_multiplier(s)
    (inputs, targets) = B random windows of seq_len + 1 tokens from the train stream
    out = student(inputs, aux=True)                         (bf16 autocast on CUDA)
    L = objective(out.logits, targets, router logits, sidecar rows)
    L_total = L + λ_VC(s)·Σ_l VC_l + λ_QD(s)·Σ_l QD_l       (aux after the blend, §6)
    backward; clip the global grad norm; Muon + Adam step.

Validation (§5.4) runs before step s when s > 0 and s % eval_every == 0 (reported as step s,
i.e. after s updates) and once after the last step (reported as step = steps). Before the first
update it also runs once as step 0 (the untrained student: gates closed, router zero) on the
windows the final evaluation will read, from a fork of the validation sampler: the two compare
like with like, and the reference's evaluations see the windows they would without it.

Logged row (a dict keyed by column name; values as used in that step's forward, before its
update): step, loss (total objective incl. aux), every objective term (ce, kl, …),
vcontrast_L{l}, qdiv_L{l}, gate_L{l} (tanh a_l), and with the router on: alpha, log_alpha,
w_align_norm (‖W_align‖_F), w_align_grad_norm (‖∂L/∂W_align‖_F before clipping),
router_entropy (mean over positions of H(softmax(z_r)), nats, fp32), teacher_match_cos (mean
over positions with a sidecar row of cos(P_r, P_t); only with a sidecar); then
vcontrast_lambda, qdiv_lambda, lr, grad_norm (global norm before clipping), dt_ms and
tokens_per_s (per step over the interval since the previous row, evaluation excluded).

Host syncs happen only on log steps (every log_every steps and the last step), evaluations and
checkpoints. Non-finite loss or gradient norm is recorded on the device every step (the first
offending step of each kind) and raised as NumericalFault at the next sync point, before any
evaluation or checkpoint can see the damaged weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from ablate.training import fastpath
from ablate.api.components import Objective, ObjectiveBatch
from ablate.config.spec import TrainSpec
from ablate.errors import InputError, NumericalFault, PluginFault
from ablate.model.logits import Logits, as_tensor, logit_rows
from ablate.oracle.hashing import RowContract, canonical_rows
from ablate.training.losses import cross_entropy
from ablate.training.optim import CellOptimizer, wsd_multiplier

# Config fields that may differ between the run that wrote a resume state and the run resuming
# it without changing what is computed.
_RESUMABLE_CONFIG_CHANGES = ("checkpoint_every",)
_NEVER = torch.iinfo(torch.int64).max  # "no non-finite value seen yet"
compiled_canonical_rows = fastpath.dispatch_compiled(canonical_rows)  # one fused graph on CUDA


class TrainConfig(TrainSpec):
    """The spec's [train] section resolved for one cell (cells.train_config): TrainSpec's fields and
    validation, plus the cell's name, its data seed (train.data_seed offset by the cell's seed),
    the sidecar's canonical hash seed and row count, whether the hot paths compile here, and the
    numerics."""

    name: str = "cell"
    row_contract: RowContract | None = None  # the oracle's: which sidecar row a position reads; None: no sidecar
    compile: bool = True  # compile the hot paths where fastpath.enabled_for the device
    numerics: Literal["ablate", "upstream"] = "ablate"  # "upstream": the reference's float32 Muon


@dataclass
class TrainOutcome:
    history: list[dict[str, float]]  # logged rows, keyed by column name
    evals: list[dict[str, float]]  # {"step", "val_loss"}
    final_val_loss: float | None  # the evaluation after the last step; None if stopped early
    steps_done: int  # optimiser updates completed (including those before a resume)
    stopped_early: bool
    seconds: float  # wall time of this call
    tokens_per_s: float  # training tokens of this call / training time (evaluation excluded)
    tokens: int  # training tokens of this call (steps run × batch × seq_len)
    compiled: bool  # whether the hot paths ran through torch.compile
    precision: str  # the precision actually used ("bf16" only with CUDA)
    notes: list[str] = field(default_factory=list)


class WindowSampler:
    """Random windows of seq_len + 1 consecutive tokens from a stream, own seeded generator.

    stream [N] int64 (kept on the CPU). `draw()` → [batch, seq_len + 1] on the CPU;
    calling the sampler → (inputs [B, T], targets [B, T]) on `device` (targets = inputs
    shifted by one).
    """

    def __init__(self, stream: torch.Tensor, batch: int, seq_len: int, seed: int,
                 device: torch.device | str = "cpu"):
        if stream.dim() != 1 or stream.numel() < seq_len + 1:
            raise InputError(
                f"The token stream has {stream.numel()} tokens (shape {tuple(stream.shape)}), "
                f"fewer than the seq_len + 1 = {seq_len + 1} a training window needs; use a "
                "larger corpus or a shorter seq_len."
            )
        self.stream = stream.detach().to("cpu", torch.int64)
        self.batch, self.seq_len = batch, seq_len
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def draw(self) -> torch.Tensor:
        """[batch, seq_len + 1] int64 windows with uniform start offsets in [0, N − seq_len − 1]."""
        n_starts = self.stream.numel() - self.seq_len
        starts = torch.randint(0, n_starts, (self.batch, 1), generator=self.generator)
        # index_select, not stream[2-D index]: the same windows, without advanced indexing's
        # slow CPU path (milliseconds per draw on a long stream)
        index = (starts + self._offsets).reshape(-1)
        return torch.index_select(self.stream, 0, index).view(self.batch, self.seq_len + 1)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.draw()
        if self.device.type == "cuda":  # pinned + non_blocking: no host sync on the copy
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]

    def fork(self, skip_draws: int = 0) -> "WindowSampler":
        """A sampler on the same stream whose next draw is this one's (skip_draws + 1)-th; this
        one is left untouched."""
        other = copy.copy(self)
        other.generator = torch.Generator()
        other.generator.set_state(self.generator.get_state())
        for _ in range(skip_draws):  # the start offsets alone advance the generator as draw() does
            torch.randint(0, self.stream.numel() - self.seq_len, (self.batch, 1), generator=other.generator)
        return other

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def aux_lambda(step: int, target: float, warmup: int) -> float:
    """Aux-loss weight (§2.7): target·step/warmup before `warmup`, then target."""
    return target * step / warmup if step < warmup else target


def autocast_for(device: torch.device, precision: str
                 ) -> tuple[Callable[[], contextlib.AbstractContextManager], str]:
    """(context factory, precision used): bf16 autocast on CUDA only; fp32 everywhere else."""
    if precision == "bf16" and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), "bf16"
    return contextlib.nullcontext, "fp32"


@torch.no_grad()
def router_statistics(router_logits: Logits, teacher_rows: torch.Tensor | None = None,
                      sidecar: torch.Tensor | None = None, chunk: int = 1024
                      ) -> dict[str, torch.Tensor]:
    """Router diagnostics as 0-d fp32 device tensors, computed in chunks of positions.

    router_logits [B, T, V] (a tensor or a LinearLogits, formed a chunk at a time); teacher_rows
    [B, T] (−1 = no row); sidecar [N, V].
    router_entropy: mean over all B·T positions of H(softmax(z_r)) in nats.
    teacher_match_cos (only with a sidecar): mean over positions with a row of
    cos(softmax(z_r), softmax(S[row])); NaN when no position has a row.
    """
    positions, device = math.prod(router_logits.shape[:-1]), router_logits.device
    entropy_sum = torch.zeros((), dtype=torch.float32, device=device)
    with_teacher = sidecar is not None and teacher_rows is not None
    rows = teacher_rows.reshape(-1) if with_teacher else None
    cos_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, positions, chunk):
        log_p = torch.log_softmax(logit_rows(router_logits, start, start + chunk).float(), dim=-1)
        p = log_p.exp()
        entropy_sum -= (p * log_p).sum()
        if with_teacher:
            r = rows[start:start + chunk]
            valid = r >= 0
            teacher = sidecar[r.clamp(min=0).to(sidecar.device)].to(device).float()
            p_t = torch.softmax(teacher, dim=-1)
            cos = F.cosine_similarity(p, p_t, dim=-1, eps=1e-30)
            cos_sum += torch.where(valid, cos, torch.zeros_like(cos)).sum()
    stats = {"router_entropy": entropy_sum / positions}
    if with_teacher:
        n_valid = (rows >= 0).sum()
        stats["teacher_match_cos"] = torch.where(
            n_valid > 0, cos_sum / n_valid.clamp(min=1), torch.full_like(cos_sum, math.nan))
    return stats


@torch.no_grad()
def evaluate(student: torch.nn.Module, sampler: WindowSampler, n_batches: int,
             autocast: Callable[[], contextlib.AbstractContextManager],
             should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor | None:
    """Mean CE of the final merged logits over n_batches windows (§5.4): eval mode, no aux.

    Returns a 0-d fp32 device tensor, or None when should_stop() turned true between batches.
    Leaves the student in train mode.
    """
    values = evaluate_many([student], [sampler], lambda inputs: [student(inputs, aux=False).logits], n_batches,
                           autocast, should_stop)
    return None if values is None else values[0]


def evaluate_many(students: list[torch.nn.Module], samplers: list[WindowSampler],
                  forward: Callable[[torch.Tensor], list[torch.Tensor]], n_batches: int,
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  should_stop: Callable[[], bool] = lambda: False) -> list[torch.Tensor] | None:
    """`evaluate` for students that read the same windows (their samplers share a seed; each advances
    as in its own run): forward(inputs [B, T]) → each student's final logits [B, T, V]. Returns one
    mean CE per student (0-d fp32, on the device), or None when stopped between batches."""
    for student in students:
        student.eval()
    try:
        totals: list[torch.Tensor | None] = [None] * len(students)
        for i in range(n_batches):
            if i > 0 and should_stop():
                return None
            if fastpath.enabled_for(samplers[0].device):
                fastpath.step_begin()
            inputs, targets = samplers[0]()
            for other in samplers[1:]:
                other.draw()
            with autocast():
                logits = forward(inputs)
            for c, z in enumerate(logits):
                ce = cross_entropy(z, targets)  # chunked fp32: no fp32 [B, T, V] copy
                totals[c] = ce if totals[c] is None else totals[c] + ce
        return [total / n_batches for total in totals]
    finally:
        for student in students:
            student.train()


def _to_cpu(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _scalars_to_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """One host transfer for many 0-d device tensors."""
    if not tensors:
        return {}
    values = torch.stack([t.detach().float().reshape(()) for t in tensors.values()]).tolist()
    return dict(zip(tensors, values))


@dataclass
class StepLosses:
    """What one training forward produced (0-d device tensors unless noted)."""

    loss: torch.Tensor  # total objective incl. the aux terms, with its graph
    terms: dict[str, torch.Tensor]  # the objective's logged terms
    vc: dict[int, torch.Tensor]
    qd: dict[int, torch.Tensor]
    gates: dict[int, torch.Tensor]
    stats: dict[str, torch.Tensor]  # router diagnostics (log steps with the router on)


class CellRun:
    """State and steps of one train_cell call: `advance(s)` is exactly one step of the loop
    `ablate run` drives (and `ablate bench` times). On CUDA the student's hot paths are
    compiled first (ablate.training.fastpath; ABLATE_COMPILE=0 keeps them eager)."""

    def __init__(self, student, objective: Objective, train_stream, val_stream, sidecar,
                 cfg: TrainConfig, device: torch.device):
        self.student, self.objective, self.sidecar, self.cfg = student, objective, sidecar, cfg
        self.device = torch.device(device)
        self.router = getattr(student, "engram_skip_router", None)
        self._check_inputs()
        self.compiled = cfg.compile and fastpath.enabled_for(self.device) and hasattr(student, "compile_hot_paths")
        if self.compiled:
            student.compile_hot_paths()
        self.autocast, self.precision = autocast_for(self.device, cfg.precision)
        self.notes = ([f"bf16 was requested but the device is {self.device.type}: trained in fp32"]
                      if cfg.precision == "bf16" and self.precision == "fp32" else [])
        self.params = dict(student.trainable_named_parameters())
        self.optimizer = CellOptimizer(self.params.items(), cfg.lr, cfg.numerics)
        self.train_sampler = WindowSampler(train_stream, cfg.batch, cfg.seq_len, cfg.data_seed,
                                           self.device)
        self.val_sampler = WindowSampler(val_stream, cfg.batch, cfg.seq_len, cfg.val_seed,
                                         self.device)
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.step = 0
        self.complete = False
        self.first_bad = torch.full((2,), _NEVER, dtype=torch.int64, device=self.device)
        self.mark = time.perf_counter()  # start of the current timing interval
        self.excluded_s = 0.0  # evaluation/checkpoint time inside the current interval
        self.train_s = 0.0  # training time of this call, evaluation excluded
        self.steps_run = 0
        self.last_logged = -1  # step of the last logged row

    # ---------------------------------------------------------------------------- set-up
    def _check_inputs(self) -> None:
        cfg, obj, sidecar = self.cfg, self.objective, self.sidecar
        if obj.needs_router and self.router is None:
            raise InputError(f"Objective {obj.name!r} supervises the router, but cell "
                             f"{cfg.name!r} has the router off; turn the router on for this cell.")
        if obj.needs_sidecar and sidecar is None:
            raise InputError(f"Objective {obj.name!r} needs the teacher sidecar, but none was "
                             f"given for cell {cfg.name!r}; build the oracle with its sidecar.")
        if sidecar is not None:
            vocab = self.student.backbone.lm_head_weight.shape[0]
            rows = cfg.row_contract.rows if cfg.row_contract is not None else None
            if sidecar.dim() != 2 or sidecar.shape[0] != rows or sidecar.shape[1] != vocab:
                raise InputError(
                    f"The sidecar has shape {tuple(sidecar.shape)} but cell {cfg.name!r} expects "
                    f"[rows={rows}, vocab={vocab}] (the row contract's rows); rebuild the oracle for this "
                    "corpus and student, or give the cell the oracle's row contract.")

    def state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (CPU copies)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return _to_cpu({
            "step": self.step,
            "complete": self.complete,
            "config": self.cfg.model_dump(),
            "student": {n: p for n, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "samplers": {"train": self.train_sampler.state_dict(),
                         "val": self.val_sampler.state_dict()},
            "rng": rng,
            "history": self.history,
            "evals": self.evals,
        })

    def restore(self, state: dict[str, Any]) -> None:
        saved_cfg = state["config"]
        differing = sorted(k for k, v in self.cfg.model_dump().items()
                           if k not in _RESUMABLE_CONFIG_CHANGES and saved_cfg.get(k) != v)
        if differing:
            raise InputError(f"The resume state of cell {self.cfg.name!r} was written with a "
                             f"different training config ({', '.join(differing)}); resume with "
                             "the same config or delete the state to start over.")
        saved = state["student"]
        if set(saved) != set(self.params):
            raise InputError(f"The resume state of cell {self.cfg.name!r} holds parameters "
                             f"{sorted(set(saved) ^ set(self.params))[:3]} that do not match "
                             "this student; delete the state to start over.")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_sampler.load_state_dict(state["samplers"]["train"])
        self.val_sampler.load_state_dict(state["samplers"]["val"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.complete = int(state["step"]), bool(state["complete"])
        self.history = [dict(r) for r in state["history"]]
        self.evals = [dict(r) for r in state["evals"]]

    # ------------------------------------------------------------------------ checks
    def raise_if_fault(self) -> None:
        loss_step, grad_step = self.first_bad.tolist()
        if min(loss_step, grad_step) != _NEVER:
            what = "loss" if loss_step <= grad_step else "gradient"
            raise NumericalFault(self.cfg.name, min(loss_step, grad_step), what)

    # -------------------------------------------------------------------------- step
    def is_log_step(self, s: int) -> bool:
        return s % self.cfg.log_every == 0 or s == self.cfg.steps - 1

    def close_interval(self) -> float:
        """Training seconds since the last call (evaluation/checkpoint time excluded)."""
        now = time.perf_counter()
        seconds = now - self.mark - self.excluded_s
        self.train_s += seconds
        self.mark, self.excluded_s = now, 0.0
        return seconds

    def losses(self, s: int, inputs: torch.Tensor, targets: torch.Tensor,
               log_step: bool, out=None) -> StepLosses:
        """The objective plus the aux terms of step s on one batch (inputs, targets [B, T]).
        With log_step (and the router on) the router diagnostics are computed too. out: the
        student's output on these inputs, when computed already (a fused group's forward)."""
        cfg = self.cfg
        want_rows = self.objective.needs_sidecar or (
            log_step and self.sidecar is not None and self.router is not None)
        hash_rows = compiled_canonical_rows if self.compiled else canonical_rows
        contract = cfg.row_contract
        rows = hash_rows(inputs, contract.rows, contract.seed) if want_rows else None
        with self.autocast():
            out = self.student(inputs, aux=True) if out is None else out
            logits, router_logits = out.logits, out.router_logits
            if not getattr(self.objective, "accepts_linear_logits", False):  # reads the tensors themselves
                logits = as_tensor(logits)
                router_logits = None if router_logits is None else as_tensor(router_logits)
            batch = ObjectiveBatch(logits=logits, targets=targets, tokens=inputs, router_logits=router_logits,
                                   teacher_rows=rows, sidecar=self.sidecar)
            try:
                result = self.objective(batch)
            except Exception as exc:  # the plugin's own failure: this cell fails, the run goes on
                raise PluginFault("objective", self.objective.name, f"at step {s}", exc) from exc
        stats = (router_statistics(router_logits, rows, self.sidecar)
                 if log_step and router_logits is not None else {})
        vc, qd, gates = out.vc, out.qd, out.gates
        del out, batch, logits, router_logits  # §9 item 9: no [B, T, V] logits outlive the loss graph
        lam_vc = aux_lambda(s, cfg.vcontrast_weight, cfg.aux_warmup)
        lam_qd = aux_lambda(s, cfg.qdiv_weight, cfg.aux_warmup)
        loss = result.loss + lam_vc * sum(vc.values()) + lam_qd * sum(qd.values())
        return StepLosses(loss, result.terms, vc, qd, gates, stats)

    def begin_step(self, s: int, draw: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Step s's learning rate and, with draw, its windows (inputs, targets [B, T])."""
        if self.compiled and draw:
            fastpath.step_begin()
        cfg = self.cfg
        self.optimizer.set_lr(cfg.lr * wsd_multiplier(s, cfg.steps, cfg.warmup, cfg.decay_frac))
        return self.train_sampler() if draw else None

    def finish_step(self, s: int, step: StepLosses, update: bool = True) -> dict[str, torch.Tensor]:
        """After the backward pass of step s: the log tensors (0-d, on the device; in column
        order) on log steps, {} otherwise; then clipping and, with `update`, the optimiser update
        (a fused group updates its members together: CellOptimizer.step_together)."""
        cfg, log_step = self.cfg, self.is_log_step(s)
        with_grad = [p for p in self.params.values() if p.grad is not None]
        log: dict[str, torch.Tensor] = {}
        if log_step:  # before clipping (raw gradient) and before the update (values used)
            log = self._log_tensors(step.loss, step.terms, step.vc, step.qd, step.gates,
                                    step.stats)
        grad_norm = (torch.nn.utils.clip_grad_norm_(with_grad, cfg.grad_clip) if with_grad
                     else torch.zeros((), device=self.device))
        loss = step.loss.detach()
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)])
        self.first_bad = torch.where(bad & (self.first_bad == _NEVER), s, self.first_bad)
        if update:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if log_step:
            log["grad_norm"] = grad_norm
        return log

    def train_step(self, s: int) -> dict[str, torch.Tensor]:
        """One optimiser update; returns finish_step's log tensors. Never waits for the device."""
        inputs, targets = self.begin_step(s)
        step = self.losses(s, inputs, targets, self.is_log_step(s))
        step.loss.backward()
        return self.finish_step(s, step)

    def advance(self, s: int) -> dict[str, float] | None:
        """Step s as the loop runs it: the update, then on log steps the fault check and the
        logged row (the only host syncs). Returns the row, or None on other steps."""
        return self.record_step(s, self.train_step(s))

    def record_step(self, s: int, log_tensors: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """Step s done: the step count, and on log steps the fault check and the logged row."""
        self.step, self.steps_run = s + 1, self.steps_run + 1
        if not log_tensors:
            return None
        self.raise_if_fault()  # host sync: every queued kernel of this step has run
        row = self.log_row(s, log_tensors, s - self.last_logged, self.close_interval())
        self.history.append(row)
        self.last_logged = s
        return row

    def _log_tensors(self, loss, terms, vc, qd, gates, stats) -> dict[str, torch.Tensor]:
        reserved = {"step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_s"}
        clash = reserved & set(terms)
        if clash:
            raise InputError(f"Objective {self.objective.name!r} logs terms named "
                             f"{sorted(clash)}, which are loop columns; rename those terms.")
        log = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        log.update({f"vcontrast_L{l}": v.detach() for l, v in sorted(vc.items())})
        log.update({f"qdiv_L{l}": v.detach() for l, v in sorted(qd.items())})
        log.update({f"gate_L{l}": g.detach() for l, g in sorted(gates.items())})
        if self.router is not None:
            w = self.router.W_align.weight
            log["alpha"] = self.router.alpha.detach()
            log["log_alpha"] = self.router.log_alpha.detach().clone()
            log["w_align_norm"] = torch.linalg.matrix_norm(w.detach())
            log["w_align_grad_norm"] = (torch.linalg.matrix_norm(w.grad) if w.grad is not None
                                        else torch.zeros((), device=w.device))
            log.update(stats)
        return log

    def log_row(self, s: int, log_tensors: dict[str, torch.Tensor], interval_steps: int,
                interval_s: float) -> dict[str, float]:
        cfg = self.cfg
        values = _scalars_to_floats(log_tensors)
        row: dict[str, float] = {"step": s}
        row.update({k: v for k, v in values.items() if k != "grad_norm"})
        row["vcontrast_lambda"] = aux_lambda(s, cfg.vcontrast_weight, cfg.aux_warmup)
        row["qdiv_lambda"] = aux_lambda(s, cfg.qdiv_weight, cfg.aux_warmup)
        row["lr"] = cfg.lr * wsd_multiplier(s, cfg.steps, cfg.warmup, cfg.decay_frac)
        row["grad_norm"] = values["grad_norm"]
        row["dt_ms"] = 1000.0 * interval_s / interval_steps
        row["tokens_per_s"] = interval_steps * cfg.batch * cfg.seq_len / max(interval_s, 1e-9)
        return row


def train_cell(student: torch.nn.Module, objective: Objective, train_stream: torch.Tensor,
               val_stream: torch.Tensor, sidecar: torch.Tensor | None, cfg: TrainConfig,
               device: torch.device | str, *,
               log: Callable[[dict], None] = lambda row: None,
               on_eval: Callable[[dict], None] = lambda row: None,
               progress: Callable[[int], None] = lambda n: None,
               should_stop: Callable[[], bool] = lambda: False,
               resume_state: dict | None = None,
               save_state: Callable[[dict], None] | None = None) -> TrainOutcome:
    """Train one cell's trainable parameters; see the module docstring for the step.

    student: a Student (trainable params from trainable_named_parameters()) on `device`.
    train_stream / val_stream [N] int64; sidecar [n_rows, V] or None.
    log(row) gets each logged row; on_eval({"step", "val_loss"}) each evaluation;
    progress(n) advances by the tokens of each step (batch·seq_len).
    should_stop() is polled at every step boundary and between evaluation batches: when true,
    the state is saved and the outcome returns with stopped_early=True.
    save_state(state) receives a resumable state every checkpoint_every steps and at the end;
    resume_state (such a state) continues exactly where it was written.
    """
    t0 = time.perf_counter()
    run = CellRun(student, objective, train_stream, val_stream, sidecar, cfg, device)
    if resume_state is not None:
        run.restore(resume_state)

    def outcome(stopped: bool) -> TrainOutcome:
        final = (run.evals[-1]["val_loss"] if run.complete and run.evals else None)
        tokens = run.steps_run * cfg.batch * cfg.seq_len
        return TrainOutcome(
            history=run.history, evals=run.evals, final_val_loss=final, steps_done=run.step,
            stopped_early=stopped, seconds=time.perf_counter() - t0, tokens_per_s=tokens / max(run.train_s, 1e-9),
            tokens=tokens, compiled=run.compiled, precision=run.precision, notes=run.notes)

    def save() -> None:
        if save_state is not None:
            t = time.perf_counter()
            save_state(run.state())
            run.excluded_s += time.perf_counter() - t

    def stop() -> TrainOutcome:
        run.raise_if_fault()
        run.close_interval()
        save()
        return outcome(stopped=True)

    def run_eval(step: int, sampler: WindowSampler | None = None) -> bool:
        """Evaluate on `sampler` (default: the run's validation sampler) and record as `step`;
        False (sampler rewound) when stopped midway."""
        run.raise_if_fault()
        sampler = sampler or run.val_sampler
        t = time.perf_counter()
        before = sampler.state_dict()
        val = evaluate(student, sampler, cfg.eval_batches, run.autocast, should_stop)
        value = None if val is None else val.item()
        run.excluded_s += time.perf_counter() - t
        if value is None:
            sampler.load_state_dict(before)
            return False
        if not math.isfinite(value):
            raise NumericalFault(cfg.name, step, "validation loss")
        row = {"step": step, "val_loss": value}
        run.evals.append(row)
        on_eval(row)
        return True

    if run.complete:
        return outcome(stopped=False)
    student.train()
    run.mark, run.last_logged = time.perf_counter(), run.step - 1
    if run.step == 0 and not run.evals:
        periodic = (cfg.steps - 1) // cfg.eval_every  # evaluations before the final one
        if not run_eval(0, run.val_sampler.fork(periodic * cfg.eval_batches)):
            return stop()
    for s in range(run.step, cfg.steps):
        if should_stop():
            return stop()
        if s > 0 and s % cfg.eval_every == 0 and not run_eval(s):
            return stop()
        row = run.advance(s)
        progress(cfg.batch * cfg.seq_len)
        if row is not None:
            log(row)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
            run.raise_if_fault()
            save()
    if should_stop():
        return stop()
    if not run_eval(cfg.steps):
        return stop()
    run.complete = True
    save()
    return outcome(stopped=False)
