"""Wall time and peak accelerator memory of one piece of work (a stage, a cell).

Peak memory is read from the CUDA caching allocator after emptying its cache of unused blocks and
resetting its peak counters at entry, so it is the most this piece of work held at once (on top of
what earlier stages left resident), not the process's all-time peak; without emptying, the
reserved peak could not fall below what an earlier stage had cached. Blocks may nest (the cells
stage around each cell): before an inner block resets the counters, the peaks so far are folded
into every enclosing block, so an outer peak covers its inner blocks. Off CUDA the memory fields
stay None.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

GIB = 2**30


@dataclass
class Usage:
    seconds: float = 0.0
    peak_allocated: int | None = None  # bytes held by tensors at the peak
    peak_reserved: int | None = None  # bytes the allocator held from the driver at the peak

    def as_dict(self) -> dict[str, float | None]:
        """Seconds and peaks in GiB (None off CUDA), as recorded in results.json."""
        gib = lambda b: None if b is None else b / GIB  # noqa: E731
        return {"seconds": self.seconds, "peak_gpu_allocated_gib": gib(self.peak_allocated),
                "peak_gpu_reserved_gib": gib(self.peak_reserved)}


_open: list[Usage] = []  # CUDA blocks being measured, outermost first


def _fold_current_peaks(usages: list[Usage], device: torch.device) -> None:
    """Raise each usage's peaks to the allocator's peaks since the last reset."""
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    for u in usages:
        u.peak_allocated = max(u.peak_allocated or 0, allocated)
        u.peak_reserved = max(u.peak_reserved or 0, reserved)


@contextmanager
def measure(device: torch.device | str) -> Iterator[Usage]:
    """Fill a Usage with the block's wall time and, on CUDA, its peak memory (set on exit)."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    usage = Usage()
    if cuda:
        torch.cuda.synchronize(device)
        _fold_current_peaks(_open, device)  # the reset below would lose the enclosing blocks' peaks
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _open.append(usage)
    t0 = time.perf_counter()
    try:
        yield usage
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            _fold_current_peaks(_open, device)
            _open.remove(usage)
        usage.seconds = time.perf_counter() - t0


def rate(tokens: int | None, seconds: float | None) -> int | None:
    """Whole tokens per second, or None when nothing was processed or no time passed."""
    if not tokens or not seconds or seconds <= 0:
        return None
    return round(tokens / seconds)
