"""Hypothesis profiles: `ci` (set HYPOTHESIS_PROFILE=ci, as .ci/run does) draws the same examples
on every run, so CI passes or fails on the code alone; the default profile draws new ones."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
