"""An ablate logger plugin for Weights & Biases: one W&B run per cell, grouped by the experiment
(the spec's name), with the cell's resolved config as the run's config, every metrics.csv column
and val_loss logged at its step, and the cell's outcome, final metrics and verdicts in its summary.

    pip install ./plugins/examples/ablate-wandb-logger
    ablate run specs/demo.toml --logger wandb            # WANDB_MODE=offline: no network
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ablate.api import InputError, Logger, Params, hookimpl


class WandbParams(Params):
    project: str = "ablate"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None  # None: $WANDB_MODE, else W&B's default
    dir: str | None = None  # where W&B writes its files; default: the run directory
    tags: list[str] = []
    quiet: bool = True  # no W&B messages per cell (its run links are in each run's files)


class Wandb(Logger):
    name = "wandb"
    Params = WandbParams
    description = "one Weights & Biases run per cell, grouped by experiment (pip install ablate-wandb-logger)"

    def __init__(self, params: WandbParams):
        super().__init__(params)
        try:
            import wandb
        except ImportError:
            raise InputError("the wandb logger needs wandb, which is not installed here: pip install wandb") from None
        self.wandb, self.group, self.dir, self.runs = wandb, "ablate", Path("."), {}

    def on_run_started(self, event):
        self.group = event.run
        self.dir = Path(self.params.dir) if self.params.dir else Path(event.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def on_cell_started(self, event):
        if event.cell in self.runs:  # a retried cell (its worker died): the same W&B run goes on
            return
        p = self.params
        self.runs[event.cell] = self.wandb.init(
            project=p.project, entity=p.entity, mode=p.mode, dir=str(self.dir), group=self.group, name=event.cell,
            job_type="cell", tags=p.tags or None, config=event.config, reinit="create_new",
            settings=self.wandb.Settings(console="off", silent=p.quiet))  # console: leave ablate's output alone

    def on_step_logged(self, event):
        if event.cell in self.runs:
            self.runs[event.cell].log(dict(event.values), step=event.step)

    def on_cell_evaluated(self, event):
        if event.cell in self.runs:
            self.runs[event.cell].log({"val_loss": event.val_loss}, step=event.step)

    def on_cell_finished(self, event):
        if event.cell in self.runs:
            self.runs[event.cell].summary.update({"outcome": event.outcome})

    def on_cell_failed(self, event):
        if event.cell in self.runs:
            self.runs[event.cell].summary.update({"failed": event.error})
            self.runs.pop(event.cell).finish(exit_code=1)

    def on_verdicts(self, event):
        for cell, run in self.runs.items():
            run.summary.update({"final": event.metrics.get(cell, {}),
                                "verdicts": [t for t in event.thresholds if t["cell"] == cell]})
        self.close()

    def close(self):
        while self.runs:
            self.runs.popitem()[1].finish()


@hookimpl
def ablate_loggers(register):
    register(Wandb)
