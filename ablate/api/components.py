"""The public component interface: what a corpus, teacher, objective or probe plugin implements.

A component is a class with a `name`, a pydantic `Params` model (unknown fields are errors) and
a short `description`. Plugins register component classes through the hooks in
`ablate.api.hookspecs`; the engine instantiates them with validated parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model

from ablate.model.logits import Logits, as_tensor


class Params(BaseModel):
    """Base for every component's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(Params):
    pass


class Component:
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = NoParams
    description: ClassVar[str] = ""

    def __init__(self, params: Params):
        self.params = params


# A progress callback: advance(n_units) — the engine wires it to a rich progress bar.
Progress = Callable[[int], None]


def no_progress(n: int) -> None:
    return None


# ----------------------------------------------------------------------------------- corpora


@dataclass
class TokenCorpus:
    """A tokenised corpus: documents joined by EOS, split into train and validation streams."""

    train: torch.Tensor  # [N_train] int64 token ids
    val: torch.Tensor  # [N_val] int64 token ids
    vocab_size: int
    eos_id: int
    tokenizer_path: Path | None = None  # a `tokenizers` JSON file, when the corpus has one
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able facts for the report


class Corpus(Component):
    """Produces a TokenCorpus. `load` may be slow; the engine caches its output by params."""

    def load(self, workdir: Path, progress: Progress = no_progress) -> TokenCorpus:
        raise NotImplementedError

    def tokenizer_file(self) -> Path | None:
        """The tokenizer.json whose id→token map produced (or will produce) this corpus's ids, when
        known before `load`; None otherwise (a tokenizer `load` trains is TokenCorpus.tokenizer_path).
        Compared id by id with the teacher's (ablate.oracle.tokenizer_identity)."""
        return None

    def known_vocab_size(self) -> int | None:
        """The vocabulary size when known before `load` (the teacher's is checked against it
        early); None when only tokenising tells (a tokenizer read from a file)."""
        return getattr(self.params, "vocab_size", None)


# ---------------------------------------------------------------------------------- teachers


@dataclass
class TeacherContext:
    corpus: TokenCorpus
    workdir: Path  # the teacher stage's own artifact directory (write weights here)
    device: torch.device
    seed: int
    progress: Progress = no_progress


class LoadedTeacher:
    """A teacher ready for the oracle pass."""

    vocab_size: int
    hidden_size: int
    info: dict[str, Any]  # JSON-able: source, dtype, val_loss, random_weights flag, ...

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] int64 → (hidden [B, T, H], logits [B, T, V]) for the configured layer."""
        raise NotImplementedError


TokenizerMismatch = Literal["error", "allow"]


class Teacher(Component):
    axis_labels: ClassVar[tuple[str, ...]] = ()  # names `[axes] teacher` may use besides the plugin name

    def __init_subclass__(cls, **kwargs):
        """Every teacher's Params gains `tokenizer_mismatch`: "error" (default) refuses a corpus whose
        tokenizer maps ids to other tokens than the teacher's; "allow" runs it anyway (the report
        then carries a warning banner), e.g. to reproduce the reference (its §12)."""
        super().__init_subclass__(**kwargs)
        if "tokenizer_mismatch" not in cls.Params.model_fields:
            field_ = (TokenizerMismatch, Field("error", description='"allow": run on a corpus made with '
                                                                     'another tokenizer (reference §12)'))
            cls.Params = create_model(cls.Params.__name__, __base__=cls.Params, __module__=cls.Params.__module__,
                                      __doc__=cls.Params.__doc__, tokenizer_mismatch=field_)

    def tokenizer(self) -> Path | Literal["corpus"] | None:
        """The tokenizer whose ids this teacher reads: a tokenizer.json file; "corpus" when the
        teacher learns the corpus's own ids (trained on it); None when unknown (then only the
        oracle pass's teacher-health check guards against a mismatch). Must not do heavy work."""
        return None

    def check(self, corpus_vocab_size: int) -> None:
        """Fail fast (raise ablate.errors.SpecError/InputError) before any work: weights
        reachable, vocabulary compatible. Must not do heavy work."""

    def prepare(self, ctx: TeacherContext) -> dict[str, Any]:
        """Produce whatever the teacher needs in ctx.workdir (e.g. train and save_pretrained a
        local model). Cached by the engine. Returns JSON-able info (e.g. val_loss)."""
        return {}

    def load(self, ctx: TeacherContext) -> LoadedTeacher:
        raise NotImplementedError


# -------------------------------------------------------------------------------- objectives


@dataclass
class ObjectiveContext:
    vocab_size: int
    token_frequencies: torch.Tensor  # [V] float64 counts over the train stream


