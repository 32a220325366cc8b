"""The plugin surface: everything a corpus, teacher, objective, probe, executor or logger plugin
may import from ablate. The built-in plugins (plugins/ablate_builtins) import nothing else from
ablate; a third-party plugin that does the same keeps working across ablate's internal refactors.

    from ablate.api import CellView, Metric, Probe, hookimpl
"""

from ablate.training import losses
from ablate.api.components import (METRIC_ROLES, CellView, Component, Corpus, InjectionTrace, LoadedTeacher, Metric,
                               MetricTable, NoParams, Objective, ObjectiveBatch, ObjectiveContext, ObjectiveResult,
                               Params, Probe, Progress, RouterState, StudentView, Teacher, TeacherContext,
                               TokenCorpus, Trace, no_progress)
from ablate.errors import AblateError, InputError, SpecError
from ablate.api.hookspecs import hookimpl
from ablate.training.lm_pretrain import evaluate, pretrain_lm, validation_windows
from ablate.training.losses import cross_entropy, jsd_rows, kl_rows, masked_mean
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.checkpoint import CONFIG_KEY as BACKBONE_CONFIG_KEY
from ablate.model.checkpoint import load_backbone, save_backbone
from ablate.model.logits import LinearLogits, as_tensor
from ablate.oracle.build import gaussian_twin

__all__ = [
    # registration and parameters
    "hookimpl", "Params", "NoParams", "Component", "Progress", "no_progress",
    # corpora and teachers
    "Corpus", "TokenCorpus", "Teacher", "LoadedTeacher", "TeacherContext",
    "Backbone", "BackboneConfig", "BACKBONE_CONFIG_KEY", "load_backbone", "save_backbone",
    "pretrain_lm", "evaluate", "validation_windows",
    # objectives
    "Objective", "ObjectiveBatch", "ObjectiveResult", "ObjectiveContext",
    "losses", "cross_entropy", "kl_rows", "jsd_rows", "masked_mean", "LinearLogits", "as_tensor",
    # probes
    "Probe", "CellView", "StudentView", "Trace", "InjectionTrace", "RouterState", "Metric", "MetricTable",
    "METRIC_ROLES", "gaussian_twin",
    # executors (loaded on first use: they import the pipeline, which imports this package)
    "Executor", "LocalExecutor", "RayExecutor", "CellJob",
    # loggers and the run events they receive (ablate.pipeline.events; loaded on first use too)
    "Logger", "Event", "RunStarted", "StageFinished", "CellStarted", "StepLogged", "CellEvaluated", "CellFinished",
    "CellFailed", "ProbesFinished", "Verdicts",
    # errors
    "AblateError", "InputError", "SpecError",
]

_LAZY = {"Executor": "ablate.pipeline.executors", "LocalExecutor": "ablate.pipeline.executors",
              "RayExecutor": "ablate.pipeline.ray_executor", "CellJob": "ablate.pipeline.cell_job",
              **dict.fromkeys(("Logger", "Event", "RunStarted", "StageFinished", "CellStarted", "StepLogged",
                               "CellEvaluated", "CellFinished", "CellFailed", "ProbesFinished", "Verdicts"),
                              "ablate.pipeline.events")}


def __getattr__(name: str):
    """The executor and logger kinds' classes, imported when a plugin first asks for them."""
    if name not in _LAZY:
        raise AttributeError(f"module 'ablate.api' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
