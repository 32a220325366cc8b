"""Run events and the dispatcher that hands them to the run's loggers.

Loggers are plugins of the `ablate_loggers` hook; none is active unless the spec lists it
(`[loggers] use`, one `[loggers.<name>]` table of parameters each) or `ablate run --logger NAME`
adds it. Events are small JSON-able records (a Ray worker's events travel as JSON lines), in run
order: run_started, stage_finished (each stage), per cell cell_started, cell_evaluated and
step_logged (metrics.csv's rows, as they are written), cell_finished or cell_failed; then
probes_finished and verdicts. A logger that raises is reported once through the UI and turned
off; the run goes on and its results do not depend on its loggers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from ablate.api.components import Component, Params
from ablate.errors import AblateError, SpecError


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = ""

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **dataclasses.asdict(self)})


@dataclass(frozen=True)
class RunStarted(Event):
    kind = "run_started"
    run: str  # the spec's name: the experiment
    run_dir: str  # runs/<name>
    spec: dict  # the resolved spec (spec.resolved.json)
    provenance: dict  # git revision, versions, device, command (as results.json's provenance)


@dataclass(frozen=True)
class StageFinished(Event):
    kind = "stage_finished"
    stage: str  # corpus, backbone, teacher, oracle, cells, probes
    key: str  # its cache key ("" for cells and probes)
    cached: bool
    seconds: float
    tokens: int | None  # tokens computed (None when cached or not counted)
    peaks: dict  # peak memory (results.json's stages)


@dataclass(frozen=True)
class CellStarted(Event):
    kind = "cell_started"
    cell: str
    config: dict  # the cell's resolved config: its own settings and the spec's that shape it
    steps: int
    resumed_from: int | None  # the checkpoint's step when the cell resumes


@dataclass(frozen=True)
class StepLogged(Event):
    kind = "step_logged"
    cell: str
    step: int
    values: dict  # column → value: the row of metrics.csv, without `step`


@dataclass(frozen=True)
class CellEvaluated(Event):
    kind = "cell_evaluated"
    cell: str
    step: int
    val_loss: float  # the row of evals.json


@dataclass(frozen=True)
class CellFinished(Event):
    kind = "cell_finished"
    cell: str
    cached: bool  # reused from an earlier run (no cell_started or steps before it)
    outcome: dict  # outcome.json: final_val_loss, steps, seconds, tokens_per_s, ...


@dataclass(frozen=True)
class CellFailed(Event):
    kind = "cell_failed"
    cell: str
    error: str
    step: int | None


@dataclass(frozen=True)
class ProbesFinished(Event):
    kind = "probes_finished"
    metrics: dict  # cell → {metric: value} of the cell probes
    pairs: list  # {"real", "shuffled", "metrics"} of the pair probes
    failed: list  # results.json's failed_probes
    cached: bool


@dataclass(frozen=True)
class Verdicts(Event):
    kind = "verdicts"
    metrics: dict  # cell → its final metrics (results.json: val_loss and the probes')
    thresholds: list  # results.json's thresholds, combination, discriminator, expectations
    combination: dict
    discriminator: list
    expectations: list
    results: str  # the path of results.json


KINDS = {cls.kind: cls for cls in (RunStarted, StageFinished, CellStarted, StepLogged, CellEvaluated, CellFinished,
                                   CellFailed, ProbesFinished, Verdicts)}


def from_json(text: str | bytes) -> Event:
    fields = json.loads(text)
    return KINDS[fields.pop("kind")](**fields)


class Logger(Component):
    """Receives a run's events, in order, in the process that runs `ablate run`. Implement
    `on_<kind>(event)` for the kinds it wants (on_step_logged, on_verdicts, ...) and `close`."""

    def handle(self, event: Event) -> None:
        method = getattr(self, f"on_{event.kind}", None)
        if method is not None:
            method(event)

    def close(self) -> None:
        """The run ended (also when it stopped early): flush and release what it holds."""


class Dispatcher:
    """Calls every active logger with each event (a copy: a logger cannot touch the run's data).
    A logger that raises is reported once through `warn` and turned off. False without loggers."""

    def __init__(self, loggers: dict[str, Logger], warn: Callable[[str], None]):
        self.loggers, self.warn = dict(loggers), warn
        self.settled: set[str] = set()  # cells whose cell_finished or cell_failed was delivered

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def __call__(self, event: Event) -> None:
        if not self.loggers:
            return
        if event.kind in ("cell_finished", "cell_failed"):
            self.settled.add(event.cell)
        for name, logger in list(self.loggers.items()):
            try:
                logger.handle(copy.deepcopy(event))
            except Exception as exc:  # a logger never hurts a run
                self._drop(name, f"on a {event.kind} event", exc)

    def close(self) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                logger.close()
            except Exception as exc:
                self._drop(name, "when closing", exc)
        self.loggers.clear()

    def _drop(self, name: str, where: str, exc: Exception) -> None:
        del self.loggers[name]
        self.warn(f"logger {name!r} failed {where} ({type(exc).__name__}: {str(exc).strip() or 'no message'}); "
                  f"it is off for the rest of this run, which goes on unchanged")


NO_EVENTS = Dispatcher({}, lambda msg: None)


def selected_loggers(spec, registry) -> tuple[list[tuple[str, str]], list[tuple[type[Logger], Params]]]:
    """(spec problems as (location, message), the loggers `[loggers] use` selects with validated
    parameters), as ablate.pipeline.probe_selection does for probes."""
    from ablate.api.plugins import validate_params

    use, tables = spec.loggers.use, spec.loggers.tables()
    problems, selected = [], []
    for name in tables:
        if name not in use:
            chosen = ", ".join(use) or "none"
            problems.append((f"loggers.{name}", f"parameters for logger {name!r}, which is not used: [loggers] use "
                                                f"selects {chosen}. Add {name!r} to it or remove the table"))
    for i, name in enumerate(use):
        if name in use[:i]:
            continue
        try:
            cls = registry.get("logger", name)
        except AblateError as exc:
            problems.append((f"loggers.use[{i}]", str(exc)))
            continue
        params, bad = validate_params("logger", "loggers", name, cls, tables.get(name, {}))
        problems += bad
        if params is not None:
            selected.append((cls, params))
    return problems, selected


def open_loggers(spec, registry, warn: Callable[[str], None]) -> Dispatcher:
    """The run's dispatcher: each selected logger built with its parameters; one whose
    constructor raises is reported through `warn` and left out."""
    problems, selected = selected_loggers(spec, registry)
    if problems:
        raise SpecError(problems)
    loggers = {}
    for cls, params in selected:
        try:
            loggers[cls.name] = cls(params)
        except Exception as exc:
            warn(f"logger {cls.name!r} could not start ({type(exc).__name__}: {str(exc).strip()}); the run goes on "
                 f"without it")
    return Dispatcher(loggers, warn)


def replay(cell: str, record: dict, config: dict, emit: Callable[[Event], None]) -> None:
    """The events of a cell whose executor delivered none (a third-party executor), from its record."""
    if record.get("status") == "failed":
        emit(CellFailed(cell, str(record.get("error")), record.get("step")))
        return
    if record.get("status") != "done":
        return
    if not record.get("cached"):
        emit(CellStarted(cell, config, int(config["train"]["steps"]), None))
        events = [(r["step"], 0, CellEvaluated(cell, int(r["step"]), r["val_loss"])) for r in record["evals"]]
        events += [(r["step"], 1, StepLogged(cell, int(r["step"]), {k: v for k, v in r.items() if k != "step"}))
                   for r in record["history"]]
        for _, _, event in sorted(events, key=lambda e: e[:2]):
            emit(event)
    emit(CellFinished(cell, bool(record.get("cached")), dict(record["outcome"])))


class EventFile:
    """A worker's event sink: each event appended to a JSON-lines file, opened and closed per event
    (a driver on another node sees it on shared storage). Failing to write is reported once through
    `warn` and ends the file's events, never the cell."""

    def __init__(self, path: Path, warn: Callable[[str], None]):
        self.path, self.warn, self.failed = Path(path), warn, False

    def __call__(self, event: Event) -> None:
        if self.failed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(event.to_json() + "\n")
        except OSError as exc:
            self.failed = True
            self.warn(f"could not write the run's events to {self.path} ({exc}); loggers miss the rest of this cell's")


class EventFeed:
    """The driver's side of EventFile: the complete lines a cell's file holds beyond those read."""

    def __init__(self, directory: Path):
        self.dir, self.offsets = Path(directory), {}

    def path(self, cell: str) -> Path:
        return self.dir / f"{cell}.jsonl"

    def read(self, cell: str) -> list[Event]:
        start = self.offsets.get(cell, 0)
        try:
            with open(self.path(cell), "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offsets[cell] = start + end
        out = []
        for line in data[:end].splitlines():
            try:
                out.append(from_json(line))
            except (ValueError, KeyError, TypeError):  # a line cut by a killed worker
                pass
        return out
