"""The plugin contract: one hook per component kind, callback style.

A plugin module implements any of these with `@ablate.hookimpl` and calls `register(cls)` once
per component class (see ablate.api.components for the interfaces).
"""

import pluggy

hookspec = pluggy.HookspecMarker("ablate")
hookimpl = pluggy.HookimplMarker("ablate")


@hookspec
def ablate_corpora(register):
    """Register Corpus classes: register(MyCorpus)."""


@hookspec
def ablate_teachers(register):
    """Register Teacher classes: register(MyTeacher)."""


@hookspec
def ablate_objectives(register):
    """Register Objective classes: register(MyObjective)."""


@hookspec
def ablate_probes(register):
    """Register Probe classes: register(MyProbe)."""


@hookspec
def ablate_executors(register):
    """Register Executor classes (ablate.pipeline.executors.Executor): register(MyExecutor)."""


@hookspec
def ablate_loggers(register):
    """Register Logger classes (ablate.api.Logger; they receive the run's events): register(MyLogger)."""
