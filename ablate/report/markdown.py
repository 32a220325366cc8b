"""The findings report: markdown (+ PNG plots) rendered from results.json ONLY.

Probe metrics are labelled, grouped and read from their metadata in results.json (`metric_info`:
meaning, unit, section, role, convention, as each probe declares them): no probe metric is named
here. Names read literally are training-log columns (metrics.csv, evals.json) only.

Every number in the report is a value of results.json printed through `ablate.verdicts.verdict.fmt`
(an exact rounding at the printed precision), a threshold sentence copied from results.json,
or an agreement tolerance computed by `ablate.verdicts.verdict.agreement` from two of its values.
Every path is relative to the report file; absolute paths found in result strings (a command
line, a checkpoint source) are rewritten relative to the report's folder.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from ablate.report import plots

from ablate.pipeline import store
from ablate.verdicts.verdict import (OUTER_SOFT, OUTER_SOFT_TEACHER, UNDECIDED_LABEL, agreement, describe_rule, fmt, fmt_gap,
                            fmt_rate, label_text, outer_cell, outer_reading, per_seed_text, read_battery, row_decimals,
                            rubric_metrics, run_reading)

DASH = "—"
# An absolute path: at least two components, the first of which exists under / (so formula text
# such as "S[row]/T" is never mistaken for a path).
ABS_PATH = re.compile(r"(?<![\w.~/\-])(/([\w.@+\-]+)/(?:[\w.@+\-]+/)*[\w.@+\-]*)")
KL_ROWS = 7  # logged steps shown per cell in the KL trajectory table


# ------------------------------------------------------------------------------ formatting


class Text:
    """Renders JSON values for one report: numbers via fmt, strings with absolute paths made
    relative to the report's folder, markdown table cells escaped."""

    def __init__(self, report_dir: Path):
        self.report_dir = report_dir.resolve()

    def path(self, p: str | Path) -> str:
        """A path relative to the report's folder, with forward slashes."""
        return Path(os.path.relpath(Path(p).resolve(), self.report_dir)).as_posix()

    def scrub(self, s: str) -> str:
        return ABS_PATH.sub(lambda m: self.path(m.group(1)) if Path("/", m.group(2)).exists() else m.group(1), s)

    def value(self, v: Any, decimals: int | None = None) -> str:
        if v is None:
            return DASH
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, (int, float)):
            return fmt(v, decimals)
        if isinstance(v, str):
            return self.scrub(v)
        if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return ", ".join(fmt(x) for x in v)
        return self.scrub(json.dumps(v, ensure_ascii=False, sort_keys=True))

    def cell(self, v: Any, decimals: int | None = None) -> str:
        """value() escaped for a markdown table cell."""
        return self.value(v, decimals).replace("|", "\\|").replace("\n", "<br>")


def literal(v: Any) -> str | None:
    """A spec value as written: strings as they are, everything else as a JSON literal; None
    (absent) stays None."""
    return v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)


def step_text(step: Any) -> str:
    """A logged step (floats read back from CSV) as an integer."""
    return str(int(step)) if isinstance(step, (int, float)) and float(step).is_integer() else fmt(step)


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists holding dicts or lists) → {dotted.key: leaf}; list items are
    keyed by their index. Lists of plain values are leaves."""
    if isinstance(d, dict) and d:
        items = d.items()
    elif isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        items = ((str(i), x) for i, x in enumerate(d))
    else:
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# --------------------------------------------------------------------------- results access


def final_val_loss(cell: dict) -> float | None:
    """The cell's last logged evaluation (evals.json)."""
    evals = cell.get("evals") or []
    return evals[-1]["val_loss"] if evals else None


def step0_val_loss(cell: dict) -> float | None:
    """The cell's evaluation at step 0 (gates closed, router zero), when it was logged."""
    return next((e["val_loss"] for e in cell.get("evals") or [] if float(e["step"]) == 0), None)


def cell_metrics(results: dict) -> dict[str, dict[str, float]]:
    """Per-cell metrics, with the attributed pair's metrics on its real cell."""
    out = {name: dict(c.get("metrics", {})) for name, c in results["cells"].items()}
    for pair in results.get("pairs", []):
        if not pair.get("attributed", True):
            continue
        real = out.setdefault(pair["real"], {})
        for k, v in pair["metrics"].items():
            real.setdefault(k, v)
    return out


def template_match(template: str, metric: str) -> re.Match | None:
    """x_L{l} matches x_L5 (group 1: the layer); a template without {l} matches itself."""
    return re.fullmatch(re.escape(template).replace(re.escape("{l}"), r"(\d+)"), metric)


def meaning_of(metric: str, meanings: dict[str, Any]) -> Any:
    """A metric's entry in a dict keyed by metric templates (meanings, metric_info); per-layer
    names such as x_L5 match the template x_L{l}."""
    if metric in meanings:
        return meanings[metric]
    for template, text in meanings.items():
        if "{l}" in template and template_match(template, metric):
            return text
    return None


def metric_info(r: dict) -> dict[str, dict]:
    """Metric template → {meaning, unit, section, role, convention}: results.json `metric_info`,
    else (older results) the meanings alone."""
    info = r.get("metric_info")
    if isinstance(info, dict):
        return info
    return {name: {"meaning": text} for name, text in (r.get("metric_meanings") or {}).items()}


def with_role(r: dict, role: str) -> list[str]:
    """The metric templates whose probes declare them with `role` (components.METRIC_ROLES)."""
    return [name for name, info in metric_info(r).items() if info.get("role") == role]


def layered(metrics: dict[str, float], template: str) -> dict[int, str]:
    """Injection layer → the metric of `metrics` that instantiates the per-layer template."""
    return {int(m[1]): k for k in metrics if (m := template_match(template, k)) and m.groups()}


def objective_text(objective: dict) -> str:
    """{"name": "kl_ce", "lambda": 0.5} → kl_ce(lambda=0.5), parameters as JSON literals."""
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in objective.items() if k != "name")
    return f"{objective.get('name', '?')}({params})" if params else str(objective.get("name", "?"))


# ---------------------------------------------------------------------------------- sections


