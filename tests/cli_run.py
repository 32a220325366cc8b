"""`ablate ARGS` run in this test process, as a user would type it in a directory."""

from __future__ import annotations

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
