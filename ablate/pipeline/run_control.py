"""Where a run writes and how it is stopped: the device, SIGINT/SIGTERM handling, run paths."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ablate.errors import AblateError
from ablate.config.spec import Spec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AblateError("--device cuda was requested but torch sees no CUDA device. Use --device cpu or auto.")
    return torch.device(name)


class StopFlag:
    """SIGINT/SIGTERM set a flag: training saves at the next step boundary (or between evaluation
    batches) and the run stops with exit code 130. A second signal interrupts at once
    (KeyboardInterrupt): the stage being computed leaves nothing behind, finished work is kept."""

    def __init__(self):
        self.set = False
        self.signal = None

    def __call__(self) -> bool:
        return self.set

    @contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.set:
                raise KeyboardInterrupt
            self.set, self.signal = True, signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@dataclass
class RunPaths:
    run_dir: Path
    report: Path
    cache: Path

    @classmethod
    def of(cls, spec: Spec, root: Path = Path(".")) -> "RunPaths":
        return cls(root / spec.runs_dir / spec.name, root / spec.reports_dir / f"{spec.name}.md", root / spec.cache_dir)
