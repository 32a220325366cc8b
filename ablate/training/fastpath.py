"""Where torch.compile runs: on CUDA, unless the environment sets ABLATE_COMPILE=0
(ABLATE_CUDA_GRAPHS=0 keeps compilation but replays no CUDA graphs).

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


def _configure() -> None:
    """Pad matrix products to aligned shapes (the reference FFN width 1365 otherwise selects
    unaligned bf16 GEMM kernels) and allow one compiled graph per cell, train and eval."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.force_shape_pad = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))


def compile_fn(fn: Callable, cuda_graphs: bool = False) -> Callable:
    """torch.compile(fn) with static shapes and the current BACKEND; with cuda_graphs (and the
    inductor backend) its graphs are also replayed as CUDA graphs ("reduce-overhead"), which
    removes the per-kernel launch cost from the host. Callers mark each training step with
    `step_begin()`."""
    _configure()
    if cuda_graphs and BACKEND == "inductor" and os.environ.get("ABLATE_CUDA_GRAPHS", "1") != "0":
        return torch.compile(fn, dynamic=False, mode="reduce-overhead")
    return torch.compile(fn, dynamic=False, backend=BACKEND)


def step_begin() -> None:
    """Tell the CUDA-graph replays that a new iteration starts (outputs of the previous one
    may be overwritten from here on)."""
    torch.compiler.cudagraph_mark_step_begin()


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
