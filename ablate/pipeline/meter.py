"""Wall time and peak accelerator memory of one piece of work (a stage, a cell).

Peak memory is read from the allocator after emptying its cache of unused blocks and resetting
its peak counters at entry, so it is the most this piece of work held at once (on top of what
earlier stages left resident), not the process's all-time peak; without emptying, the reserved
peak could not fall below what an earlier stage had cached. Blocks may nest (the cells stage
around each cell): before an inner block resets the counters, the peaks so far are folded into
every enclosing block, so an outer peak covers its inner blocks. Off CUDA the memory fields stay
None. The allocator is injectable (`Allocator`), so the nesting logic is tested on the CPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

GIB = 2**30


@dataclass(eq=False)  # blocks are told apart by identity: two blocks may hold equal numbers
class Usage:
    seconds: float = 0.0
    peak_allocated: int | None = None  # bytes held by tensors at the peak
    peak_reserved: int | None = None  # bytes the allocator held from the driver at the peak

    def as_dict(self) -> dict[str, float | None]:
        """Seconds and peaks in GiB (None off CUDA), as recorded in results.json."""
        gib = lambda b: None if b is None else b / GIB  # noqa: E731
        return {"seconds": self.seconds, "peak_gpu_allocated_gib": gib(self.peak_allocated),
                "peak_gpu_reserved_gib": gib(self.peak_reserved)}


class Allocator(Protocol):
    """The counters `measure` reads: peaks since the last reset, in bytes."""

    def synchronize(self) -> None: ...
    def peaks(self) -> tuple[int, int]: ...  # (max allocated, max reserved) since the last reset
    def reset(self) -> None: ...  # empty the cache of unused blocks, then reset the peak counters


class CudaAllocator:
    """torch's CUDA caching allocator of one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def peaks(self) -> tuple[int, int]:
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    def reset(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)


_open: list[Usage] = []  # blocks being measured, outermost first


def _fold_peaks(allocator: Allocator) -> None:
    """Raise every open block's peaks to the allocator's peaks since the last reset."""
    allocated, reserved = allocator.peaks()
    for u in _open:
        u.peak_allocated = max(u.peak_allocated or 0, allocated)
        u.peak_reserved = max(u.peak_reserved or 0, reserved)


def default_allocator(device: torch.device | str) -> Allocator | None:
    """The CUDA allocator of `device`, or None where there is nothing to measure."""
    device = torch.device(device)
    return CudaAllocator(device) if device.type == "cuda" and torch.cuda.is_available() else None


@contextmanager
def measure(device: torch.device | str, allocator: Allocator | None = None) -> Iterator[Usage]:
    """Fill a Usage with the block's wall time and, with an allocator (on CUDA by default), its
    peak memory (set on exit, also when the block raises)."""
    allocator = allocator or default_allocator(device)
    usage = Usage()
    if allocator is not None:
        allocator.synchronize()
        _fold_peaks(allocator)  # the reset below would lose the enclosing blocks' peaks
        allocator.reset()
        _open.append(usage)
    t0 = time.perf_counter()
    finished = False
    try:
        yield usage
        finished = True
    finally:
        try:
            if allocator is not None:
                allocator.synchronize()
                _fold_peaks(allocator)
        except Exception:
            if finished:  # after a failed block, the block's own error is the one to report
                raise
        finally:
            if allocator is not None:
                del _open[next(i for i, u in enumerate(_open) if u is usage)]
            usage.seconds = time.perf_counter() - t0


def rate(tokens: int | None, seconds: float | None) -> int | None:
    """Whole tokens per second, or None when nothing was processed or no time passed."""
    if not tokens or not seconds or seconds <= 0:
        return None
    return round(tokens / seconds)
