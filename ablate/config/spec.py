"""The experiment spec: pydantic models, TOML loading, profiles, `--set` overrides, sweeps.

`load_spec` reports every problem at once (SpecError with TOML locations such as
`cells[2].objective.lambda`), after checking each referenced plugin and its own parameters.
Nothing here imports torch.
"""

from __future__ import annotations

import copy
import itertools
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from ablate.config import expr
from ablate.errors import SpecError


# Spec, cell and profile names (sweep-expanded cell names too) are single path components: never
# '.', '..', a path, a hidden name or an option-like '-x'.
PATH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=@+-]{0,199}")


def _path_name(name: str) -> str:
    if not PATH_NAME.fullmatch(name):
        raise ValueError("a name must be one plain file name: at most 200 letters, digits and _ . , = @ + -, "
                         "starting with a letter, digit or _ (so not '.', '..', a path or a hidden name)")
    return name


PathName = Annotated[str, AfterValidator(_path_name)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PluginRef(BaseModel):
    """`plugin = "name"` plus that plugin's own parameters (validated by the plugin's model)."""

    model_config = ConfigDict(extra="allow")
    plugin: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ObjectiveRef(BaseModel):
    """`objective = "ce"` or `objective = { name = "kl_ce", lambda = 0.5 }`."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PretrainSpec(Strict):
    steps: int = Field(300, ge=1)
    batch: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(30, ge=0)
    seed: int = 0


class BackboneSpec(Strict):
    """The frozen student backbone: pretrained on the corpus, or loaded from a checkpoint: ablate's
    safetensors, or the reference's checkpoint.pt / model_step_N.safetensors (format detected, imported
    without running the pickle; ablate.model.reference_import)."""

    source: Literal["pretrain", "checkpoint"] = "pretrain"
    checkpoint: str | None = None
    hidden_dim: int = Field(512, ge=8)
    num_layers: int = Field(8, ge=1)
    num_query_heads: int = Field(8, ge=1)
    num_kv_heads: int = Field(4, ge=1)
    head_dim: int = Field(64, ge=2)
    ffn_dim: int = Field(1365, ge=1)
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    max_seq_len: int = Field(4096, ge=2)
    layers_per_block: int = Field(2, ge=1)
    # a reference checkpoint's injection/router tensors initialise the cells' adapters (else they start fresh)
    init_adapters: bool = False
    pretrain: PretrainSpec = PretrainSpec()

    @model_validator(mode="after")
    def _check(self):
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError('source = "checkpoint" needs `checkpoint = "path/to/backbone.safetensors"` '
                             "(or the reference's checkpoint.pt / model_step_N.safetensors)")
        if self.source == "pretrain" and self.checkpoint:
            raise ValueError('`checkpoint` is set but source = "pretrain"; set source = "checkpoint" to use it')
        if self.init_adapters and self.source != "checkpoint":
            raise ValueError('init_adapters = true reads the adapters of a reference checkpoint; set source = '
                             '"checkpoint" and checkpoint = "…/checkpoint.pt", or drop init_adapters')
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(f"num_query_heads {self.num_query_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates halves)")
        return self

    def architecture(self) -> dict[str, Any]:
        return self.model_dump(exclude={"source", "checkpoint", "pretrain", "init_adapters"})


class OracleSpec(Strict):
    rows: int = Field(10000, ge=1)
    engram_dim: int = Field(128, ge=1)
    seeds: list[int] = [42, 99, 137, 251]
    orders: list[Literal[2, 3]] = [2, 3]
    batch: int = Field(16, ge=1)
    seq_len: int = Field(2048, ge=3)
    max_tokens: int | None = Field(None, ge=1)
    shuffle_seed: int = 0
    gaussian_seed: int = 42
    pca_sample_min: int = Field(512, ge=1)
    pca_sample_frac: float = Field(0.2, gt=0, le=1)
    pca_seed: int = 42
    cos_sample: int = Field(2000, ge=2)
    # Teacher health (reference §12), measured in the oracle pass: the teacher's next-token
    # cross-entropy on the corpus it reads must stay below teacher_max_ce (nats; a number or an
    # expression over the threshold names). "allow" records a failure instead of stopping.
    teacher_max_ce: float | str = "unigram_entropy"
    teacher_health: Literal["error", "allow"] = "error"
    # source = "files": import the reference's oracle files (§11.3, ablate.oracle.files) instead of
    # running the oracle pass; paths are read from the directory ablate runs in. The shuffled twin
    # is optional (else built from shuffle_seed, §4.5); stats is the reference's <table>.stats.json.
    source: Literal["teacher", "files"] = "teacher"
    table: str | None = None
    sidecar: str | None = None
    stats: str | None = None
    shuffled_table: str | None = None
    shuffled_sidecar: str | None = None

    def files(self) -> dict[str, str]:
        """The file fields that are set: {"table": path, "sidecar": path, ...}."""
        names = ("table", "sidecar", "stats", "shuffled_table", "shuffled_sidecar")
        return {n: getattr(self, n) for n in names if getattr(self, n)}

    @model_validator(mode="after")
    def _files(self):
        given = list(self.files())
        if self.source == "teacher" and given:
            raise ValueError(f'{", ".join(given)} set but source = "teacher"; set source = "files" to import them')
        if self.source == "files":
            if not (self.table and self.sidecar):
                raise ValueError('source = "files" needs `table = "<stem>.safetensors"` and `sidecar = '
                                 '"<stem>_teacher_logits.safetensors"` (stats and the shuffled twins are optional)')
            if bool(self.shuffled_table) != bool(self.shuffled_sidecar):
                raise ValueError("set both shuffled_table and shuffled_sidecar (the reference's "
                                 "_shuffled_seed0 files) or neither (then the twin is built from shuffle_seed)")
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v:
            raise ValueError("at least one hash seed is needed")
        if any(s < 0 or s >= 2**64 for s in v):
            raise ValueError("hash seeds are unsigned 64-bit integers")
        return v

    @field_validator("teacher_max_ce")
    @classmethod
    def _bound(cls, v):
        if isinstance(v, str):
            bad = expr.names_in(v) - set(expr.KNOWN_NAMES)
            if bad:
                raise ValueError(f"unknown name(s) {sorted(bad)} in {v!r}; known: {', '.join(expr.KNOWN_NAMES)}")
        return v


class ModelSpec(Strict):
    inject_layers: list[int] = [2, 5]
    top_k: int = Field(8, ge=1)
    num_heads: int = Field(8, ge=1)
    retrieval_bias: float = 1.0
    gate_init: float = 0.0
    alpha_init: float = Field(0.1, gt=0)
    # the engram top-k search (ablate.model.engram): "auto" = "bf16-rerank" on CUDA, "float32" elsewhere;
    # "float32" = exact everywhere. Under numerics = "upstream" the reference's autocast search is used.
    similarity: Literal["auto", "float32", "bf16-rerank"] = "auto"


class TrainSpec(Strict):
    steps: int = Field(2000, ge=1)
    batch: int = Field(4, ge=1)
    seq_len: int = Field(2048, ge=3)
    lr: float = Field(9e-4, gt=0)
    warmup: int = Field(100, ge=0)
    decay_frac: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(250, ge=1)
    eval_batches: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    precision: Literal["fp32", "bf16"] = "bf16"
    vcontrast_weight: float = Field(1.0, ge=0)
    qdiv_weight: float = Field(0.01, ge=0)
    aux_warmup: int = Field(200, ge=0)
    model_seed: int = 42
    data_seed: int = 42
    val_seed: int = 43
    checkpoint_every: int = Field(100, ge=0)  # steps between resumable checkpoints; 0 = only at the end
    # torch.compile of the cells' hot paths on CUDA: "auto" compiles when the run's cells train at
    # least COMPILE_MIN_STEPS steps together (compiling costs minutes once; docs/performance.md)
    compile: Literal["auto", "on", "off"] = "auto"
    # fused cells (ablate.training.fused): cells on the same backbone, oracle and training windows
    # (same seed) train as one group in the local executor, one forward (the frozen layers once) and
    # one backward per step; every cell's numbers equal its separate run's (bitwise on the CPU).
    # "auto" fuses where it pays: on CUDA with the cells compiled, numerics "ablate" (cells.fuses);
    # "on" wherever cells share their windows, the CPU and eager cells too; "off": one by one
    fuse: Literal["auto", "on", "off"] = "auto"


class PluginTables(Strict):
    """A section with its own keys and one table of parameters per plugin it selects, `[<section>.<name>]`
    (validated by that plugin's Params in _check_plugins)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    section: ClassVar[str]
    kind: ClassVar[str]

    @model_validator(mode="after")
    def _tables(self):
        keys = [k for k, v in (self.model_extra or {}).items() if not isinstance(v, dict)]
        if keys:
            own = ", ".join(type(self).model_fields)
            raise ValueError(f"unknown key(s) {', '.join(map(repr, keys))}: [{self.section}] holds {own}, and one table "
                             f"[{self.section}.<{self.kind} name>] of parameters per {self.kind}")
        return self

    def tables(self) -> dict[str, dict[str, Any]]:
        """Plugin name → its parameter table."""
        return {k: dict(v) for k, v in (self.model_extra or {}).items()}


class ProbeSpec(PluginTables):
    """[probes]: the probe batches; `use`, the probes that run (None: the built-ins; a probe not
    listed does not run); one table `[probes.<name>]` per probe with that probe's parameters."""

    section, kind = "probes", "probe"
    batches: int = Field(2, ge=1)
    batch: int = Field(4, ge=1)
    seq_len: int | None = Field(None, ge=3)
    seed: int = 0
    use: list[str] | None = None


class LoggerSpec(PluginTables):
    """[loggers]: `use`, the loggers that receive the run's events (none unless listed; `ablate run
    --logger NAME` adds one); one table `[loggers.<name>]` per logger with its parameters."""

    section, kind = "loggers", "logger"
    use: list[str] = []


class CellSpec(Strict):
    name: PathName
    router: bool = False
    oracle: Literal["real", "shuffled", "gaussian"] = "real"
    objective: ObjectiveRef = ObjectiveRef(name="ce")
    # the cell's training seed, set by `[sweep] seed = [...]`: it offsets train.model_seed (the
    # adapters' init) and train.data_seed (the training batches); validation windows stay the same
    seed: int | None = Field(None, ge=0)
    # set by [sweep] expansion: the spec cell this one was generated from, and its point on the sweep
    # grid (axis → value label, e.g. {"lambda": "0.9", "seed": "1"}); read, never parsed from the name
    base: str | None = None
    sweep: dict[str, str] = {}

    @field_validator("objective", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @property
    def base_name(self) -> str:
        """The spec cell's name (the cell's own name when no sweep generated it)."""
        return self.base or self.name

    @property
    def sweep_label(self) -> str:
        """`lambda=0.9,seed=1`; "" for a cell no sweep generated."""
        return ",".join(f"{k}={v}" for k, v in self.sweep.items())

    @property
    def seed_group(self) -> str:
        """The cell's name without its seed (`router_on_real@lambda=0.9,seed=2` → `router_on_real@lambda=0.9`):
        thresholds, combinations and discriminators are read per seed group, over its seeds."""
        rest = ",".join(f"{k}={v}" for k, v in self.sweep.items() if k != SEED_KEY)
        return f"{self.base_name}@{rest}" if rest else self.base_name


class SweepSpec(BaseModel):
    """`[sweep] cells = [...]` plus dotted keys with value lists, e.g. "objective.lambda" = [0.5, 0.9].
    `seed = [0, 1, 2]` is the seed axis: it applies to every cell, listed in `cells` or not."""

    model_config = ConfigDict(extra="allow")
    cells: list[str] = []

    def axes(self) -> dict[str, list[Any]]:
        return dict(self.model_extra or {})


class RuleSpec(Strict):
    below: float | str | None = None
    at_most: float | str | None = None
    above: float | str | None = None
    at_least: float | str | None = None
    outside: list[float | str] | None = None
    inside: list[float | str] | None = None

    @model_validator(mode="after")
    def _one(self):
        set_ = [k for k, v in self if v is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of below, at_most, above, at_least, outside, inside (got {set_ or 'none'})")
        k = set_[0]
        if k in ("outside", "inside") and len(getattr(self, k)) != 2:
            raise ValueError(f"{k} needs [low, high]")
        for bound in self.bounds():
            if isinstance(bound, str):
                bad = expr.names_in(bound) - set(expr.KNOWN_NAMES)
                if bad:
                    raise ValueError(f"unknown name(s) {sorted(bad)} in {bound!r}; known: {', '.join(expr.KNOWN_NAMES)}")
        return self

    def kind(self) -> str:
        return next(k for k, v in self if v is not None)

    def bounds(self) -> list[float | str]:
        v = getattr(self, self.kind())
        return list(v) if isinstance(v, list) else [v]


class ThresholdSpec(Strict):
    name: str
    metric: str
    cells: list[str] = Field(min_length=1)
    break_if: RuleSpec


class StrongSpec(Strict):
    """A strong-result bound, separate from the crossing thresholds (reference §7.3: content_gain
    ≥ 0.005 → strong result): `metric` on the `strong_if` side in a cell marks it strong; it is
    never counted as a crossing. `[[combine.strong]] metric = "content_gain"
    cells = ["router_on_real"]  strong_if = { at_least = 0.005 }`."""

    metric: str
    cells: list[str] = Field(min_length=1)
    strong_if: RuleSpec


# A strong bound, or (older form) the name of a threshold whose BREAK also marks a strong result.
StrongItem = Annotated[Annotated[StrongSpec, Tag("bound")] | Annotated[str, Tag("threshold name")],
                       Discriminator(lambda v: "threshold name" if isinstance(v, str) else "bound")]


class CombineSpec(Strict):
    soft_at: int = Field(1, ge=1)
    broken_at: int = Field(2, ge=1)
    strong: list[StrongItem] = []

    def strong_bounds(self, thresholds: list[ThresholdSpec]) -> list[StrongSpec]:
        """Every strong bound; a threshold name becomes that threshold's metric, cells and rule."""
        by_name = {t.name: t for t in thresholds}
        return [s if isinstance(s, StrongSpec) else
                StrongSpec(metric=by_name[s].metric, cells=by_name[s].cells, strong_if=by_name[s].break_if)
                for s in self.strong if isinstance(s, StrongSpec) or s in by_name]


class DiscriminatorSpec(Strict):
    real: str
    shuffled: str


class AxesSpec(Strict):
    """Labels placing the run on the outer objective × teacher matrix (checked in check_references)."""

    objective: str = "unspecified"
    teacher: str = "unspecified"


class ExpectSpec(Strict):
    thresholds: dict[str, Literal["HOLD", "BREAK", "UNDECIDED"]] = {}  # "threshold@cell" → verdict
    combination: dict[str, Literal["holds", "soft signal", "broken", "undecided"]] = {}
    # real cell → outcome
    discriminator: dict[str, Literal["cheap_win", "clean_positive", "holds", "anomaly", "undecided"]] = {}
    metrics: dict[str, RuleSpec] = {}  # "metric@cell" → a rule that must read BREAK-side (i.e. be satisfied)


class Spec(Strict):
    name: PathName
    description: str = ""
    seed: int = 0
    # "ablate": ablate's documented numerics; "upstream": every choice of reference §11.4 made as the
    # reference makes it (docs/fidelity.md lists each difference and its measured size)
    numerics: Literal["ablate", "upstream"] = "ablate"
    # directories chosen by the user (relative or absolute, may contain `/`); names below them are PathNames
    runs_dir: str = "runs"
    reports_dir: str = "reports"
    cache_dir: str = ".ablate-cache"
    axes: AxesSpec = AxesSpec()
    corpus: PluginRef
    backbone: BackboneSpec = BackboneSpec()
    teacher: PluginRef
    oracle: OracleSpec = OracleSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    probes: ProbeSpec = ProbeSpec()
    executor: PluginRef = PluginRef(plugin="local")  # who runs the cell jobs (ablate.pipeline.executors)
    loggers: LoggerSpec = LoggerSpec()  # who receives the run's events (ablate.pipeline.events); no effect on results
    cells: list[CellSpec] = Field(min_length=1)
    sweep: SweepSpec | None = None
    thresholds: list[ThresholdSpec] = []
    combine: CombineSpec = CombineSpec()
    discriminator: list[DiscriminatorSpec] = []
    expect: ExpectSpec | None = None
    profiles: dict[PathName, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check_numerics(self):
        if self.numerics == "upstream" and "similarity" in self.model.model_fields_set:
            raise ValueError('model.similarity is set but numerics = "upstream" searches in the autocast dtype '
                             'as the reference does; remove model.similarity or use numerics = "ablate"')
        return self


# ------------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] = (), profile: str | None = None, registry=None,
              loggers: list[str] = ()) -> Spec:
    """Read, override, validate (schema, plugins, cross-references) and expand sweeps; `loggers`
    (`ablate run --logger NAME`) are added to `[loggers] use`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([("", f"spec file {path} does not exist; pass the path of a .toml spec (see specs/)")], str(path))
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([("", f"TOML syntax error: {exc}. Fix the file at that line.")], str(path)) from None
    except UnicodeDecodeError:
        raise SpecError([("", "the file is not UTF-8 text; a spec is a TOML file")], str(path)) from None
    return spec_from_dict(raw, overrides, profile, registry, source=str(path), loggers=loggers)


def spec_from_dict(raw: dict, overrides=(), profile=None, registry=None, source="spec", loggers=()) -> Spec:
    raw = copy.deepcopy(raw)
    problems: list[tuple[str, str]] = []
    if profile is not None:
        profiles = raw.get("profiles", {})
        if not isinstance(profiles, dict) or profile not in profiles:
            names = ", ".join(sorted(profiles)) if isinstance(profiles, dict) and profiles else "none"
            raise SpecError([("profiles", f"unknown profile {profile!r}; this spec defines: {names}")], source)
        deep_merge(raw, profiles[profile])
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as exc:
            problems.append((f"--set {item}", str(exc)))
    if problems:
        raise SpecError(problems, source)
    section = raw.setdefault("loggers", {}) if loggers else None
    if isinstance(section, dict) and isinstance(section.setdefault("use", []), list):
        section["use"] = list(dict.fromkeys([*section["use"], *loggers]))
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([(_loc(e["loc"]), _msg(e)) for e in exc.errors()], source) from None
    problems = check_references(spec, registry)
    if problems:
        raise SpecError(problems, source)
    return expand_sweeps(spec, source)


def _loc(loc: tuple) -> str:
    out = ""
    for part in (p for p in loc if p != "[key]"):  # a dict key's own error: located at the key
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _msg(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (remove it or check its spelling)"
    if err["type"] == "missing":
        return "required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{err['msg']}{shown}"


def deep_merge(base: dict, extra: dict) -> None:
    """Merge `extra` into `base`. A table that switches to another plugin (or objective name)
    replaces the old table, since the old plugin's parameters mean nothing to the new one."""
    for key, value in extra.items():
        old = base.get(key)
        switches = isinstance(value, dict) and isinstance(old, dict) and any(
            k in value and value[k] != old.get(k) for k in ("plugin", "name"))
        if isinstance(value, dict) and isinstance(old, dict) and not switches:
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def parse_value(text: str) -> Any:
    """A `--set` value is read as a TOML value (42, 0.5, true, "x", [1, 2]); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, item: str) -> None:
    """Apply `a.b.c=value` (list items by index: `cells.2.router=true`). The key must already
    exist or belong to a section pydantic will check, so typos surface as unknown keys."""
    if "=" not in item:
        raise ValueError("expected key=value, e.g. train.steps=50")
    key, text = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError("empty key")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[: i + 1]), create=True)
    last = parts[-1]
    value = parse_value(text.strip())
    if isinstance(node, list):
        node[_index(node, last, key)] = value
        return
    old = node.get(last)
    if old is not None and not _same_kind(old, value):
        raise ValueError(f"{key} is {type(old).__name__} {old!r} in the spec; {value!r} is {type(value).__name__}")
    node[last] = value


def _child(node, part, where, create):
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ValueError(f"{where} is not a table")
    if part not in node:
        if not create:
            raise ValueError(f"{where} does not exist")
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str) -> int:
    if not re.fullmatch(r"\d+", part) or int(part) >= len(node):
        raise ValueError(f"{where}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _same_kind(old, new) -> bool:
    """Numbers and booleans keep their kind; other values are left to the schema to judge."""
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) == isinstance(new, bool) or not isinstance(old, (int, float))
    if isinstance(old, (int, float)):
        if not isinstance(new, (int, float)):
            return False
        return not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    return True


# ------------------------------------------------------------------------ cross-references


def check_references(spec: Spec, registry) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    names = [c.name for c in spec.cells]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(("cells", f"duplicate cell name {name!r}; cell names must be unique"))
    known = set(names)

    bb = spec.backbone
    for i, layer in enumerate(spec.model.inject_layers):
        if not 0 <= layer < bb.num_layers:
            problems.append((f"model.inject_layers[{i}]", f"layer {layer} is outside 0..{bb.num_layers - 1} (backbone.num_layers = {bb.num_layers})"))
    if spec.model.top_k > spec.oracle.rows:
        problems.append(("model.top_k", f"top_k {spec.model.top_k} exceeds oracle.rows {spec.oracle.rows}"))
    if spec.model.num_heads and bb.hidden_dim % spec.model.num_heads:
        problems.append(("model.num_heads", f"backbone.hidden_dim {bb.hidden_dim} is not divisible by {spec.model.num_heads} heads"))
    if spec.train.seq_len > bb.max_seq_len:
        problems.append(("train.seq_len", f"{spec.train.seq_len} exceeds backbone.max_seq_len {bb.max_seq_len}"))

    if spec.sweep is not None:
        for i, cell in enumerate(spec.sweep.cells):
            if cell not in known:
                problems.append((f"sweep.cells[{i}]", f"no cell named {cell!r}; cells are: {', '.join(names)}"))
        for key, values in spec.sweep.axes().items():
            if not isinstance(values, list) or not values:
                problems.append((f"sweep.{key}", "a sweep axis needs a non-empty list of values"))
            elif key == SEED_KEY:
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) \
                        or len(set(values)) != len(values):
                    problems.append(("sweep.seed", "seeds are distinct non-negative integers, e.g. seed = [0, 1, 2]"))
            elif not (key in ("objective", "router", "oracle") or key.startswith("objective.")):
                problems.append((f"sweep.{key}", 'sweep keys are cell fields: "objective" (whole objective tables), '
                                                 '"objective.<param>", "router" or "oracle"; or "seed"'))

    for i, th in enumerate(spec.thresholds):
        for j, cell in enumerate(th.cells):
            if cell not in known:
                problems.append((f"thresholds[{i}].cells[{j}]", f"no cell named {cell!r}; cells are: {', '.join(names)}"))
    for i, d in enumerate(spec.discriminator):
        for role in ("real", "shuffled"):
            if getattr(d, role) not in known:
                problems.append((f"discriminator[{i}].{role}", f"no cell named {getattr(d, role)!r}; cells are: {', '.join(names)}"))
    th_names = [t.name for t in spec.thresholds]
    for i, s in enumerate(spec.combine.strong):
        if isinstance(s, str) and s not in th_names:
            problems.append((f"combine.strong[{i}]", f"no threshold named {s!r}; thresholds are: {', '.join(th_names) or 'none'}"))
        for j, cell in enumerate(s.cells if isinstance(s, StrongSpec) else []):
            if cell not in known:
                problems.append((f"combine.strong[{i}].cells[{j}]", f"no cell named {cell!r}; cells are: {', '.join(names)}"))
    if spec.combine.broken_at < spec.combine.soft_at:
        problems.append(("combine.broken_at", f"broken_at {spec.combine.broken_at} must be ≥ soft_at {spec.combine.soft_at}"))
    if spec.expect is not None:
        for key in spec.expect.thresholds:
            t, _, c = key.partition("@")
            if t not in th_names or c not in known:
                problems.append((f"expect.thresholds.{key}", "expected 'threshold@cell' naming a threshold and a cell of this spec"))
        for key in list(spec.expect.combination) + list(spec.expect.discriminator):
            if key not in known:
                problems.append((f"expect.{key}", f"no cell named {key!r}"))
        for key in spec.expect.metrics:
            metric, _, cell = key.partition("@")
            if not metric or cell not in known:
                problems.append((f"expect.metrics.{key}", "expected 'metric@cell' naming a metric and a cell of this spec"))

    problems += _check_axes(spec, registry)
    if registry is not None:
        problems += _check_plugins(spec, registry)
    return problems


def _check_axes(spec: Spec, registry) -> list[tuple[str, str]]:
    """`[axes] objective` names an objective some cell runs; `teacher` the teacher plugin in use
    or a label its class declares (Teacher.axis_labels); "unspecified" is always allowed."""
    swept = spec.sweep.axes().get("objective") if spec.sweep is not None else None
    objectives = set()
    for cell in spec.cells:
        if isinstance(swept, list) and cell.name in spec.sweep.cells:
            named = [v.get("name") if isinstance(v, dict) else v for v in swept]
            objectives |= {n for n in named if isinstance(n, str)}
        else:
            objectives.add(cell.objective.name)
    checks = [("objective", objectives, "an objective some cell runs")]
    found = registry.components["teacher"].get(spec.teacher.plugin) if registry is not None else None
    if registry is None or found is not None:  # an unknown teacher plugin is reported by _check_plugins
        labels = {spec.teacher.plugin, *(getattr(found.cls, "axis_labels", ()) if found else ())}
        checks.append(("teacher", labels, f"the teacher in use ({spec.teacher.plugin!r}) or a label it declares"))
    problems = []
    for axis, allowed, what in checks:
        allowed = sorted(allowed | {"unspecified"})
        value = getattr(spec.axes, axis)
        if value not in allowed:
            problems.append((f"axes.{axis}", f"{value!r} is not {what}; allowed: {', '.join(allowed)}"))
    return problems


def _check_plugins(spec: Spec, registry) -> list[tuple[str, str]]:
    from ablate.errors import AblateError

    problems: list[tuple[str, str]] = []

    def check(kind, name, params, where):
        try:
            cls = registry.get(kind, name)
        except AblateError as exc:
            problems.append((where, str(exc)))
            return None
        try:
            cls.Params.model_validate(params)
        except ValidationError as exc:
            for e in exc.errors():
                loc = _loc(e["loc"])
                allowed = ", ".join(cls.Params.model_fields) or "none"
                hint = f" — {kind} plugin {name!r} accepts: {allowed}" if e["type"] == "extra_forbidden" else ""
                problems.append((f"{where}.{loc}" if loc else where, _msg(e) + hint))
        return cls

    check("corpus", spec.corpus.plugin, spec.corpus.params(), "corpus")
    check("teacher", spec.teacher.plugin, spec.teacher.params(), "teacher")
    check("executor", spec.executor.plugin, spec.executor.params(), "executor")
    from ablate.oracle import tokenizer_identity

    problems += tokenizer_identity.spec_problems(spec, registry)
    for i, cell in enumerate(spec.cells):
        cls = check("objective", cell.objective.name, cell.objective.params(), f"cells[{i}].objective")
        if cls is not None and cls.needs_router and not cell.router:
            problems.append((f"cells[{i}]", f"objective {cell.objective.name!r} trains the router's distribution; set router = true or use objective \"ce\""))
    if spec.sweep is not None:
        for key, values in spec.sweep.axes().items():
            if not isinstance(values, list):
                continue
            for cell in (c for c in spec.cells if c.name in spec.sweep.cells):
                for v in values:
                    if key == "objective" and isinstance(v, (dict, str)):
                        ref = ObjectiveRef.model_validate({"name": v} if isinstance(v, str) else v)
                        cls = check("objective", ref.name, ref.params(), f"sweep.objective[{ref.name}]")
                        if cls is not None and cls.needs_router and not cell.router:
                            problems.append(("sweep.objective", f"objective {ref.name!r} needs router = true in cell {cell.name!r}"))
                    elif key.startswith("objective."):
                        field = key.split(".", 1)[1]
                        check("objective", cell.objective.name, {**cell.objective.params(), field: v}, f"sweep.{key}")
    from ablate.pipeline import probe_selection

    probe_problems, selected = probe_selection.probe_problems(spec, registry)
    problems += probe_problems
    from ablate.pipeline import events

    problems += events.selected_loggers(spec, registry)[0]
    layers = spec.model.inject_layers
    produced = probe_selection.expand_metric_names(probe_selection.declared_metrics(selected), layers)
    available = ", ".join(sorted(produced))

    def unproduced(metric: str) -> str:
        others = [r.cls.name for r in registry.components["probe"].values()
                  if metric in probe_selection.expand_metric_names(r.cls.metrics, layers)]
        hint = f"; probe {others[0]!r} declares it: add it to [probes] use" if others else ""
        return f"no probe produces metric {metric!r}{hint}; available: {available}"

    for i, th in enumerate(spec.thresholds):
        if th.metric not in produced:
            problems.append((f"thresholds[{i}].metric", unproduced(th.metric)))
    for i, s in enumerate(spec.combine.strong):
        if isinstance(s, StrongSpec) and s.metric not in produced:
            problems.append((f"combine.strong[{i}].metric", unproduced(s.metric)))
    for key in spec.expect.metrics if spec.expect is not None else {}:
        metric = key.partition("@")[0]
        if metric and metric not in produced:
            problems.append((f"expect.metrics.{key}", unproduced(metric)))
    return problems


# ---------------------------------------------------------------------------------- sweeps


SEED_KEY = "seed"


def expand_sweeps(spec: Spec, source: str = "spec") -> Spec:
    """Replace each swept cell by one cell per point of the sweep grid, named `cell@key=value,...`;
    SpecError when a generated cell is invalid (e.g. its name is no plain file name) or repeated.
    The seed axis (`seed = [...]`) applies to every cell and comes last in the name:
    `router_on_real@lambda=0.5,seed=1`, `router_off_real@seed=1`."""
    if spec.sweep is None:
        return spec
    swept = spec.sweep.axes()
    seeds = swept.pop(SEED_KEY, None)
    if not spec.sweep.cells:
        swept = {}
    if not swept and seeds is None:
        return spec
    cells: list[CellSpec] = []
    problems: list[tuple[str, str]] = []
    for cell in spec.cells:
        axes = dict(swept) if cell.name in spec.sweep.cells else {}
        if seeds is not None:
            axes[SEED_KEY] = seeds
        if not axes:
            cells.append(cell)
            continue
        keys = list(axes)
        labels = {k: _value_labels(axes[k]) for k in keys}
        for point in itertools.product(*(range(len(axes[k])) for k in keys)):
            data = cell.model_dump(by_alias=True)
            data["objective"] = {"name": cell.objective.name, **cell.objective.params()}
            for k, i in zip(keys, point):
                node = data
                *head, tail = k.split(".")
                for h in head:
                    node = node[h]
                node[tail] = copy.deepcopy(axes[k][i])
            data["base"], data["sweep"] = cell.name, {k.split(".")[-1]: labels[k][i] for k, i in zip(keys, point)}
            data["name"] = f"{cell.name}@" + ",".join(f"{k}={v}" for k, v in data["sweep"].items())
            try:
                cells.append(CellSpec.model_validate(data))
            except ValidationError as exc:
                problems += [(f"sweep (cell {data['name']!r}) {_loc(e['loc'])}", _msg(e) + "; change the sweep values")
                             for e in exc.errors()]
    names = [c.name for c in cells]
    problems += [("sweep", f"two cells are named {n!r}; give the sweep distinct values")
                 for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise SpecError(problems, source)
    return spec.model_copy(update={"cells": cells})


def _value_labels(values: list) -> list[str]:
    """Short names for sweep values; a whole objective table is named by its plugin name, plus
    the parameters that tell apart tables of the same plugin."""
    if not all(isinstance(v, dict) for v in values):
        return [str(v) for v in values]
    out = []
    for v in values:
        same = [w for w in values if w.get("name") == v.get("name")]
        differing = [k for k in v if k != "name" and len({str(w.get(k)) for w in same}) > 1]
        out.append("-".join([str(v.get("name"))] + [str(v[k]) if isinstance(v[k], str) else f"{k}{v[k]}" for k in differing]))
    return out


def cells_for(spec: Spec, name: str) -> list[CellSpec]:
    """The cells a threshold/discriminator naming `name` applies to (all its sweep expansions)."""
    return [c for c in spec.cells if c.name == name or c.base_name == name]


def seed_groups(cells: list[CellSpec]) -> dict[str, list[CellSpec]]:
    """Seed group → its cells (one per seed; one cell when there is no seed axis), in spec order."""
    out: dict[str, list[CellSpec]] = {}
    for c in cells:
        out.setdefault(c.seed_group, []).append(c)
    return out
