"""`ablate ARGS` run in this test process, as a user would type it in a directory; the micro demo
(the demo spec's `tiny` profile with 2 pretraining steps for backbone and teacher) that the
end-to-end tests of cells, executors and faults run, and its stages built once per test process."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ablate.cli import main as cli


def ablate_in(cwd: Path, monkeypatch, *args: str) -> int:
    """Exit code of `ablate ARGS` run in `cwd` with one torch thread (like the subprocess runs)."""
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(list(args))
    finally:
        torch.set_num_threads(threads)


ROOT = Path(__file__).resolve().parents[1]
MICRO_DEMO = ["demo.toml", "--profile", "tiny", "--set", "backbone.pretrain.steps=2", "--set", "teacher.steps=2"]
STAGES = ("corpus", "backbone", "teacher", "oracle")


def demo_dir(cwd: Path, stages_from: Path | None = None, stages: tuple[str, ...] = STAGES) -> Path:
    """cwd (created) holding the demo spec and, from `stages_from`'s cache, the entries of
    `stages` (default: every stage before the cells, so that a run there starts at its cells)."""
    cwd.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "specs" / "demo.toml", cwd / "demo.toml")
    for stage in stages if stages_from is not None else ():
        for entry in (stages_from / ".ablate-cache").glob(f"{stage}-*"):
            shutil.copytree(entry, cwd / ".ablate-cache" / entry.name)
    return cwd