def _header(r: dict, t: Text) -> str:
    lines = [f"# {t.scrub(r['name'])}"]
    if (r.get("teacher") or {}).get("random_weights"):  # warnings that void the answer come before it
        lines += ["", "> **WARNING: the teacher has RANDOM weights** (`random_init = true`): the oracle and "
                      "its sidecar carry no knowledge, so no verdict below says anything about the research "
                      "question. This run measures speed and plumbing only."]
    lines += _teacher_banners(r, t)
    lines += ["", *_summary(r, t)]
    axes = r.get("axes") or {}
    if axes:
        lines += ["", "Axes: " + "; ".join(f"{k}: {t.scrub(str(v))}" for k, v in axes.items())]
    numerics = r.get("numerics", "ablate")
    lines += ["", f"Numerics: **{numerics}** — " + (
        "every choice of reference §11.4 made as the reference makes it (docs/fidelity.md)" if numerics == "upstream"
        else "ablate's documented choices; `numerics = \"upstream\"` reproduces the reference's (docs/fidelity.md)")]
    failed = [(n, c) for n, c in r["cells"].items() if c.get("status") != "done"]
    for name, cell in failed:
        error = f": {t.scrub(cell['error'])}" if cell.get("error") else ""
        lines += ["", f"**Cell {name} {cell.get('status')}**{error}"]
    if r.get("failed_probes"):
        lines += ["", f"**{len(r['failed_probes'])} probe run(s) failed**: their metrics are missing, and every "
                      "threshold that needs one reads MISSING (see *Failed probes*)."]
    return "\n".join(lines).strip()


SUMMARY_PAIRS = 3  # discriminated pairs named in the summary; the rest are under Discriminator


def _summary(r: dict, t: Text) -> list[str]:
    """The answer first, in three to six lines: the question, each discriminator's reading with its
    uncertainty (seeds, UNDECIDED thresholds, per-seed outcomes), the run's place on the outer 2×2
    (reference §7.4), and a warning when a bound lies inside the measured noise."""
    lines = ["## Summary", ""]
    if r.get("description"):
        lines += [f"**Question.** {t.scrub(r['description']).strip()}", ""]
    discs = r.get("discriminator") or []
    for d in discs[:SUMMARY_PAIRS]:
        head = _outcome_text(d)
        sentence = d.get("sentence") or f"{head} (real {d.get('real_label')}, shuffled {d.get('shuffled_label')})"
        sentence = f"**{head}**{sentence[len(head):]}" if sentence.startswith(head) else sentence
        lines.append(f"- {d['real']} vs {d['shuffled']}: {t.scrub(sentence)}.")
    if len(discs) > SUMMARY_PAIRS:
        lines.append(f"- … and {len(discs) - SUMMARY_PAIRS} more pair(s) under *Discriminator*.")
    if not discs:
        n = (r.get("seeds") or {}).get("n_seeds", 1)
        lines.append(f"- No discriminated pair: see *Thresholds* ({'single seed' if n < 2 else f'{n} seeds'}).")
    outer = _outer_line(r, t)
    if outer:
        lines.append(f"- {outer}")
    warnings = [n for n in r.get("noise_floor") or [] if n.get("inside")]
    if warnings:
        lines.append("- **Noise:** " + " ".join(f"{t.scrub(n['sentence'])}." for n in warnings))
    return lines


def _outcome_text(d: dict) -> str:
    if d["outcome"] == UNDECIDED_LABEL:
        return f"undecided between {' and '.join(d.get('possible') or [])}"
    return d["outcome"]


def _outer_line(r: dict, t: Text) -> str:
    """The run's reading on the outer objective × teacher 2×2 (reference §7.4), and what each reading
    of the other axis's run would make of it."""
    reading = r.get("reading") or run_reading(r)
    if reading.get("reading") is None:
        return ""
    axes = r.get("axes") or {}
    role = reading["role"]
    cells = "; ".join(f"{c}: {label}" for c, label in reading["cells"].items())
    words = reading["reading"] if reading["reading"] != UNDECIDED_LABEL else \
        f"undecided ({' or '.join(reading['possible'])})"
    other = "teacher-axis" if role == "objective" else "objective-axis"
    head = (f"**Outer 2×2** (objective × teacher, the reference's verdict matrices): this is the {role}-axis run (objective {t.scrub(str(axes.get('objective')))}, "
            f"teacher {t.scrub(str(axes.get('teacher')))}) and reads **{words}** ({cells})")
    if reading["reading"] == UNDECIDED_LABEL:
        return head + "; its cell of the outer 2×2 waits for a decided reading (more seeds)."
    a = reading["reading"]
    cells = {b: outer_cell(a, b) if role == "objective" else outer_cell(b, a) for b in ("breaks", "holds")}
    article = "an" if other[0] == "o" else "a"
    if len(set(cells.values())) == 1:
        options = f"; beside {article} {other} run that breaks or holds: {cells['breaks']}"
    else:
        options = f"; beside {article} {other} run " + "; ".join(f"that {b}: {text}" for b, text in cells.items())
    return head + options + " (`ablate report RUN_A RUN_B --outer` reads two runs)."


def _failed_probes(r: dict, t: Text) -> str:
    rows = [[f"`{f['probe']}`", t.scrub(f.get("source", "")), ", ".join(f["cells"]), t.scrub(f["error"])]
            for f in r.get("failed_probes") or []]
    if not rows:
        return ""
    return "\n".join(["## Failed probes", "", "Each raised on the cells named; every other probe's metrics landed. "
                      "Fix the plugin and rerun the same command: finished cells are reused and the probes rerun.",
                      "", table(["probe", "provided by", "cells", "error"], rows)])


def _conventions(r: dict, t: Text) -> str:
    conv = dict(r.get("conventions") or {})
    for name, info in metric_info(r).items():  # conventions the probes declare with their metrics
        if info.get("convention"):
            conv.setdefault(name, info["convention"])
    lines = ["## Conventions", ""] + [f"- **{k}**: {t.scrub(v)}" for k, v in conv.items()]
    return "\n".join(lines)


def _val_loss_matrix(r: dict, t: Text) -> str:
    cells = r["cells"]
    finals = {n: final_val_loss(c) for n, c in cells.items()}
    step0 = {n: step0_val_loss(c) for n, c in cells.items()}
    d = row_decimals([v for v in (*finals.values(), *step0.values()) if v is not None])
    rows = []
    for name, c in cells.items():
        cfg = c.get("config", {})
        rows.append([name, t.cell(cfg.get("router")), t.cell(cfg.get("oracle")),
                     t.cell(objective_text(cfg.get("objective", {}))), t.cell(cfg.get("sweep") or DASH),
                     t.cell(c.get("status")), t.cell(finals[name], d), t.cell(step0[name], d)])
    out = ["## Validation loss", "",
           table(["cell", "router", "oracle", "objective", "sweep", "status", "final val_loss (nats)",
                  "before training, same windows"], rows)]
    sentences = []
    gains = with_role(r, "gain_over_control")
    for pair in r.get("pairs", []):
        a, b = finals.get(pair["real"]), finals.get(pair["shuffled"])
        if a is None or b is None:
            continue
        s = agreement(pair["real"], a, pair["shuffled"], b, "nats")
        for name in gains:
            gain = pair["metrics"].get(name)
            if gain is not None:
                effect = ("real content lowered the loss" if gain > 0 else
                          "real content raised the loss" if gain < 0 else "no difference")
                s += f"; {name} = {fmt(gain, sign=True)} nats ({effect})"
        sentences.append(f"- {s}.")
    if sentences:
        out += ["", *sentences]
    return "\n".join(out)


