"""Oracle-rows sweep: where does the cheap-win confound set in?

`oracle.rows` is a stage setting, not a cell field, so a `[sweep]` block cannot vary it. Each
value is instead its own run of one spec, `ablate run SPEC --set oracle.rows=R --set
name=<name>_rows<R>`; the runs share the cached corpus, backbone and teacher and recompute only
the oracle and the cells. The summary is built from the runs' results.json alone:

    python -m ablate.report.rows_sweep specs/calibration/rows_sweep.toml [--rows 16 64 ...] [--set k=v ...]

writes reports/<name>.md (one table row per run) and reports/<name>.png. The routers of the first
`[[discriminator]]` pair "move together" when cross_run_cos ≥ MOVE_TOGETHER (0.95): real and
control then emit the same logits, whatever the real oracle holds (the cheap-win signature).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ablate.pipeline import store
from ablate.errors import AblateError
from ablate.report.markdown import table
from ablate.verdicts.verdict import fmt, row_decimals

DEFAULT_ROWS = (16, 64, 256, 1024, 4096)
MOVE_TOGETHER = 0.95
CELL_METRICS = ("engram_logit_entropy", "kl_change", "teacher_match_cos")


def run_name(base: str, rows: int) -> str:
    return f"{base}_rows{rows}"


def run_all(spec: str, rows: list[int], overrides: list[str], name: str) -> dict[int, int]:
    """`ablate run` the spec once per rows value (in this process); → {rows: exit code}."""
    from ablate.cli.main import main

    codes = {}
    for r in rows:
        argv = ["run", spec, "--quiet", *(a for o in overrides for a in ("--set", o)),
                "--set", f"oracle.rows={r}", "--set", f"name={run_name(name, r)}"]
        codes[r] = main(argv)
    return codes


def sweep_row(results: dict) -> dict:
    """One run's results.json → the values the sweep table shows (None where absent)."""
    if not results.get("discriminator"):
        raise AblateError(f"Run {results['name']} has no discriminator outcome (a cell failed, or the spec has no "
                          f"[[discriminator]]); see its report, fix the spec and run the sweep again.")
    disc = results["discriminator"][0]
    real, control = disc["real"], disc["shuffled"]
    cells = results["cells"]
    pair = next(p["metrics"] for p in results["pairs"] if p["real"] == real and p["shuffled"] == control)
    row = {"rows": results["spec"]["oracle"]["rows"],
           "obs_per_row": (results.get("oracle") or {}).get("observations_per_row", {}).get("mean"),
           "cross_run_cos": pair.get("cross_run_cos"),
           "real_label": disc["real_label"], "control_label": disc["shuffled_label"], "outcome": disc["outcome"]}
    for m in CELL_METRICS:
        row[f"{m}/real"] = cells[real]["metrics"].get(m)
        row[f"{m}/control"] = cells[control]["metrics"].get(m)
    return row


def moves_together(row: dict) -> bool:
    return row["cross_run_cos"] is not None and row["cross_run_cos"] >= MOVE_TOGETHER


def onset(rows: list[dict]) -> int | None:
    """The largest rows value at and below which every run's routers move together; None when
    the run with the fewest rows already tells real from control."""
    found = None
    for row in sorted(rows, key=lambda r: r["rows"]):
        if not moves_together(row):
            break
        found = row["rows"]
    return found


COLUMNS = [("rows", "oracle rows"), ("obs_per_row", "entries per row (mean)"), ("cross_run_cos", "cross_run_cos"),
           *((f"{m}/{w}", f"{m} ({w})") for m in CELL_METRICS for w in ("real", "control")),
           ("real_label", "real label"), ("control_label", "control label"), ("outcome", "outcome")]


