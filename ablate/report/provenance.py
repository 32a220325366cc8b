"""Where a run came from: code revision, package and plugin versions, device, command, timings."""

from __future__ import annotations

import importlib.metadata
import subprocess
import time
from pathlib import Path

import torch

PACKAGES = ("ablate", "torch", "transformers", "safetensors", "pydantic", "pluggy", "rich", "xxhash", "tokenizers")


def git_state(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(sha, dirty) of the checkout holding the ablate package, or (None, None) outside git."""
    where = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10)
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def collect(registry, device, seed, command, t_start, stage_seconds) -> dict:
    sha, dirty = git_state()
    plugins = {f"{kind}:{name}": reg.source for kind, comps in registry.components.items() for name, reg in comps.items()}
    return {"git_sha": sha, "git_dirty": dirty, "versions": versions(), "plugins": plugins,
            "broken_plugins": dict(registry.broken), "device": str(device), "device_name": device_name(device),
            "seed": seed, "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
            "wall_seconds": time.time() - t_start, "stage_seconds": stage_seconds,
            "torch_threads": torch.get_num_threads()}
