"""results.json as a pydantic model: what the engine writes (results.build_results) and what the
report, `report --compare`, expectations and the rows sweep read back (read_results).

A file that lacks a required section or holds a value of the wrong kind (another tool's JSON, a
hand edit, a truncated write) is refused with a paragraph naming the file and the fix. Records
stay open to fields added later; per-metric tables are the probes' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ablate.errors import AblateError

RESULTS_SCHEMA_VERSION = 1


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class CellConfig(Open):
    router: bool
    oracle: Literal["real", "shuffled", "gaussian"]
    objective: dict[str, Any]  # {"name": ..., **its parameters}
    uses_sidecar: bool = False
    base: str | None = None  # the spec cell a sweep generated it from (its own name otherwise)
    sweep: str = ""  # its point on the sweep grid, `lambda=0.9,seed=1`; "" without a sweep
    seed: int | None = None
    seed_group: str | None = None


class CellResult(Open):
    config: CellConfig
    status: Literal["done", "failed", "skipped"] = "done"
    metrics: dict[str, float | None] = {}
    objective_formula: str = ""
    error: str | None = None
    cached: bool = False
    failed_at_step: int | None = None
    checkpoint_step: int | None = None
    metrics_csv: str | None = None
    evals: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    seconds: float | None = None
    tokens_per_s: float | None = None
    peak_gpu_allocated_gib: float | None = None
    compiled: bool | None = None
    first_step_ms: float | None = None  # the first training step alone: what only it pays shows here
    median_step_ms: float | None = None  # the median per-step time of the later logged intervals
    fused: list[str] | None = None  # the cells of its fused group (train.fuse), itself included; None: alone


class Results(Open):
    """Required: what every ablate version has written; the rest defaults to what an older run
    without it means (no seeds, no failed probes, ...), so `report --compare` reads old runs."""

    schema_version: Literal[1]
    name: str
    cells: dict[str, CellResult]
    thresholds: list[dict[str, Any]]
    combination: dict[str, dict[str, Any]]
    discriminator: list[dict[str, Any]]
    description: str = ""
    numerics: str = "ablate"
    conventions: dict[str, str] = {}
    spec: dict[str, Any] = {}  # the resolved spec, as spec.resolved.json
    axes: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}
    teacher: dict[str, Any] = {}
    oracle: dict[str, Any] = {}
    pairs: list[dict[str, Any]] = []
    failed_probes: list[dict[str, Any]] = []
    seeds: dict[str, Any] | None = None
    noise_floor: list[dict[str, Any]] = []
    metric_meanings: dict[str, str] = {}
    metric_info: dict[str, dict[str, Any]] = {}
    bound_names: dict[str, float] = {}
    provenance: dict[str, Any] = {}
    reading: dict[str, Any] | None = None
    expectations: list[dict[str, Any]] | None = None


def validated(results: dict) -> dict:
    """results as a checked plain dict (the form the report and JSON use); ValueError naming the
    first fields that do not fit."""
    return Results.model_validate(results).model_dump(mode="json", exclude_unset=True)


def read_results(path: Path) -> dict:
    """A run's results.json, checked against the Results model; AblateError naming the file and
    the fix when it is missing, not JSON, or of another schema."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AblateError(f"Cannot read {path} ({exc.strerror or exc}); run the spec first (`ablate run SPEC`) "
                          "or name a run that has finished.") from None
    try:
        return Results.model_validate_json(text).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        errors = exc.errors()
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise AblateError(f"{path} is not a results.json this version of ablate reads ({where}{more}). It was "
                          "written by another ablate version or edited by hand; re-run its spec to rewrite "
                          "it (finished stages and cells are reused).") from None