def render_markdown(rows: list[dict], title: str, real: str, control: str) -> str:
    rows = sorted(rows, key=lambda r: r["rows"])
    numeric = [k for k, _ in COLUMNS if k != "rows" and all(isinstance(r[k], (float, type(None))) for r in rows)]
    decimals = {k: row_decimals([r[k] for r in rows if r[k] is not None]) for k in numeric}
    body = []
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            v = r[key]
            cells.append("—" if v is None else fmt(v, decimals.get(key)) if key in decimals else str(v))
        cells.append("yes" if moves_together(r) else "no")
        body.append(cells)
    start = onset(rows)
    together = f"the routers of {real} and {control} move together (cross_run_cos ≥ {fmt(MOVE_TOGETHER, 2)})"
    if start is None:
        verdict = (f"The routers of {real} and {control} differ even at the fewest rows swept ({rows[0]['rows']}): "
                   f"the cheap-win confound does not set in within this range.")
    elif start == rows[-1]["rows"]:
        verdict = f"At every swept size, up to {start} rows, {together}: the confound is present throughout."
    else:
        above = next(r["rows"] for r in rows if r["rows"] > start)
        verdict = (f"The cheap-win confound sets in at {start} rows and below: there {together}, so the real "
                   f"oracle's content no longer reaches the router; from {above} rows up they differ.")
    header = [label for _, label in COLUMNS] + [f"move together (cross_run_cos ≥ {fmt(MOVE_TOGETHER, 2)})"]
    return "\n".join([f"# {title}", "", verdict, "", table(header, body), "",
                      f"Real cell {real}, control cell {control}; every number is read from the runs' results.json.",
                      ""])


def threshold_bounds(results: dict) -> dict[str, float]:
    """Metric → the bound of the run's single-bound threshold on it (below, above, …)."""
    return {t["metric"]: t["rule"]["bounds"][0] for t in results.get("thresholds", [])
            if len(t["rule"]["bounds"]) == 1}


def plot(rows: list[dict], path: Path, real: str, control: str, bounds: dict[str, float]) -> None:
    """cross_run_cos and the per-cell metrics against log2(rows), each with its threshold's bound
    (dotted) where the spec has one; markers coloured by outcome."""
    rows = sorted(rows, key=lambda r: r["rows"])
    xs = [math.log2(r["rows"]) for r in rows]
    panels = [("cross_run_cos", [("cross_run_cos", "real vs control")])] + [
        (m, [(f"{m}/real", real), (f"{m}/control", control)]) for m in CELL_METRICS]
    fig = Figure(figsize=(6.5, 2.3 * len(panels)))
    colours = {"clean_positive": "#27ae60", "cheap_win": "#c0392b", "holds": "#7f8c8d", "anomaly": "#8e44ad"}
    for i, (label, series) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for key, name in series:
            pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28, zorder=3,
                           c=[colours.get(r["outcome"], "#000000") for x, r in zip(xs, rows) if r[key] is not None])
        if label in bounds:
            ax.axhline(bounds[label], color="#7f8c8d", linewidth=0.8, linestyle=":", label="threshold bound")
        if label == "cross_run_cos":
            ax.axhline(MOVE_TOGETHER, color="#c0392b", linewidth=0.8, linestyle="--", label="move together")
            ax.set_title("marker colour = outcome: green clean_positive, red cheap_win, grey holds", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xticks(xs, [str(r["rows"]) for r in rows])
    ax.set_xlabel("oracle rows")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def summarise(results: list[dict], report_path: Path) -> str:
    """Write report_path (markdown) and its .png beside it from the runs' results; → markdown."""
    rows = [sweep_row(r) for r in results]
    disc = results[0]["discriminator"][0]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    png = report_path.with_suffix(".png")
    plot(rows, png, disc["real"], disc["shuffled"], threshold_bounds(results[0]))
    text = render_markdown(rows, f"Oracle-rows sweep: {report_path.stem}", disc["real"], disc["shuffled"])
    text += f"\n![oracle-rows sweep]({png.name})\n"
    store.write_atomic(report_path, text.encode())
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablate.report.rows_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", help="base name of the runs and the report (default: the spec's name)")
    args = parser.parse_args(argv)
    from ablate.verdicts.schema import read_results
    from ablate.config.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    name = args.name or spec.name
    codes = run_all(args.spec, args.rows, args.overrides, name)
    done = [r for r in args.rows if (Path(spec.runs_dir) / run_name(name, r) / "results.json").is_file()]
    results = [read_results(Path(spec.runs_dir) / run_name(name, r) / "results.json") for r in done]
    report = Path(spec.reports_dir) / f"{name}.md"
    print(summarise(results, report))
    print(f"sweep report: {report}")
    return max(codes.values(), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