@dataclass
class ObjectiveBatch:
    """Everything an objective may read for one training step.

    logits:        [B, T, V] final merged logits (z_LM + z_r); bf16 under autocast
    targets:       [B, T] int64 next tokens
    tokens:        [B, T] int64 inputs (targets are tokens shifted by one)
    router_logits: [B, T, V] the router's logits z_r, or None when the router is off

    For an objective with `accepts_linear_logits`, logits and router_logits may instead be
    LinearLogits (x [B, T, d] · Eᵀ, ablate.model.logits), which the `ablate.api.losses` functions
    form a chunk of positions at a time; `as_tensor` forms the whole tensor.
    teacher_rows:  [B, T] int64 canonical sidecar row per position, −1 where masked (p < 2)
    sidecar:       [N, V] mean teacher logits per row (bf16 or fp32), or None
    """

    logits: Logits
    targets: torch.Tensor
    tokens: torch.Tensor
    router_logits: Logits | None = None
    teacher_rows: torch.Tensor | None = None
    sidecar: torch.Tensor | None = None


@dataclass
class ObjectiveResult:
    loss: torch.Tensor  # scalar, differentiable
    terms: dict[str, torch.Tensor]  # detached scalars to log, e.g. {"ce": ..., "kl": ...}


class Objective(Component):
    needs_router: ClassVar[bool] = False
    needs_sidecar: ClassVar[bool] = False
    # True: the objective hands batch.logits and batch.router_logits only to the ablate.api.losses
    # functions (or `as_tensor`), so they may arrive as LinearLogits and no [B, T, V] tensor is formed
    # (the fused loss head). False: they arrive as [B, T, V] tensors.
    accepts_linear_logits: ClassVar[bool] = False

    def __init__(self, params: Params, ctx: ObjectiveContext):
        super().__init__(params)
        self.ctx = ctx

    def formula(self) -> str:
        """The exact formula with parameter values, as markdown text."""
        raise NotImplementedError

    def __call__(self, batch: ObjectiveBatch) -> ObjectiveResult:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ probes


@dataclass
class InjectionTrace:
    """One injection layer on one batch (B batch, T positions, d hidden, k retrieved rows, H heads)."""

    h_in: torch.Tensor  # [B, T, d] hidden state the injection reads
    inj: torch.Tensor  # [B, T, d] gated injection tanh(a)·out, before inject_mult
    out: torch.Tensor  # [B, T, d] pre-gate cross-attention output
    indices: torch.Tensor  # [B, T, k] int64 retrieved table rows
    sims: torch.Tensor  # [B, T, k] cosine similarities of the retrieved rows
    attn: torch.Tensor  # [B, T, H, k] attention weights over the retrieved rows


class Trace:
    """A traced forward of one batch of inputs [B, T].

    layers: injection layer → its InjectionTrace; aligned: [B, T, d] W_align(e), e = the last
    injection's output (None without router). `logits` [B, T, V] (final logits z_LM + z_r) and
    `router_logits` [B, T, V] (z_r = α·W_align(e)·Eᵀ; None without router) are tensors when read;
    a student with the fused loss head hands them over as factors (ablate.model.logits), formed on
    first access, so a probe that never reads one costs no [B, T, V] tensor.
    """

    def __init__(self, logits: Logits, layers: dict[int, InjectionTrace], router_logits: Logits | None = None,
                 aligned: torch.Tensor | None = None):
        self._logits, self._router_logits = logits, router_logits
        self.layers, self.aligned = layers, aligned

    @property
    def logits(self) -> torch.Tensor:
        self._logits = _formed(self._logits)
        return self._logits

    @property
    def router_logits(self) -> torch.Tensor | None:
        if self._router_logits is not None:
            self._router_logits = _formed(self._router_logits)
        return self._router_logits


def _formed(logits: Logits) -> torch.Tensor:
    """The tensor, a factored one formed as the trace ran: no grad, autocast off (float32)."""
    if isinstance(logits, torch.Tensor):
        return logits
    with torch.no_grad(), torch.autocast(device_type=logits.inputs.device.type, enabled=False):
        return as_tensor(logits)


@dataclass
class RouterState:
    """The skip-to-logit router's parameters (detached)."""

    W_align: torch.Tensor  # [d, d]
    log_alpha: float
    alpha: float  # exp(log_alpha), computed in the parameter's dtype


