"""Test-session settings.

- Hypothesis profiles: `ci` (set HYPOTHESIS_PROFILE=ci, as .ci/run does) draws the same examples
  on every run, so CI passes or fails on the code alone; the default profile draws new ones.
- One torch thread: on a busy 2-core machine torch's default threads slow an end-to-end test
  many-fold (measured: 323 s with default threads, 16.7 s with one).
- Tests marked `cuda` form the CUDA tier: they run where torch sees a GPU (scripts/gpu-check.sh)
  and are skipped elsewhere.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda tier: torch sees no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