def _metric_order(r: dict, metrics: dict[str, dict[str, float]]) -> list[str]:
    present = {m for ms in metrics.values() for m in ms}
    thresholded = [t["metric"] for t in r.get("thresholds", [])]
    order = list(dict.fromkeys(m for m in thresholded if m in present))
    for template in metric_info(r):
        matching = sorted(m for m in present if meaning_of(m, {template: ""}) is not None)
        order += [m for m in matching if m not in order]
    return order + sorted(present - set(order))


def _metrics_table(r: dict, t: Text) -> str:
    metrics = cell_metrics(r)
    names = list(r["cells"])
    by_metric: dict[str, list[dict]] = {}
    for th in r.get("thresholds", []):
        by_metric.setdefault(th["metric"], []).append(th)
    info = metric_info(r)
    sections: dict[str, list[list[str]]] = {}
    for m in _metric_order(r, metrics):
        values = [metrics.get(n, {}).get(m) for n in names]
        d = row_decimals([v for v in values if v is not None])
        ths = by_metric.get(m, [])
        rule = "<br>".join(f"{th['cell']}: {t.cell(describe_rule(th['rule']))}" for th in ths)
        verdict = "<br>".join(f"{th['cell']}: **{th['verdict']}**" for th in ths)
        section = (meaning_of(m, info) or {}).get("section") or ""
        sections.setdefault(section, []).append([m, *(t.cell(v, d) for v in values), rule or DASH, verdict or DASH])
    if not sections:
        return ""
    header = ["metric", *names, "threshold", "verdict"]
    if list(sections) == [""]:  # no metric carries a section (results without metric_info)
        return "\n".join(["## Fingerprint and probe metrics", "", table(header, sections[""])])
    out = ["## Fingerprint and probe metrics", "", "Grouped by the section each probe declares for its metrics."]
    order = list(dict.fromkeys([info[k].get("section") or "" for k in info] + list(sections)))
    for section in (s for s in order if s in sections):
        out += ["", f"### {section or 'other metrics'}", "", table(header, sections[section])]
    return "\n".join(out)


def _threshold_sentences(r: dict, t: Text) -> str:
    ths = r.get("thresholds", [])
    if not ths:
        return ""
    seeds = r.get("seeds") or {}
    lines = ["## Thresholds", ""]
    if seeds.get("n_seeds", 1) > 1:
        lines += [f"Verdicts over seeds {', '.join(str(s) for s in seeds['seeds'])}: {t.scrub(seeds['method'])} "
                  f"Seeds: {t.scrub(seeds.get('semantics', ''))}.", ""]
    else:
        lines += ["Single seed: each verdict reads the value itself, with no interval (a `[sweep] seed` axis reads "
                  "every threshold over seeds, on a Student-t interval of the mean).", ""]
    noise = {}
    for n in r.get("noise_floor") or []:
        noise.setdefault(n["metric"], []).append(n)
    shown = set()
    for th in ths:
        basis = "" if th.get("n_seeds", 1) > 1 else ", single seed"
        line = f"- **{th['name']}** ({th['cell']}{basis}): {t.scrub(th['sentence'])}"
        if th.get("n_seeds", 1) > 1:
            line += ". Per seed: " + per_seed_text([(s["seed"], s["verdict"]) for s in th.get("seeds", [])])
        lines.append(line)
        for n in noise.get(th["metric"], []) if th["metric"] not in shown else []:  # beside the metric, once
            lines.append(f"  - noise floor: {t.scrub(n['sentence'])}")
        shown.add(th["metric"])
    note = _seed_note(r)
    if note:
        lines += ["", note]
    return "\n".join(lines)


def _seed_note(r: dict) -> str:
    """Which verdicts the first seed alone would have read differently from all seeds together."""
    ths = [th for th in r.get("thresholds", []) if th.get("n_seeds", 1) > 1 and th.get("seeds")]
    if not ths:
        return ""
    first = ths[0]["seeds"][0]["seed"]
    changed = [f"{th['name']} ({th['cell']}) {th['seeds'][0]['verdict']} → {th['verdict']}"
               for th in ths if th["seeds"][0]["verdict"] != th["verdict"]]
    changed += [f"discriminator {d['real']} vs {d['shuffled']} {d['per_seed'][0]['outcome']} → {_outcome_text(d)}"
                for d in r.get("discriminator") or [] if d.get("per_seed") and d["per_seed"][0]["outcome"] != d["outcome"]]
    if changed:
        return (f"**Seed {first} alone vs all seeds:** {len(changed)} reading(s) differ (seed {first}'s own → over "
                f"the seeds): " + "; ".join(changed) + ".")
    out = (f"**Seed {first} alone vs all seeds:** no reading differs: every threshold's interval lies wholly on "
           f"the side of its bound where seed {first}'s own value lies, and every discriminator reads as at seed {first}")
    # the closest call: the interval nearest its bound in units of its own half-width
    near = min((th for th in ths if th.get("margin") is not None and th.get("half_width")),
               key=lambda th: th["margin"] / th["half_width"], default=None)
    if near is not None:
        out += (f"; the interval nearest its bound, counted in half-widths, is {near['name']} ({near['cell']})'s, "
                f"{fmt(near['margin'])} from it (half-width {fmt(near['half_width'])})")
    return out + "."


def _combination(r: dict, t: Text) -> str:
    comb = r.get("combination") or {}
    if not comb:
        return ""
    seeded = any(c.get("per_seed") for c in comb.values())
    rows = [[cell, t.cell(c["crossed"]), t.cell(c.get("undecided", 0)), t.cell(c["total"]), t.cell(c.get("missing", 0)),
             f"**{label_text(c)}**" if c["label"] != UNDECIDED_LABEL else f"**undecided** ({label_text(c)})",
             t.cell(c.get("strong", False)), t.cell(", ".join(c.get("crossed_names", [])) or DASH)]
            + ([t.cell(per_seed_text([(p["seed"], p["label"]) for p in c["per_seed"]]) if c.get("per_seed") else DASH)]
               if seeded else [])
            for cell, c in comb.items()]
    header = ["cell", "crossed", "undecided", "of", "missing", "label", "strong", "crossed thresholds"]
    lines = ["## Combination per cell", "",
             "A label is certain when every UNDECIDED threshold, read either way, gives the same label; else it is "
             "undecided between the labels they allow.", "",
             table(header + (["per seed"] if seeded else []), rows)]
    strong = [f"- **{cell}**: {t.scrub(b['sentence'])}" for cell, c in comb.items() for b in c.get("strong_results", [])]
    if strong:
        lines += ["", "Strong-result bounds ([combine] strong; not counted as crossings):", "", *strong]
    return "\n".join(lines)


