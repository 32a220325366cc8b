"""The meter: wall time, and peak memory of nested blocks, against a fake allocator on the CPU
and the real CUDA allocator in the cuda tier."""

from __future__ import annotations

import pytest
import torch

from ablate.pipeline import meter

MIB = 2**20


class FakeAllocator:
    """A caching allocator in miniature: `alloc`/`free` move the bytes held by tensors; freed
    bytes stay reserved (cached) until `reset` empties the cache; peaks count since the last reset."""

    def __init__(self):
        self.allocated = self.reserved = 0
        self.max_allocated = self.max_reserved = 0
        self.syncs = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)
        self.max_allocated = max(self.max_allocated, self.allocated)
        self.max_reserved = max(self.max_reserved, self.reserved)

    def free(self, n: int) -> None:
        self.allocated -= n

    def synchronize(self) -> None:
        self.syncs += 1

    def peaks(self) -> tuple[int, int]:
        return self.max_allocated, self.max_reserved

    def reset(self) -> None:
        self.reserved = self.allocated
        self.max_allocated, self.max_reserved = self.allocated, self.reserved


def test_meter_times_the_block_and_leaves_memory_empty_off_cuda(monkeypatch):
    clock = iter([100.0, 102.5])  # perf_counter at entry and at exit
    monkeypatch.setattr(meter.time, "perf_counter", lambda: next(clock))
    with meter.measure("cpu") as use:
        pass
    assert use.seconds == 2.5
    assert use.as_dict() == {"seconds": use.seconds, "peak_gpu_allocated_gib": None, "peak_gpu_reserved_gib": None}
    assert meter.rate(1000, 4.0) == 250 and meter.rate(0, 4.0) is None and meter.rate(None, 1.0) is None


def test_three_nested_blocks_each_get_their_own_peak_when_the_innermost_raises():
    fake = FakeAllocator()
    fake.alloc(10 * MIB)  # resident before any block (e.g. a loaded backbone)
    with pytest.raises(RuntimeError, match="inside"):
        with meter.measure("cpu", fake) as outer:
            fake.alloc(5 * MIB)  # outer's own: 15 MiB held
            with meter.measure("cpu", fake) as middle:  # equal numbers to `outer` at this instant
                with meter.measure("cpu", fake) as inner:
                    fake.alloc(100 * MIB)  # 115 MiB held, only inside `inner`
                    fake.free(100 * MIB)
                    raise RuntimeError("inside the innermost block")
    assert meter._open == []  # nothing is left open, also after the exception
    assert inner.peak_allocated == 115 * MIB and inner.peak_reserved == 115 * MIB
    assert middle.peak_allocated == 115 * MIB  # an enclosing block covers its inner blocks
    assert outer.peak_allocated == 115 * MIB and outer.peak_reserved == 115 * MIB


def test_a_later_block_does_not_inherit_an_earlier_sibling_peak():
    fake = FakeAllocator()
    with meter.measure("cpu", fake) as outer:
        with meter.measure("cpu", fake) as first:
            fake.alloc(64 * MIB)
            fake.free(64 * MIB)
        with meter.measure("cpu", fake) as second:  # the first's cache was emptied at its entry
            fake.alloc(8 * MIB)
            fake.free(8 * MIB)
    assert first.peak_allocated == 64 * MIB and second.peak_allocated == 8 * MIB
    assert second.peak_reserved == 8 * MIB  # cache emptied: the 64 MiB no longer counts as reserved
    assert outer.peak_allocated == 64 * MIB and outer.peak_reserved == 64 * MIB
    assert meter._open == []


def test_a_failing_measurement_after_a_failed_block_keeps_the_block_error():
    class Broken(FakeAllocator):
        def synchronize(self):
            if self.syncs:
                raise RuntimeError("CUDA error: device-side assert triggered")
            super().synchronize()

    with pytest.raises(ValueError, match="the block's own"):
        with meter.measure("cpu", Broken()):
            raise ValueError("the block's own error")
    assert meter._open == []


@pytest.mark.cuda
def test_meter_peak_is_the_block_own_peak_on_cuda():
    big = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")  # 256 MiB, freed before the block
    del big
    with meter.measure("cuda") as use:
        x = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")  # 64 MiB held inside the block
        del x
    assert 64 * MIB <= use.peak_allocated < 256 * MIB
    assert use.peak_allocated <= use.peak_reserved < 256 * MIB  # the 256 MiB block's cache was emptied


@pytest.mark.cuda
def test_meter_nested_cuda_blocks_with_equal_numbers_and_an_exception():
    """The crash of a real CUDA run: two nested blocks whose numbers are equal at the inner exit."""
    with pytest.raises(RuntimeError):
        with meter.measure("cuda") as outer:
            with meter.measure("cuda") as middle:
                with meter.measure("cuda") as inner:
                    x = torch.empty(128 * MIB, dtype=torch.uint8, device="cuda")
                    del x
                    raise RuntimeError("inside")
    assert meter._open == []
    for block in (outer, middle, inner):
        assert block.peak_allocated >= 128 * MIB and block.peak_reserved >= block.peak_allocated
    with meter.measure("cuda") as outer:
        with meter.measure("cuda") as inner:
            pass
    assert meter._open == [] and outer.peak_allocated >= inner.peak_allocated
