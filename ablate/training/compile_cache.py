"""torch.compile's caches kept in ablate's cache directory.

Compiling the cells' graphs costs about two minutes on a machine whose compiler caches are empty
(docs/performance.md). After a run that compiled, the compiler's artifacts are saved to
`<cache>/compile/<torch version>-<GPU name>/<content hash>.bin`; a later run loads every file
there before its cells, so a fresh machine that shares the cache directory starts warm. The
artifacts are only caches: torch checks every entry's key, so a stale or foreign file costs
nothing but a miss, and an unreadable one is reported and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable

import torch

from ablate.pipeline import store

DIR_NAME = "compile"  # under the cache directory; `ablate clean` leaves it alone


def artifact_dir(cache: Path, device: torch.device) -> Path:
    """Where the artifacts for this torch build and this GPU model live."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{torch.__version__}-{name}").strip("-")
    return cache / DIR_NAME / slug


def _keys(info) -> set[tuple[str, str]]:
    """(artifact type, key) pairs of a torch CacheInfo."""
    return {(kind, key) for kind, keys in (info.artifacts if info is not None else {}).items() for key in keys}


def load(directory: Path, warn: Callable[[str], None]) -> tuple[int, set[tuple[str, str]]]:
    """Load every saved artifact file into torch's caches → (bytes loaded, keys loaded)."""
    loaded, keys = 0, set()
    for path in sorted(directory.glob("*.bin")):
        data = path.read_bytes()
        torch_log = logging.getLogger("torch.compiler._cache")  # logs a traceback for a bad file
        level, torch_log.level = torch_log.level, logging.CRITICAL
        try:
            info = torch.compiler.load_cache_artifacts(data)  # None when the bytes cannot be read
        except Exception:  # a cache: failing to read one only means compiling that part again
            info = None
        finally:
            torch_log.setLevel(level)
        if info is None:
            warn(f"could not read the compile cache {path}; those graphs are compiled from scratch. "
                 f"Delete the file to silence this.")
            continue
        keys |= _keys(info)
        loaded += len(data)
    return loaded, keys


def save(directory: Path, known: set[tuple[str, str]]) -> int:
    """Save this process's compiler artifacts, named by their content hash, when they hold a key
    not in `known` (what was loaded); returns the bytes written (0: nothing new)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0] or _keys(saved[1]) <= known:
        return 0
    data = saved[0]
    directory.mkdir(parents=True, exist_ok=True)
    store.write_atomic(directory / f"{hashlib.sha256(data).hexdigest()[:16]}.bin", data)
    return len(data)