def _battery_readings(r: dict, t: Text) -> str:
    """The η-B rubric (ablate.verdicts.verdict.BATTERY_RUBRIC) read per pair, injection layer and run, from
    the cells' battery metrics and the pair's cross-run metrics; 'real / control' when the runs differ."""
    cells, blocks = r["cells"], []
    rubric = sorted(rubric_metrics())
    for pair in r.get("pairs", []):
        runs = [{**cells.get(pair[k], {}).get("metrics", {}), **pair.get("metrics", {})} for k in ("real", "shuffled")]
        candidates = sorted({l for tpl in rubric for l in layered(runs[0], tpl)})
        readings = {l: [read_battery(run, l) for run in runs] for l in candidates}
        # a layer is read where some topic has every metric it needs in either run
        layers = [l for l in candidates if any(w is not None for run in readings[l] for w in run.values())]
        if not layers:
            continue
        rows = []
        for topic in readings[layers[0]][0]:
            words = [[run[topic] or "not measured" for run in readings[l]] for l in layers]
            rows.append([topic, *(t.cell(w[0] if w[0] == w[1] else f"{w[0]} / {w[1]}") for w in words)])
        blocks += [f"### {pair['real']} vs {pair['shuffled']}", "",
                   table(["reading", *(f"L{l}" for l in layers)], rows), ""]
    if not blocks:
        return ""
    return "\n".join(["## η-B battery readings", "",
                      "Each reading per injection layer, from the battery metrics above and the rubric under "
                      "Conventions (battery_rubric); \"real / control\" where the two runs read differently.",
                      "", *blocks]).rstrip()


def _discriminator(r: dict, t: Text) -> str:
    disc = r.get("discriminator") or []
    if not disc:
        return ""
    rows = [[d["real"], d["shuffled"], t.cell(d.get("real_label")), t.cell(d.get("shuffled_label")),
             f"**{_outcome_text(d)}**", t.cell(d.get("n_seeds", 1)),
             t.cell(per_seed_text([(p["seed"], p["outcome"]) for p in d["per_seed"]]) if d.get("per_seed") else DASH),
             t.cell(d.get("meaning"))] for d in disc]
    return "\n".join(["## Discriminator (real vs shuffled)", "",
                      table(["real", "shuffled", "real label", "shuffled label", "outcome", "seeds",
                             "per seed", "meaning"], rows)])


CONTROL_TARGET = {  # what a control cell's objective reads from the sidecar, by its oracle variant
    "shuffled": "the control reads the same permutation of the sidecar, so at each position its KL "
                "target is another row's teacher distribution",
    "gaussian": "a Gaussian control keeps the shuffled twin's sidecar, so at each position its KL "
                "target is another row's teacher distribution",
}


def reads_sidecar(cell: dict) -> bool:
    """Whether a cell's objective is trained against the sidecar (results.json records it; older
    results are read from the training log's `kl` column, which every built-in sidecar objective logs)."""
    uses = cell.get("config", {}).get("uses_sidecar")
    if uses is not None:
        return bool(uses)
    return any(row.get("kl") is not None for row in cell.get("history", []))


def control_validity(r: dict, pair: dict, t: Text) -> str:
    """Two sentences for a real/control pair: is the control a no-op for retrieval (from the
    retrieval-control probe), and what still differs between the two cells."""
    real, control = pair["real"], pair["shuffled"]
    cells = r["cells"]
    variant = cells.get(control, {}).get("config", {}).get("oracle", "?")
    m = pair.get("metrics", {})
    flags = {l: (tpl, k) for tpl in with_role(r, "retrieval_noop") for l, k in layered(m, tpl).items()}
    sizes = {l: k for tpl in with_role(r, "retrieval_diff") for l, k in layered(m, tpl).items()}
    layers = sorted(flags)
    head = f"**{real} vs {control}** (control oracle: {variant})"
    if not layers:
        return (f"{head}: retrieval was not compared (no probe measured it for this pair), so it is "
                f"unknown whether the control changes what the student retrieves.")
    diffs = [m.get(sizes[l]) if l in sizes else None for l in layers]
    d = row_decimals([v for v in diffs if v is not None])
    per_layer = ", ".join(f"L{l} {t.value(v, d)}" for l, v in zip(layers, diffs))
    noop = [l for l in layers if m[flags[l][1]] == 1.0]
    if len(noop) == len(layers):
        flag_names = ", ".join(dict.fromkeys(flags[l][0] for l in layers))
        retrieval = ("the control is **a no-op for retrieval**: on the same hidden states the real cell's "
                     "cross-attention gives the same output on the real and on the control table at every "
                     f"injection layer (max |difference| {per_layer}; {flag_names} = 1)")
        if variant == "shuffled":
            retrieval += ", as expected: a row permutation under dense cosine top-k retrieves the same content"
    else:
        changed = ", ".join(f"L{l}" for l in layers if l not in noop)
        retrieval = (f"the control **changes retrieval** at {changed}: the real cell's cross-attention gives a "
                     f"different output on the control table (max |difference| {per_layer})")
    objective = objective_text(cells.get(real, {}).get("config", {}).get("objective", {}))
    if reads_sidecar(cells.get(real, {})):
        target = CONTROL_TARGET.get(variant, "the control reads its own variant of the sidecar")
        still = (f"the KL target: the objective {objective} is trained against the sidecar and "
                 f"{target}")
        if len(noop) == len(layers):
            still += ". Every real-vs-control difference in this pair comes from that target (or training noise)"
        else:
            still = "the retrieved content, and " + still
    elif len(noop) == len(layers):
        still = (f"nothing the objective reads: {objective} is not trained against the sidecar, so both cells "
                 "see the same content and this pair measures training noise, not oracle content")
    else:
        still = "the retrieved content only (the objective is not trained against the sidecar)"
    return f"{head}: {retrieval}. **What differs:** {still}."


