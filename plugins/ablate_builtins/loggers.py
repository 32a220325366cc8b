"""The built-in TensorBoard logger (pip install 'ablate[tensorboard]').

One event-file directory per cell, runs/<name>/tensorboard/<cell>: every column of metrics.csv
as a scalar of that name at its step, `val_loss` at each evaluation, the cell's resolved config
as hyperparameters (TensorBoard's HPARAMS tab sets the cells of all runs side by side), and as
text the cell's outcome, final metrics and verdicts.

    tensorboard --logdir runs/<name>/tensorboard     (or --logdir runs for every run)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pydantic import Field, model_validator

from ablate.api import InputError, Logger, Params, hookimpl

MISSING = ("the tensorboard logger needs the tensorboard package, which is not installed here: "
           "pip install 'ablate[tensorboard]'")


class TensorBoardParams(Params):
    dir: str | None = None  # where the cells' directories go; default: <run directory>/tensorboard
    flush_secs: int = Field(10, ge=1)  # how often a cell's events reach its file

    @model_validator(mode="after")
    def _installed(self):
        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError(MISSING)
        return self


def flatten(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"train": {"lr": 0.01}} → {"train.lr": 0.01}; lists and None as text (hparams' types)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def table(rows: dict) -> str:
    return "| name | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())


class TensorBoard(Logger):
    name = "tensorboard"
    Params = TensorBoardParams
    description = "TensorBoard event files per cell under runs/<name>/tensorboard (pip install 'ablate[tensorboard]')"

    def __init__(self, params: TensorBoardParams):
        super().__init__(params)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(MISSING) from None
        self.summary_writer, self.root, self.writers = SummaryWriter, Path("tensorboard"), {}

    def writer(self, cell: str):
        if cell not in self.writers:
            self.writers[cell] = self.summary_writer(log_dir=str(self.root / cell), flush_secs=self.params.flush_secs)
        return self.writers[cell]

    def release(self, cell: str) -> None:
        if cell in self.writers:
            self.writers.pop(cell).close()

    def on_run_started(self, event):
        self.root = Path(self.params.dir) if self.params.dir else Path(event.run_dir) / "tensorboard"

    def on_cell_started(self, event):
        from torch.utils.tensorboard.summary import hparams

        if event.resumed_from is None:  # trained from its first step: an earlier training's curves would overlay
            self.release(event.cell)
            for old in (self.root / event.cell).glob("events.out.tfevents.*"):
                old.unlink()
        w = self.writer(event.cell)
        for summary in hparams(flatten(event.config), {"val_loss": 0.0}):  # metrics: the scalars of that tag
            w._get_file_writer().add_summary(summary)
        w.add_text("config", f"```json\n{json.dumps(event.config, indent=1)}\n```", event.resumed_from or 0)

    def on_step_logged(self, event):
        w = self.writer(event.cell)
        for column, value in event.values.items():
            w.add_scalar(column, value, event.step)

    def on_cell_evaluated(self, event):
        self.writer(event.cell).add_scalar("val_loss", event.val_loss, event.step)

    def on_cell_finished(self, event):
        if not event.cached:
            self.writer(event.cell).add_text("outcome", table(event.outcome), event.outcome.get("steps") or 0)
        self.release(event.cell)

    def on_cell_failed(self, event):
        self.writer(event.cell).add_text("failure", event.error, event.step or 0)
        self.release(event.cell)

    def on_verdicts(self, event):
        for cell, metrics in event.metrics.items():
            w = self.writer(cell)
            w.add_text("final_metrics", table(metrics))
            mine = [t for t in event.thresholds if t["cell"] == cell]
            lines = [f"{t['name']}: {t['metric']} = {t['value']} → **{t['verdict']}**" for t in mine]
            if cell in event.combination:
                comb = event.combination[cell]
                lines.append(f"combination: {comb['crossed']}/{comb['total']} thresholds crossed → "
                             f"**{comb['label']}**")
            lines += [f"discriminator {d['real']} vs {d['shuffled']}: **{d['outcome']}**"
                      for d in event.discriminator if cell in (d["real"], d["shuffled"])]
            w.add_text("verdicts", "\n\n".join(lines) or "no threshold, combination or discriminator reads this cell")
            self.release(cell)

    def close(self):
        for cell in list(self.writers):
            self.release(cell)


@hookimpl
def ablate_loggers(register):
    register(TensorBoard)
