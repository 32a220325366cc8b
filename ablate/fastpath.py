"""Where torch.compile runs: on CUDA, unless the environment sets ABLATE_COMPILE=0.

Every compiled function is also a plain function: on the CPU, or with compilation off, the
same code runs eagerly, which is what the CPU tests compare the compiled graphs against.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

BACKEND = "inductor"  # tests switch this to "aot_eager" to trace on the CPU without codegen


def enabled_for(device: torch.device | str) -> bool:
    """True when code on `device` should run through torch.compile."""
    return torch.device(device).type == "cuda" and os.environ.get("ABLATE_COMPILE", "1") != "0"


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """torch.compile(fn) with static shapes and the current BACKEND."""
    return torch.compile(fn, dynamic=False, backend=BACKEND, **kwargs)


def dispatch_compiled(fn: Callable) -> Callable:
    """fn(tensor, ...) that runs compiled when `tensor` (the first argument) lives where
    `enabled_for` says so, and eagerly otherwise. Compiled once, on first use."""
    compiled: dict[str, Callable] = {}

    def run(first: torch.Tensor, *args, **kwargs):
        if not enabled_for(first.device):
            return fn(first, *args, **kwargs)
        if BACKEND not in compiled:
            compiled[BACKEND] = compile_fn(fn)
        return compiled[BACKEND](first, *args, **kwargs)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    run.eager = fn
    return run