def _control_validity(r: dict, t: Text) -> str:
    pairs = r.get("pairs") or []
    if not pairs:
        return ""
    return "\n".join(["## Control validity", "", *(f"- {control_validity(r, p, t)}" for p in pairs)])


def _evenly_spaced(rows: list[dict], n: int) -> list[dict]:
    if len(rows) <= n:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in picks]


def _kl_trajectory(r: dict, t: Text) -> str:
    out = []
    columns = ("loss", "kl", "alpha", "w_align_norm", "router_entropy")
    for name, c in r["cells"].items():
        rows = [row for row in c.get("history", []) if row.get("kl") is not None]
        if not rows:
            continue
        shown = _evenly_spaced(rows, KL_ROWS)
        cols = [col for col in columns if any(row.get(col) is not None for row in shown)]
        decimals = {col: row_decimals([row[col] for row in shown if row.get(col) is not None]) for col in cols}
        body = [[step_text(row["step"]), *(t.cell(row.get(col), decimals[col]) for col in cols)] for row in shown]
        out += ["", f"### {name}", "", table(["step", *cols], body)]
    if not out:
        return ""
    return "\n".join(["## KL trajectory (logged training batches)", *out])


def _plots(r: dict, t: Text, asset_dir: Path) -> str:
    asset_dir.mkdir(parents=True, exist_ok=True)
    cells = {n: c for n, c in r["cells"].items() if c.get("status") == "done"}
    made = []
    for title, filename, draw in [
        ("Training loss and KL", "training.png", lambda p: plots.training_curves(cells, p)),
        ("Validation loss", "val_loss.png", lambda p: plots.val_loss_curves(cells, p)),
        ("Thresholds and their bands", "thresholds.png", lambda p: plots.threshold_bands(r.get("thresholds", []), p)),
        ("Router scale, W_align norm and entropy", "router.png", lambda p: plots.router_curves(cells, p)),
    ]:
        path = asset_dir / filename
        if draw(path):
            made.append(f"![{title}]({t.path(path)})")
        else:
            path.unlink(missing_ok=True)
    return "\n\n".join(["## Plots", *made]) if made else ""


def _key_values(title: str, d: dict, t: Text) -> str:
    flat = flatten(d)
    if not flat:
        return ""
    return "\n".join([f"### {title}", "", table(["key", "value"], [[k, t.cell(v)] for k, v in flat.items()])])


def _teacher_banners(r: dict, t: Text) -> list[str]:
    """Warnings for a run allowed to go on with another tokenizer's corpus or an unhealthy teacher."""
    oracle = r.get("oracle") or {}
    tok, health = oracle.get("tokenizers") or {}, oracle.get("teacher_health") or {}
    lines = []
    if tok.get("match") is False:
        digests = [t.value((tok.get(side) or {}).get("digest")) for side in ("corpus", "teacher")]
        lines += ["", f"> **WARNING: the corpus and the teacher use DIFFERENT tokenizers** (`tokenizer_mismatch = "
                      f'"allow"`; id→token digests {digests[0]} vs {digests[1]}): the teacher read the corpus\'s '
                      "ids as other tokens, i.e. scrambled text, as in the reference's TinyLlama runs. "
                      "Its oracle and sidecar carry no corpus signal, so no verdict below says anything about the "
                      "research question."]
    if health.get("passed") is False and not (r.get("teacher") or {}).get("random_weights"):
        lines += ["", f"> **WARNING: the teacher failed its health check** (`teacher_health = \"allow\"`): its "
                      f"next-token cross-entropy on the corpus, {t.value(oracle.get('teacher_ce'))} nats, is no "
                      f"better than the bound {t.value(health.get('bound'))} (`teacher_max_ce = "
                      f"{t.value(health.get('teacher_max_ce'))}`): {t.value(health.get('reading'))}."]
    return lines


def _teacher_reading(r: dict, t: Text) -> str:
    """The teacher's next-token score in the oracle pass and the tokenizer comparison, in words."""
    oracle = r.get("oracle") or {}
    health, tok = oracle.get("teacher_health") or {}, oracle.get("tokenizers") or {}
    lines = []
    if oracle.get("teacher_ce") is not None:
        verdict = {True: "passes", False: "**fails**", None: "not assessed"}[health.get("passed")]
        lines.append(f"**Teacher health:** next-token cross-entropy {t.value(oracle['teacher_ce'])} nats, argmax "
                     f"accuracy {t.value(oracle.get('teacher_top1'))}, over {t.value(oracle.get('teacher_tokens'))} "
                     f"predictions of the oracle pass; ln V = {t.value(health.get('log_vocab'))}, corpus unigram "
                     f"entropy {t.value(health.get('unigram_entropy'))}. Reading: {t.value(health.get('reading'))}. "
                     f"It {verdict} the bound `teacher_max_ce = {t.value(health.get('teacher_max_ce'))}` = "
                     f"{t.value(health.get('bound'))}.")
    if tok:
        def side(name):
            d = tok.get(name)
            if isinstance(d, dict):
                return f"{t.value(d.get('digest'))} ({t.value(d.get('entries'))} entries, {t.value(d.get('file'))})"
            return "the corpus's own ids (trained on them)" if d == "corpus" else "unknown"
        match = {True: "identical", False: "**DIFFERENT**", None: "not compared (one side unknown)"}[tok.get("match")]
        lines.append(f"**Tokenizers** (id→token digests): corpus {side('corpus')}; teacher {side('teacher')}: "
                     f"{match}.")
    return "\n\n".join(lines)


# The reference's stats.json fields (§4.4) and ablate's own reading of the imported files.
IMPORTED_FIELDS = ("teacher", "layer", "total_entries", "engram_dim", "hash_seeds", "populated_rows",
                   "populated_fraction", "pca_explained_variance_ratio_total", "teacher_logits_sidecar")


