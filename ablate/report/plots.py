"""PNG plots for the findings report, drawn from results.json data only.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state). Each
function returns True when it wrote its file and False when the results hold nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ablate.verdicts.verdict import break_region

BREAK_COLOUR, HOLD_COLOUR, MISSING_COLOUR = "#c0392b", "#27ae60", "#7f8c8d"


def _series(rows: list[dict[str, Any]], column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite `column`."""
    pts = [(float(r["step"]), float(r[column])) for r in rows
           if r.get(column) is not None and "step" in r and math.isfinite(float(r[column]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def _curves(cells: dict[str, dict], source: str, columns: list[tuple[str, str]], path: Path,
            title: str) -> bool:
    """One panel per (column, y-label); one line per cell; rows come from cell[source]."""
    panels = [(col, label) for col, label in columns
              if any(_series(c.get(source, []), col)[0] for c in cells.values())]
    if not panels:
        return False
    fig = Figure(figsize=(6.5, 2.6 * len(panels)))
    for i, (col, label) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for name, cell in cells.items():
            xs, ys = _series(cell.get(source, []), col)
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.2, marker="o" if len(xs) < 12 else None, markersize=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_title(title)
            ax.legend(fontsize=7)
    ax.set_xlabel("step")
    _save(fig, path)
    return True


def training_curves(cells: dict[str, dict], path: Path) -> bool:
    """Training objective and KL term per cell over logged steps."""
    return _curves(cells, "history", [("loss", "loss (objective)"), ("kl", "KL (nats/token)")], path,
                   "training loss and KL per cell")


def val_loss_curves(cells: dict[str, dict], path: Path) -> bool:
    """Validation loss per cell over evaluation steps."""
    return _curves(cells, "evals", [("val_loss", "val loss (nats/token)")], path, "validation loss per cell")


def router_curves(cells: dict[str, dict], path: Path) -> bool:
    """α, ‖W_align‖_F and router entropy per cell over logged steps."""
    return _curves(cells, "history", [("alpha", "α"), ("w_align_norm", "‖W_align‖_F"),
                                      ("router_entropy", "router entropy (nats)")], path,
                   "router scale, weight norm and entropy")


def _break_spans(kind: str, bounds: list[float], lo: float, hi: float) -> list[tuple[float, float]]:
    """The BREAK region of a rule (verdict.break_region) clipped to the drawn x-range [lo, hi]."""
    return [(max(a, lo), min(b, hi)) for a, b, _, _ in break_region(kind, bounds)]


def threshold_bands(thresholds: list[dict[str, Any]], path: Path) -> bool:
    """One row per threshold: its BREAK region shaded, its bounds, and the value marked with
    its verdict."""
    rows = [t for t in thresholds if all(math.isfinite(b) for b in t["rule"]["bounds"])]
    if not rows:
        return False
    fig = Figure(figsize=(7, 1.1 * len(rows) + 0.6))
    for i, t in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        bounds = t["rule"]["bounds"]
        points = bounds + ([t["value"]] if t["value"] is not None else [])
        span = (max(points) - min(points)) or max(abs(points[0]), 1.0)
        lo, hi = min(points) - 0.5 * span, max(points) + 0.5 * span
        for a, b in _break_spans(t["rule"]["kind"], bounds, lo, hi):
            ax.axvspan(a, b, color=BREAK_COLOUR, alpha=0.15, linewidth=0)
        for b in bounds:
            ax.axvline(b, color=BREAK_COLOUR, linewidth=1)
        colour = {"BREAK": BREAK_COLOUR, "HOLD": HOLD_COLOUR}.get(t["verdict"], MISSING_COLOUR)
        if t["value"] is not None:
            ax.plot([t["value"]], [0.5], marker="D", color=colour, markersize=8)
        ax.text(1.01, 0.5, t["verdict"], transform=ax.transAxes, color=colour, va="center", fontweight="bold")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_title(f"{t['name']} · {t['metric']} · {t['cell']}", fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    _save(fig, path)
    return True
