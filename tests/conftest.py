"""Test-session settings.

- Hypothesis profiles: `ci` (set HYPOTHESIS_PROFILE=ci, as .ci/run does) draws the same examples
  on every run, so CI passes or fails on the code alone; the default profile draws new ones.
- One torch thread, here and in every subprocess (OMP_NUM_THREADS=1): on a busy 2-core machine
  torch's default threads slow an end-to-end test many-fold (measured: 323 s with default
  threads, 16.7 s with one); the suite runs in parallel over the cores instead (pytest-xdist,
  one worker per core; files marked `seconds(n)` start longest first).
- Tests marked `cuda` form the CUDA tier: they run where torch sees a GPU (scripts/gpu-check.sh)
  and are skipped elsewhere.
"""

import os

# Every process a test starts (`ablate` subprocesses, pip, Ray workers) inherits one thread too.
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from cli_run import MICRO_DEMO, ablate_in, demo_dir  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Longest files first: under pytest-xdist (`-n auto --dist loadfile --no-loadscope-reorder`, the
    # README's command) each file goes to one worker in collection order, and a long file started
    # last would run alone at the end. `seconds(n)` marks a file's (or test's) cost on one core.
    items.sort(key=lambda item: -max((m.args[0] for m in item.iter_markers("seconds")), default=0))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda tier: torch sees no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def micro_stages(tmp_path_factory):
    """A directory whose cache holds the micro demo's corpus, backbone, teacher and oracle, built
    once per test process (one run of 1 step per cell); tests of what happens from the cells on
    start there (cli_run.demo_dir) instead of rebuilding the same stages."""
    cwd = demo_dir(tmp_path_factory.mktemp("micro-stages"))
    with pytest.MonkeyPatch.context() as mp:
        assert ablate_in(cwd, mp, "run", *MICRO_DEMO, "--set", "train.steps=1", "--device", "cpu", "--quiet") == 0
    return cwd