def _imported_oracle(r: dict, t: Text) -> str:
    """For an oracle imported from files: where it came from and its stats.json beside ablate's checks."""
    oracle = r.get("oracle") or {}
    imported = oracle.get("imported")
    if oracle.get("origin") != "files" or not isinstance(imported, dict):
        return ""
    files = imported.get("files") or {}
    lines = ["### Oracle imported from files", "",
             "Not computed by ablate: imported from the files below (checked: tensor names, shapes, dtypes, "
             "finite values, equal populated masks of table and sidecar, rows and vocabulary against the spec). "
             f"The sidecar file held {t.value(imported.get('sidecar_dtype'))}, upcast to float32; row counts are "
             f"{t.value(imported.get('counts'))}.", ""]
    lines += [f"- {role}: `{t.path(f.get('path'))}` (sha256 {t.value(str(f.get('sha256'))[:16])}…)"
              for role, f in files.items() if isinstance(f, dict)]
    twin = oracle.get("shuffled_twin") or {}
    if twin.get("given"):
        same = "is" if twin.get("matches_shuffle_seed") else "is **not**"
        lines.append(f"- shuffled twin: the given files (one row permutation moving {t.value(twin.get('rows_moved'))} "
                     f"rows; it {same} the permutation ablate draws from shuffle_seed {t.value(twin.get('shuffle_seed'))})")
    else:
        lines.append(f"- shuffled twin: built by ablate from shuffle_seed {t.value(twin.get('shuffle_seed'))}")
    given = imported.get("stats")
    if not isinstance(given, dict):
        lines += ["", "No stats.json was given (set [oracle] stats, or keep `<table>.stats.json` beside the table)."]
        return "\n".join(lines)
    cos = oracle.get("pairwise_abs_cos") or {}
    rows = [[f"`{k}`", t.cell(given.get(k)), t.cell(oracle.get(k) if k != "teacher" else None)]
            for k in IMPORTED_FIELDS if k in given or k in oracle]
    rows += [[f"`{k}`", t.cell(v), DASH] for k, v in given.items() if k not in IMPORTED_FIELDS]
    rows += [[f"`pairwise_abs_cos.{k}`", DASH, t.cell(v)] for k, v in cos.items()]
    return "\n".join([*lines, "", table(["field", "stats.json (imported)", "ablate's check of the files"], rows)])


def _health(r: dict, t: Text) -> str:
    parts = [_teacher_reading(r, t), _key_values("Teacher", r.get("teacher") or {}, t), _imported_oracle(r, t),
             _key_values("Oracle", r.get("oracle") or {}, t)]
    parts = [p for p in parts if p]
    return "\n\n".join(["## Teacher and oracle health", *parts]) if parts else ""


def _formulas(r: dict, t: Text, run_dir: Path) -> str:
    lines = ["## Objectives and logs per cell", ""]
    for name, c in r["cells"].items():
        formula = t.scrub(c.get("objective_formula") or DASH)
        log = c.get("metrics_csv")
        link = f" · [training log]({t.path(run_dir / log)})" if log else ""
        lines.append(f"- **{name}**: {formula}{link}")
    return "\n".join(lines)


def _provenance(r: dict, t: Text) -> str:
    p = r.get("provenance") or {}
    lines = ["## Provenance", "",
             f"- code: git {t.value(p.get('git_sha'))}, uncommitted changes: {t.value(p.get('git_dirty'))}",
             f"- device: {t.value(p.get('device'))} ({t.value(p.get('device_name'))})",
             f"- seed: {t.value(p.get('seed'))}",
             *_teacher_files(r, t),
             f"- started: {t.value(p.get('started'))}; wall time {t.value(p.get('wall_seconds'))} s",
             f"- schema version: {t.value(r.get('schema_version'))}"]
    versions = p.get("versions") or {}
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {t.value(v)}" for k, v in versions.items()))
    plugins = p.get("plugins") or {}
    if plugins:
        lines.append("- plugins: " + ", ".join(f"{k} ({t.value(v)})" for k, v in plugins.items()))
    lines += _costs(r, t)
    lines += ["", "Command:", "", "```", t.value(p.get("command")), "```"]
    return "\n".join(lines)


def _teacher_files(r: dict, t: Text) -> list[str]:
    """The teacher's weights by content: a GGUF file's path and sha256 (results.json teacher)."""
    teacher = r.get("teacher") or {}
    if not teacher.get("gguf_sha256"):
        return []
    return [f"- teacher weights: {t.value(teacher.get('gguf_file'))}, sha256 {t.value(teacher['gguf_sha256'])}"]


def _costs(r: dict, t: Text) -> list[str]:
    """Per stage and per trained cell: wall seconds, tokens processed, tokens/s, peak GPU memory."""
    p = r.get("provenance") or {}
    stages = r.get("stages") or {name: {"seconds": sec} for name, sec in (p.get("stage_seconds") or {}).items()}
    if not stages:
        return []
    gpu = any(s.get("peak_gpu_allocated_gib") is not None for s in stages.values())
    header = ["stage", "key", "cached", "seconds", "tokens", "tokens/s"]
    header += ["peak GPU allocated (GiB)", "peak GPU reserved (GiB)"] if gpu else []

    def row(name, s):
        out = [name, t.cell(s.get("key")), t.cell(s.get("cached")), t.cell(s.get("seconds")),
               t.cell(s.get("tokens")), fmt_rate(s.get("tokens_per_s"))]
        return out + ([t.cell(s.get("peak_gpu_allocated_gib")), t.cell(s.get("peak_gpu_reserved_gib"))] if gpu else [])

    note = ("; peak GPU memory is the stage's own peak, counted from the memory earlier stages left resident"
            if gpu else "")
    lines = ["", "What each stage cost in this run (tokens are counted only for work done, not for a cache hit; "
             f"a stage's tokens/s is over its whole wall time{note}):", "",
             table(header, [row(name, s) for name, s in stages.items()])]
    cells = {n: c for n, c in (r.get("cells") or {}).items() if c.get("seconds") is not None}
    if cells:
        cell_header = ["cell", "cached", "seconds", "training tokens/s", "first step (ms)", "median step (ms)"]
        cell_header += ["compiled", "peak GPU allocated (GiB)"] if gpu else []
        fused = any(c.get("fused") for c in cells.values())
        cell_header += ["fused group"] if fused else []
        rows = [[n, t.cell(c.get("cached")), t.cell(c.get("seconds")), fmt_rate(c.get("tokens_per_s")),
                 t.cell(c.get("first_step_ms")), t.cell(c.get("median_step_ms"))]
                + ([t.cell(c.get("compiled")), t.cell(c.get("peak_gpu_allocated_gib"))] if gpu else [])
                + ([", ".join(c.get("fused") or []) or "—"] if fused else [])
                for n, c in cells.items()]
        group_note = ("; the cells of a fused group trained together, one forward and one backward per step, so "
                      "their seconds and tokens/s are the group's wall time" if fused else "")
        lines += ["", "Cells (seconds include evaluation and checkpoints; tokens/s excludes them; the first "
                  "training step is timed alone, so what only it pays, compilation on CUDA included, shows as "
                  f"its excess over the median step{group_note}):", "", table(cell_header, rows)]
    return lines


def _expectations(r: dict, t: Text) -> str:
    rows = r.get("expectations") or []
    if not rows:
        return ""
    body = [[t.cell(e["what"]), t.cell(e["expected"]), t.cell(e["got"]), "yes" if e["met"] else "**NO**"] for e in rows]
    return "\n".join(["## Expectations", "", table(["what", "expected", "got", "met"], body)])