@runtime_checkable
class StudentView(Protocol):
    """What a probe may read of a trained student (ablate.model.student.Student implements it).
    Every method runs in eval mode, without grad and with autocast off, and restores the
    student's mode. Returned tensors are on the student's device."""

    @property
    def injection_layers(self) -> list[int]:
        """The layers after which an injection sits, ascending."""

    @property
    def table(self) -> torch.Tensor:
        """[N, E] float32 oracle table the student retrieves from."""

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, d] the LM-head (tied embedding) matrix E, detached."""

    @property
    def router(self) -> RouterState | None:
        """The router's parameters; None when the cell has no router."""

    def gate(self, layer: int) -> float:
        """tanh(a) of the injection after `layer`."""

    def trace(self, tokens: torch.Tensor) -> Trace:
        """tokens [B, T] int64 → Trace of the forward pass (inject_mult = 1)."""

    def inject(self, layer: int, h_in: torch.Tensor, table: torch.Tensor) -> InjectionTrace:
        """The injection of `layer` recomputed on h_in [B, T, d] against another table [N', E]."""

    def row_values(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [m] int64 of the own table → (LayerNorm(T[rows]) [m, E], W_v·LayerNorm(T[rows]) [m, d])
        as the injection of `layer` computes its keys' and values' inputs."""


@dataclass
class CellView:
    """A trained cell as probes see it (read-only).

    student:  the trained student as a StudentView (its only interface for probes)
    history:  logged training rows (dicts keyed by column name, e.g. step, loss, ce, kl, alpha)
    evals:    validation rows: {"step": int, "val_loss": float}
    val_batches: fixed probe batches, each [B, T+1] int64 (same tokens for every cell)
    teacher_rows / sidecar: as in ObjectiveBatch, for the probe batches ([B, T] per batch)
    """

    name: str
    config: dict[str, Any]  # the resolved cell config (router, oracle, objective, ...)
    student: StudentView | None
    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    val_batches: list[torch.Tensor]
    teacher_rows: list[torch.Tensor]
    sidecar: torch.Tensor | None
    device: torch.device

    def inputs(self, i: int) -> torch.Tensor:
        """Probe batch i [B, T+1] → the model inputs [B, T] on `device`."""
        return self.val_batches[i][:, :-1].to(self.device)


# What the report reads a metric as, besides its value (a probe may give a metric one role).
METRIC_ROLES = {
    "gain_over_control": "pair metric, nats: val_loss(control) − val_loss(real); quoted per pair under Validation "
                         "loss (positive: the real oracle content lowered the loss)",
    "retrieval_noop": "per-layer pair metric: 1.0 when the control table leaves the real cell's retrieval output "
                      "unchanged, else 0.0; read by Control validity",
    "retrieval_diff": "per-layer pair metric: the max |difference| behind retrieval_noop",
}


@dataclass(frozen=True)
class Metric:
    """One metric a probe returns. `name` may hold `{l}`: one metric per injection layer l."""

    name: str
    meaning: str  # one-line definition, printed under Metric definitions
    unit: str = ""  # e.g. "nats per token", "unitless", "rows"
    section: str = ""  # the report groups metrics by it ("" = the probe's name)
    role: str | None = None  # a key of METRIC_ROLES, when the report reads it as more than a value
    convention: str = ""  # a convention the report prints under Conventions (a sign, a unit choice)

    def __post_init__(self):
        if self.role is not None and self.role not in METRIC_ROLES:
            raise ValueError(f"metric {self.name!r}: unknown role {self.role!r}; roles: {', '.join(METRIC_ROLES)}")

    def info(self) -> dict[str, Any]:
        """JSON-able metadata (results.json `metric_info`)."""
        return {"meaning": self.meaning, "unit": self.unit, "section": self.section, "role": self.role,
                "convention": self.convention}


class MetricTable(dict):
    """A probe's metrics: name → meaning (a plain dict to every reader), with the full Metric
    records in `info` (name → Metric)."""

    def __init__(self, metrics: Iterable[Metric] = ()):
        self.info: dict[str, Metric] = {m.name: m for m in metrics}
        super().__init__({name: m.meaning for name, m in self.info.items()})


def metric_table(declared: Any, section: str) -> MetricTable:
    """A probe's `metrics` as declared (Metric records, or {name: meaning} / {name: Metric}) →
    MetricTable; a Metric without a section gets `section`."""
    if isinstance(declared, MetricTable):
        return declared
    if isinstance(declared, Mapping):
        items = [m if isinstance(m, Metric) else Metric(name, str(m)) for name, m in declared.items()]
    else:
        items = list(declared)
    bad = [m for m in items if not isinstance(m, Metric)]
    if bad:
        raise TypeError(f"metrics must be Metric records or a {{name: meaning}} dict; got {bad[0]!r}")
    return MetricTable(m if m.section else replace(m, section=section) for m in items)


class Probe(Component):
    """scope 'cell' probes see one CellView; scope 'pair' probes see the real and shuffled
    cells of a pair (same settings, oracle real vs shuffled) and report on the real one.

    `metrics` declares what `run` may return: a tuple of Metric (or, older form, a dict
    name → meaning); it reads as a MetricTable (name → meaning, full records in `.info`)."""

    scope: ClassVar[Literal["cell", "pair"]] = "cell"
    metrics: ClassVar[MetricTable] = MetricTable()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.metrics = metric_table(cls.__dict__.get("metrics", cls.metrics), getattr(cls, "name", cls.__name__))

    def run(self, *cells: CellView) -> dict[str, float]:
        raise NotImplementedError
