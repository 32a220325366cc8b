"""Which probes a spec runs, with which parameters, and what their results are keyed and labelled by.

`[probes] use = [...]` lists the probes that run (left out: the built-ins, i.e. every probe the
`ablate` distribution registers; the entry "builtins" stands for them inside a list);
`[probes.<name>]` tables are those probes' parameters, validated by each probe's Params. A probe
not listed does not run.
"""

from __future__ import annotations

from typing import Any

from ablate.api.components import Metric, Params, Probe
from ablate.errors import AblateError, SpecError

BUILTIN_DISTRIBUTION = "ablate"  # Registered.source is "<distribution> <version>" for installed plugins
BUILTINS = "builtins"  # in `[probes] use`: every built-in probe, at that place in the list


def builtin_probe_names(registry) -> list[str]:
    """The probes the `ablate` distribution itself registers (ablate_builtins), sorted; a name
    another plugin claims too is kept, so that selecting it fails naming both."""
    def builtin(source: str) -> bool:
        return source.partition(" ")[0] == BUILTIN_DISTRIBUTION

    names = {n for n, reg in registry.components["probe"].items() if builtin(reg.source)}
    names |= {n for (kind, n), sources in registry.conflicts.items() if kind == "probe" and any(map(builtin, sources))}
    return sorted(names)


def _listed(spec, registry) -> list[tuple[str, str]]:
    """(probe name, where the spec selects it), in order: `[probes] use` with "builtins" expanded,
    else the built-ins."""
    use = spec.probes.use
    if use is None:
        return [(name, "probes.use (the built-ins)") for name in builtin_probe_names(registry)]
    out = []
    for i, entry in enumerate(use):
        names = builtin_probe_names(registry) if entry == BUILTINS else [entry]
        out += [(name, f"probes.use[{i}]") for name in names]
    return out


def probe_names(spec, registry) -> list[str]:
    """The probe names the spec selects, in order, each once."""
    return list(dict.fromkeys(name for name, _ in _listed(spec, registry)))


def probe_problems(spec, registry) -> tuple[list[tuple[str, str]], list[tuple[type[Probe], Params]]]:
    """(spec problems as (location, message), the selected probes with validated parameters)."""
    from ablate.api.plugins import validate_params

    problems: list[tuple[str, str]] = []
    selected: list[tuple[type[Probe], Params]] = []
    listed = _listed(spec, registry)
    names = [name for name, _ in listed]
    tables = spec.probes.tables()
    for name in tables:
        if name not in names:
            chosen = ", ".join(dict.fromkeys(names)) or "none"
            problems.append((f"probes.{name}", f"parameters for probe {name!r}, which does not run: [probes] use "
                                               f"selects {chosen}. Add {name!r} to [probes] use or remove the table"))
    first: dict[str, str] = {}
    for name, where in listed:
        first.setdefault(name, where)
    for name, where in first.items():
        try:
            cls = registry.get("probe", name)
        except AblateError as exc:
            problems.append((where, str(exc)))
            continue
        params, bad = validate_params("probe", "probes", name, cls, tables.get(name, {}))
        problems += bad
        if params is not None:
            selected.append((cls, params))
    owners: dict[str, str] = {}
    for cls, _ in selected:
        for metric in cls.metrics:
            if metric in owners and owners[metric] != cls.name:
                problems.append(("probes.use", f"probes {owners[metric]!r} and {cls.name!r} both declare metric "
                                               f"{metric!r}; select one of them"))
            owners.setdefault(metric, cls.name)
    return problems, selected


def selected_probes(spec, registry) -> list[tuple[type[Probe], Params]]:
    """The probes the spec runs, in order, each with its validated parameters. SpecError when the
    selection or a parameter table is invalid (load_spec reports the same problems earlier)."""
    problems, selected = probe_problems(spec, registry)
    if problems:
        raise SpecError(problems)
    return selected


def declared_metrics(probes) -> dict[str, Metric]:
    """Metric templates (`gate_L{l}`) → Metric, over probe classes (or (class, params) pairs)."""
    out: dict[str, Metric] = {}
    for p in probes:
        cls = p[0] if isinstance(p, tuple) else p
        out.update(cls.metrics.info)
    return out


def expand_metric_names(templates, layers: list[int]) -> set[str]:
    """Metric templates → concrete names: `{l}` becomes each injection layer."""
    out = set()
    for name in templates:
        out |= {name.replace("{l}", str(layer)) for layer in layers} if "{l}" in name else {name}
    return out


def metric_meanings(probes) -> dict[str, str]:
    """results.json `metric_meanings`: template → one-line meaning."""
    return {name: m.meaning for name, m in declared_metrics(probes).items()}


def metric_info(probes) -> dict[str, dict[str, Any]]:
    """results.json `metric_info`: template → {meaning, unit, section, role, convention}."""
    return {name: m.info() for name, m in declared_metrics(probes).items()}


def probe_key_config(spec, probes: list[tuple[type[Probe], Params]]) -> dict[str, Any]:
    """The probe stage's key config: the batch settings and, per selected probe, its name, its
    parameters and the digest of its own source (stages.component_source_digest)."""
    from ablate.pipeline.stages import component_source_digest

    return {"batches": spec.probes.model_dump(include={"batches", "batch", "seq_len", "seed"}),
            "probes": [{"name": cls.name, "params": params.model_dump(mode="json"),
                        "code": component_source_digest(cls)} for cls, params in probes]}