def _definitions(r: dict, t: Text) -> str:
    info = metric_info(r)
    if not info:
        return ""
    lines = [f"- **{k}**" + (f" [{t.scrub(v['unit'])}]" if v.get("unit") else "") + f": {t.scrub(v.get('meaning', ''))}"
             for k, v in info.items()]
    return "\n".join(["## Metric definitions", "", *lines])


def render_report(results: dict, run_dir: Path, report_path: Path) -> str:
    """Write the findings report to report_path and its plots to report_path's stem folder
    (e.g. reports/zeb139.md + reports/zeb139/*.png); return the markdown."""
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    t = Text(report_path.parent)
    sections = [
        _header(results, t), _failed_probes(results, t), _conventions(results, t), _val_loss_matrix(results, t), _metrics_table(results, t),
        _threshold_sentences(results, t), _combination(results, t), _discriminator(results, t),
        _battery_readings(results, t),
        _control_validity(results, t), _expectations(results, t), _kl_trajectory(results, t),
        _plots(results, t, report_path.parent / report_path.stem), _health(results, t),
        _formulas(results, t, Path(run_dir)), _definitions(results, t), _provenance(results, t),
    ]
    text = "\n\n".join(s for s in sections if s) + "\n"
    store.write_atomic(report_path, text.encode())
    return text


STALE_MARK = "<!-- ablate: stale -->"


def mark_stale(report_path: Path, message: str) -> bool:
    """Open an existing report with a banner saying a later run could not replace it (an older
    banner is replaced). Returns whether there was a report to mark."""
    report_path = Path(report_path)
    if not report_path.is_file():
        return False
    text = report_path.read_text()
    if text.startswith(STALE_MARK):
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    banner = f"{STALE_MARK}\n> **STALE REPORT.** {message}"
    store.write_atomic(report_path, f"{banner}\n\n{text}".encode())
    return True


# -------------------------------------------------------------------------------- comparison


def spec_differences(specs: list[dict]) -> dict[str, list[Any]]:
    """Dotted keys whose values differ between the dicts → the value in each (None = absent)."""
    flats = [flatten(s) for s in specs]
    absent = "<absent>"

    def canon(f: dict, k: str) -> str:
        return json.dumps(f[k], sort_keys=True, default=str) if k in f else absent

    return {k: [f.get(k) for f in flats] for k in sorted(set().union(*flats))
            if len({canon(f, k) for f in flats}) > 1}


def signed_delta(later: float, first: float, decimals: int) -> tuple[str, str]:
    """(later − first as '+0.0012', trend arrow ↑ ↓ =), the difference computed exactly."""
    if later == first:
        return fmt(0.0, decimals, sign=True), "="
    sign, arrow = ("+", "↑") if later > first else ("-", "↓")
    return f"{sign}{fmt_gap(later, first, decimals)}", arrow


def _labels(runs: list[dict]) -> list[str]:
    names = [r["name"] for r in runs]
    return [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]


def cell_matches(runs: list[dict]) -> list[tuple[str, ...]]:
    """Tuples of one cell name per run that play the same part: the first run's cell, then in each
    other run the cell of the same name, else every cell with the same base name (sweep label
    stripped from either side) and the same router and oracle settings. ZEB-139's
    router_on_real@lambda=0.5 and @lambda=0.9 thus both meet ZEB-136's router_on_real."""
    def role(cell: dict) -> tuple:
        cfg = cell.get("config", {})
        return cfg.get("router"), cfg.get("oracle")

    def base(cell: dict, name: str) -> str:
        return cell.get("config", {}).get("base") or name

    out: list[tuple[str, ...]] = []
    for name, cell in runs[0]["cells"].items():
        options = []
        for run in runs[1:]:
            if name in run["cells"]:
                options.append([name])
            else:
                options.append([n for n, c in run["cells"].items() if base(c, n) == base(cell, name) and role(c) == role(cell)])
        out += [(name, *combo) for combo in itertools.product(*options)]
    return out


def _compare_metrics(runs: list[dict], labels: list[str]) -> str:
    metrics = [cell_metrics(r) for r in runs]
    matches = cell_matches(runs)
    out = ["## Metrics per matching cell"]
    for names in matches:
        per_run = [m.get(n, {}) for m, n in zip(metrics, names)]
        finals = [final_val_loss(r["cells"][n]) for r, n in zip(runs, names)]
        for pr, v in zip(per_run, finals):
            if v is not None:
                pr.setdefault("val_loss", v)
        shared = [k for k in per_run[0] if all(k in pr for pr in per_run[1:])]
        if not shared:
            continue
        rows = []
        for k in shared:
            values = [pr[k] for pr in per_run]
            d = row_decimals(values)
            deltas = [signed_delta(v, values[0], d) for v in values[1:]]
            rows.append([k, *(fmt(v, d) for v in values), *(f"{delta} {arrow}" for delta, arrow in deltas)])
        header = ["metric", *labels, *(f"Δ {lab} − {labels[0]}" for lab in labels[1:])]
        out += ["", f"### {_match_title(names, labels)}", "", table(header, rows)]
    matched = [{names[i] for names in matches} for i in range(len(runs))]
    only = sorted({f"{n} ({lab})" for r, lab, seen in zip(runs, labels, matched) for n in r["cells"] if n not in seen})
    if only:
        out += ["", "Cells with no counterpart in every run: " + ", ".join(only)]
    return "\n".join(out)


def _compare_verdicts(runs: list[dict], labels: list[str]) -> str:
    lines = ["## Verdict changes", ""]
    keyed = [{(th["name"], th["cell"]): th["verdict"] for th in r.get("thresholds", [])} for r in runs]
    threshold_names = list(dict.fromkeys(name for kd in keyed for name, _ in kd))
    combos = [r.get("combination") or {} for r in runs]
    discs = [{d["real"]: d["outcome"] for d in r.get("discriminator", [])} for r in runs]

    def changed(what: str, where: str, seq: list[str]) -> None:
        if len(set(seq)) > 1:
            lines.append(f"- {what} {where}: " + " → ".join(f"{s} ({lab})" for s, lab in zip(seq, labels)))

    # a run over seeds reads its verdicts per seed group: its cells `x@seed=N` meet by the group `x`
    matches = list(dict.fromkeys(tuple(run["cells"][n].get("config", {}).get("seed_group") or n for run, n in zip(runs, names))
                                 for names in cell_matches(runs)))
    for names in matches:
        where = _match_title(names, labels)
        for th in threshold_names:
            changed(f"threshold {th}", f"@ {where}", [kd.get((th, n), "absent") for kd, n in zip(keyed, names)])
        changed("combination", where, [cb.get(n, {}).get("label", "absent") for cb, n in zip(combos, names)])
        changed("discriminator", where, [dd.get(n, "absent") for dd, n in zip(discs, names)])
    if len(lines) == 2:
        lines.append("No threshold verdict, combination label or discriminator outcome changed.")
    return "\n".join(lines)


