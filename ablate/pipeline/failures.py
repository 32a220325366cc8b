"""What a run does when it cannot finish: one paragraph for an unexpected exception (where it
happened, what is kept, the command that resumes) with the traceback in runs/<name>/logs/, and a
STALE banner on a report the run could not replace. `ctx` is the run's Experiment."""

from __future__ import annotations

import time
import traceback

import torch

from ablate.pipeline import store
from ablate.errors import RunFailed


def crash(ctx, exc: Exception) -> RunFailed:
    """The paragraph for an unexpected exception: where, what is kept, how to resume; the
    traceback goes to runs/<name>/logs/."""
    log = ctx.paths.run_dir / "logs" / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"while {ctx.activity}\n{ctx.command}\n\n"
                   + "".join(traceback.format_exception(exc)))
    done = [n for n in (c.name for c in ctx.spec.cells) if store.is_done(ctx.paths.run_dir / "cells" / n)]
    stages_kept = [n for n, r in ctx.stage_results.items() if r.key]
    kept = (f"stages kept in the cache: {', '.join(stages_kept) or 'none'}; finished cells kept: "
            f"{', '.join(done) or 'none'} (a cell that was training keeps its last checkpoint)")
    return RunFailed(
        f"ablate run {ctx.spec.name!r} stopped with an unexpected {type(exc).__name__} while {ctx.activity}: "
        f"{str(exc).strip() or '(no message)'}. {hint(exc)}{kept}. The traceback is in {log} (or rerun with --debug). "
        f"After fixing the cause, resume with: {ctx.command or 'the same ablate run command'}", str(log))

def mark_report_stale(ctx, why: str) -> None:
    """Put a banner at the top of an existing report this run could not replace."""
    from ablate.report.markdown import mark_stale

    try:
        mark_stale(ctx.paths.report, f"The run of {time.strftime('%Y-%m-%d %H:%M')} could not replace "
                                      f"this report: {why}. Its numbers are from an earlier run.")
    except OSError as exc:
        ctx.ui.warn(f"could not mark {ctx.paths.report} as stale ({exc})")


def hint(exc: Exception) -> str:
    """A sentence on the likely fix of a known kind of failure, else ''."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return ("The GPU ran out of memory: lower train.batch or train.seq_len (or oracle.batch), or free the GPU "
                "of other processes. ")
    if "CUDA" in text or "cuda" in text:
        return ("A CUDA error leaves the process's GPU state unusable; the next run starts a fresh process. "
                "Rerun with CUDA_LAUNCH_BLOCKING=1 to find the failing kernel if it repeats. ")
    return ""