def _match_title(names: tuple[str, ...], labels: list[str]) -> str:
    """One cell name when all runs use it, else each run's cell with the run's label."""
    return names[0] if len(set(names)) == 1 else " ↔ ".join(f"{n} ({lab})" for n, lab in zip(names, labels))


def _compare_sanity(runs: list[dict], labels: list[str], t: Text) -> str:
    lines = ["## Sanity", ""]
    first = runs[0]
    baselines = [n for n, c in first["cells"].items() if not c.get("config", {}).get("router", True)]
    for name in baselines:
        a = final_val_loss(first["cells"][name])
        for lab, run in zip(labels[1:], runs[1:]):
            other = run["cells"].get(name)
            b = final_val_loss(other) if other else None
            if a is None or b is None:
                lines.append(f"- router-off baseline {name}: no final val_loss in both {labels[0]} and {lab}.")
            else:
                lines.append(f"- router-off baseline {name}: " +
                             agreement(f"{labels[0]}", a, lab, b, "nats") + ".")
    if not baselines:
        lines.append(f"- {labels[0]} has no router-off cell to compare.")
    oracles = [_oracle_content(r) for r in runs]
    differing = spec_differences(oracles)
    if not differing:
        lines.append(f"- oracle statistics are identical across runs ({len(flatten(oracles[0]))} values; "
                     f"timings and artifact paths are not compared).")
    else:
        lines += ["- oracle statistics differ:", "",
                  table(["oracle key", *labels], [[k, *_row_cells(t, vs)] for k, vs in differing.items()])]
    return "\n".join(lines)


def _row_cells(t: Text, values: list) -> list[str]:
    """Cells of one table row; numbers share the precision at which different values differ."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    d = row_decimals(nums) if len(nums) == len(values) else None
    return [t.cell(v, d) for v in values]


# Oracle stats that describe how a run went (time, where files were), not what the oracle holds.
ORACLE_RUN_KEYS = ("seconds", "tokens_per_s", "resolved", "source")


def _oracle_content(results: dict) -> dict:
    def keep(d):
        return {k: keep(v) if isinstance(v, dict) else v for k, v in d.items() if k not in ORACLE_RUN_KEYS}
    return keep(results.get("oracle") or {})


OUTER_ROWS = [("breaks", "breaks"), ("breaks", "holds"), ("holds", "breaks"), ("holds", "holds"), ("soft", "any")]


def outer_section(runs: list[dict], labels: list[str], t: Text) -> str:
    """The outer 2×2 of reference §7.4 filled from two runs: the first the objective-axis (KL) run,
    the second the teacher-axis run; each run's reading (run_reading) and the matrix's reading."""
    (a, b), (la, lb) = [run_reading(r) for r in runs[:2]], labels[:2]
    reading = outer_reading(a, b)

    def words(x: dict) -> str:
        if x["reading"] is None:
            return "no reading (no discriminated pair with a combination)"
        cells = "; ".join(f"{c}: {label}" for c, label in x["cells"].items())
        head = x["reading"] if x["reading"] != UNDECIDED_LABEL else f"undecided ({' or '.join(x['possible'])})"
        return f"**{head}** ({cells})"

    def axes(r: dict) -> str:
        ax = r.get("axes") or {}
        return f"objective {t.scrub(str(ax.get('objective')))}, teacher {t.scrub(str(ax.get('teacher')))}"

    lines = ["## Outer 2×2 (objective × teacher; the reference's verdict matrices)", "",
             f"- objective axis (KL run): {la} ({axes(runs[0])}) reads {words(a)}",
             f"- teacher axis: {lb} ({axes(runs[1])}) reads {words(b)}"]
    for run, lab, x, want in ((runs[0], la, a, "objective"), (runs[1], lb, b, "teacher")):
        if x["role"] != want:
            lines.append(f"- note: {lab}'s axes place it on the {x['role']} axis, not the {want} axis; the reading "
                         f"below takes the order given (objective run first)")
    lines += ["", f"**Reading:** {reading['sentence']}.", ""]
    hit = {(x, y) for x in a["possible"] for y in b["possible"]}
    rows = []
    for ra, rb in OUTER_ROWS:
        applies = any(x == ra and (rb == "any" or y == rb) for x, y in hit)
        text = OUTER_SOFT if ra == "soft" else outer_cell(ra, rb)
        rows.append([f"{ra} ({la})", f"{rb} ({lb})", f"**{text}**" if applies else text, "◀" if applies else ""])
    if any(y == "soft" and x != "soft" for x, y in hit):
        rows.append([f"breaks or holds ({la})", f"soft ({lb})", f"**{OUTER_SOFT_TEACHER}**", "◀"])
    lines.append(table([la, lb, "interpretation → next step", "this pair"], rows))
    return "\n".join(lines)


def render_comparison(runs: list[dict], report_path: Path, outer: bool = False) -> str:
    """Side-by-side report of several runs' results (the first is the reference); writes
    report_path and returns the markdown. `outer`: open with the outer 2×2 of the first two runs."""
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    t = Text(report_path.parent)
    labels = _labels(runs)
    head = ["# Comparison: " + " vs ".join(labels), ""]
    head += [f"- {lab}: git {t.value(r.get('provenance', {}).get('git_sha'))}, started "
             f"{t.value(r.get('provenance', {}).get('started'))}" for lab, r in zip(labels, runs)]
    diffs = spec_differences([r.get("spec") or {} for r in runs])
    spec_part = ["## Spec keys that differ", ""]
    if diffs:
        spec_part.append(table(["key", *labels], [[f"`{k}`", *(t.cell(literal(v)) for v in vs)] for k, vs in diffs.items()]))
    else:
        spec_part.append("The resolved specs are identical.")
    sections = ["\n".join(head), *([outer_section(runs, labels, t)] if outer else []), "\n".join(spec_part),
                _compare_verdicts(runs, labels),
                _compare_sanity(runs, labels, t), _compare_metrics(runs, labels)]
    text = "\n\n".join(sections) + "\n"
    store.write_atomic(report_path, text.encode())
    return text
