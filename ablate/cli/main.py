"""The `ablate` command: argument parsing, rich output and exit codes (0 ok, 1 a cell failed or an
expectation was not met, 2 bad input, 130 interrupted). No computation lives here."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ablate.errors import AblateError, RunFailed

console = Console()
err_console = Console(stderr=True)


def _common(p: argparse.ArgumentParser, spec: bool = True) -> None:
    if spec:
        p.add_argument("spec", help="path to the experiment spec (TOML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec value, type-checked (repeatable), e.g. --set train.steps=50")
        p.add_argument("--profile", help="apply a [profiles.NAME] block of the spec, e.g. smoke")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py",
                   help="load hook implementations from a local Python file (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _memory_budget(text: str) -> int:
    from ablate.pipeline.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", type=_memory_budget, default=None, metavar="SIZE",
                   help="the GPU memory of the card you plan to use, e.g. 16GiB: refuse a spec whose estimated "
                        "peak does not fit it (default: the device's own memory; with --device cpu, host memory); "
                        "`run` on CUDA also holds its own process to it (torch.cuda.set_per_process_memory_fraction)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ablate", description="Ablation experiments on memory-augmented language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run (or resume) an experiment")
    _common(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fresh", action="store_true", help="recompute every stage and cell of this spec")
    p.add_argument("--executor", metavar="NAME", help="who runs the cells (default: the spec's [executor], else local)")
    p.add_argument("--address", metavar="auto|HOST:PORT", help="--executor ray: the Ray cluster to use (default: "
                   "start a local Ray over this machine's GPUs)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that failed in an earlier run "
                   "(a rerun skips them by default)")
    p.add_argument("--logger", dest="loggers", action="append", default=[], metavar="NAME",
                   help="send the run's events to this logger too, e.g. tensorboard (repeatable; joins [loggers] use)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _budget(p)

    p = sub.add_parser("status", help="every cell of a run: pending, running (heartbeat), interrupted, done, failed")
    p.add_argument("run", help="run name (the spec's name)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("validate", help="check a spec and its plugins without running anything")
    _common(p)
    _budget(p)

    p = sub.add_parser("plan", help="list every stage and cell with its cache key and what would run")
    _common(p)
    p.add_argument("--retry-failed", action="store_true", help="plan as `ablate run --retry-failed` would run")
    _budget(p)

    p = sub.add_parser("plugins", help="list the installed plugins and their components")
    _common(p, spec=False)

    p = sub.add_parser("report", help="re-render a run's report from results.json, optionally beside other runs")
    p.add_argument("run", nargs="?", help="run name (default: the most recent run)")
    p.add_argument("other", nargs="?", help="with --outer: the teacher-axis run (RUN is the objective-axis, KL run)")
    p.add_argument("--compare", action="append", default=[], metavar="OTHER", help="another run to set beside it")
    p.add_argument("--outer", action="store_true",
                   help="fill the outer objective × teacher 2×2 (reference §7.4) from RUN and OTHER and state its reading")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--reports-dir", default="reports")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("bench", help="time ablate's cell step and oracle pass against plain baselines")
    p.add_argument("--size", default="full", choices=["full", "small"], help="full = ZEB-139 dimensions")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--out", default="bench.json", help="where to write the JSON results")
    p.add_argument("--skip-oracle", action="store_true", help="do not time the oracle pass")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("clean", help="remove cached artifacts no run references")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--cache-dir", default=".ablate-cache")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("convert-checkpoint", help="import a reference checkpoint.pt / model_step_N.safetensors "
                       "as ablate's backbone safetensors (nothing in the file is executed)")
    p.add_argument("src", help="the reference's checkpoint.pt or model_step_N.safetensors (format detected)")
    p.add_argument("dst", help="where to write ablate's backbone .safetensors")
    p.add_argument("--spec", help="take the architecture from this spec's [backbone] (needed when SRC stores no "
                   "config; checked against the stored config otherwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of --spec (repeatable)")
    p.add_argument("--profile", help="apply a [profiles.NAME] block of --spec")
    _common(p, spec=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except AblateError as exc:
        if args.debug:
            traceback.print_exception(exc.__cause__ if isinstance(exc, RunFailed) and exc.__cause__ else exc)
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # never a raw traceback: one paragraph, the traceback in a log file
        if args.debug:
            traceback.print_exc()
        log = crash_log(args.command, exc)
        err_console.print(f"[bold red]error:[/] {escape(unexpected_message(args.command, exc, log))}",
                          highlight=False, soft_wrap=True)
        return 1


def crash_log(command: str, exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected exception to a file in the temp directory."""
    log = Path(tempfile.gettempdir()) / f"ablate-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text(" ".join(sys.argv) + "\n\n" + "".join(traceback.format_exception(exc)))
    except OSError:
        return None
    return log


def unexpected_message(command: str, exc: BaseException, log: Path | None) -> str:
    where = f"The traceback is in {log}" if log else "The traceback could not be written to a file"
    return (f"ablate {command} failed with an unexpected {type(exc).__name__}: {str(exc).strip() or '(no message)'}. "
            f"Nothing it had finished is lost (runs and cached stages are written atomically). {where}; rerun "
            f"with --debug to see it here. If the cause is not in your spec or files, it is a bug in ablate or a "
            f"plugin: report it with that traceback.")


def _registry(args):
    from ablate.api.plugins import load_registry

    return load_registry(args.plugins)


def _load(args, registry):
    from ablate.config.spec import load_spec

    return load_spec(args.spec, args.overrides, args.profile, registry, getattr(args, "loggers", ()))


def cmd_validate(args) -> int:
    from ablate.pipeline import memory

    registry = _registry(args)
    spec = _load(args, registry)
    # where `ablate run` would run by default (or the card of --memory-budget): refuse what cannot fit
    memory.check(spec, memory.limit_for(None, args.memory_budget), registry, args.spec)
    console.print(f"[green]✓[/] {args.spec}: spec {spec.name!r} is valid — {len(spec.cells)} cells, "
                  f"{len(spec.thresholds)} thresholds; plugins: corpus {spec.corpus.plugin}, teacher {spec.teacher.plugin}, "
                  f"objectives {', '.join(sorted({c.objective.name for c in spec.cells}))}")
    return 0


def cmd_plugins(args) -> int:
    registry = _registry(args)
    table = Table(title="ablate plugins")
    for col in ("kind", "name", "provided by", "parameters", "description"):
        table.add_column(col)
    for kind, comps in registry.components.items():
        for name in sorted(comps):
            reg = comps[name]
            table.add_row(kind, name, reg.source, ", ".join(reg.cls.Params.model_fields) or "—", reg.cls.description)
    console.print(table)
    for src, why in registry.broken.items():
        console.print(f"[yellow]broken plugin[/] {escape(src)}: {escape(why)} (not loaded; specs that "
                      f"need its components fail)", soft_wrap=True)
    for kind, name in registry.conflicts:
        console.print(f"[red]conflict[/] {escape(registry.conflict_message(kind, name))}", soft_wrap=True)
    return 0


def cmd_plan(args) -> int:
    from ablate.pipeline.engine import Experiment, resolve_device
    from ablate.pipeline.ui import QuietUI

    registry = _registry(args)
    spec = _load(args, registry)
    exp = Experiment(spec, registry, resolve_device("cpu"), QuietUI())
    exp.retry_failed = args.retry_failed
    exp.memory_check = False  # plan prints the estimate instead of refusing
    print_memory_plan(spec, registry, args.memory_budget)
    table = Table(title=f"plan for {spec.name}")
    for col in ("stage / cell", "key", "status"):
        table.add_column(col)
    for row in exp.plan():
        table.add_row(row["name"], row["key"], row["status"])
    console.print(table)
    console.print(compile_decision(spec))
    console.print(escape(fuse_decision(spec)))
    return 0


def print_memory_plan(spec, registry, budget: int | None) -> None:
    from ablate.pipeline.planning import memory_plan

    rows, lines = memory_plan(spec, registry, budget)
    table = Table(title=f"estimated peak memory of {spec.name} on CUDA (GiB)")
    for col in ("stage", "host GiB", "GPU GiB", "largest part (GiB)"):
        table.add_column(col, justify="left" if col in ("stage", "largest part (GiB)") else "right")
    for row in rows:
        table.add_row(row["stage"], f"{row['host_gib']:,.2f}",
                      "—" if row["gpu_gib"] is None else f"{row['gpu_gib']:,.2f}", row["largest"])
    console.print(table)
    for line in lines:
        console.print(escape(line), soft_wrap=True)


def compile_decision(spec) -> str:
    """One line: whether the cells would be compiled on CUDA, and why (train.compile)."""
    from ablate.training.cells import COMPILE_MIN_STEPS, compile_cells

    compiled = compile_cells(spec)
    why = (f'train.compile = "auto": {spec.train.steps * len(spec.cells)} steps over all cells '
           f"{'≥' if compiled else '<'} {COMPILE_MIN_STEPS}"
           if spec.train.compile == "auto" else f'train.compile = "{spec.train.compile}"')
    return f"on CUDA the cells would run {'compiled' if compiled else 'eager'} ({why}); on the CPU they always run eager"


def fuse_decision(spec) -> str:
    """One line: which cells would train as fused groups on CUDA and on the CPU, and why (train.fuse)."""
    from ablate.pipeline.memory import fused_groups

    def groups(device_type: str) -> str:
        found = fused_groups(spec, device_type)
        return (", ".join(f"[{', '.join(c.name for c in g)}]" for g in found) + " as fused group" + "s" * (len(found) > 1)
                if found else "every cell on its own")

    why = {"auto": 'train.fuse = "auto": fused on CUDA when the cells compile, under numerics "ablate"',
           "on": 'train.fuse = "on"', "off": 'train.fuse = "off"'}[spec.train.fuse]
    if spec.executor.plugin != "local":
        why += f"; the {spec.executor.plugin} executor never fuses"
    return f"on CUDA: {groups('cuda')}; on the CPU: {groups('cpu')} ({why})"


def cmd_run(args) -> int:
    from ablate.pipeline.engine import Experiment, Interrupted, resolve_device
    from ablate.verdicts.results import exit_code
    from ablate.pipeline.ui import QuietUI, RichUI

    registry = _registry(args)
    if args.executor:
        args.overrides = [*args.overrides, f'executor.plugin="{args.executor}"']
    if args.address:
        args.overrides = [*args.overrides, f'executor.address="{args.address}"']
    spec = _load(args, registry)
    device = resolve_device(args.device)
    ui = QuietUI() if args.quiet else RichUI(err_console)
    command = "ablate " + " ".join(shlex.quote(a) for a in args.argv)
    exp = Experiment(spec, registry, device, ui, command=command, fresh=args.fresh)
    exp.retry_failed = args.retry_failed  # read by cell_job.cell_jobs
    exp.memory_budget = args.memory_budget  # read by memory.check_run (preflight)
    if device.type == "cuda" and args.memory_budget is not None:
        from ablate.pipeline import memory

        fraction = memory.cap_cuda(device, args.memory_budget)
        console.print(f"GPU memory held to --memory-budget {memory.fmt_gib(args.memory_budget)} GiB "
                      f"({fraction:.1%} of the card) in this process")
    console.print(f"[bold]ablate run[/] {spec.name} on {device} — {len(spec.cells)} cells")
    try:
        results = exp.run()
    except Interrupted:
        err_console.print(f"[yellow]Interrupted.[/] Finished stages and cells are kept; the running cell saved its "
                          f"state. Resume with: [bold]{command}[/]")
        return 130
    print_summary(results, exp)
    return exit_code(results)


def print_summary(results: dict, exp) -> None:
    from ablate.verdicts.verdict import fmt

    stages = Table(title="stages")
    gpu = any(st.get("peak_gpu_allocated_gib") is not None for st in results["stages"].values())
    for col in ("stage", "status", "seconds", "tokens/s", *(["peak GPU GiB"] if gpu else []), "key"):
        stages.add_column(col)
    for name, st in results["stages"].items():
        rate = f"{st['tokens_per_s']:,}" if st.get("tokens_per_s") else "—"
        peak = [f"{st['peak_gpu_allocated_gib']:.2f}"] if gpu else []
        stages.add_row(name, "cached" if st["cached"] else "computed", f"{st['seconds']:.1f}", rate, *peak, st["key"])
    console.print(stages)

    cells = Table(title="cells")
    for col in ("cell", "router", "oracle", "objective", "status", "val_loss", "seconds"):
        cells.add_column(col)
    for name, c in results["cells"].items():
        val = c["metrics"].get("val_loss")
        status = c["status"] + (" (cached)" if c.get("cached") else "")
        if c.get("error"):
            status += f": {c['error']}"
        cells.add_row(name, "on" if c["config"]["router"] else "off", c["config"]["oracle"], c["config"]["objective"]["name"],
                      status, fmt(val) if val is not None else "—", f"{c['seconds']:.1f}" if c.get("seconds") else "—")
    console.print(cells)
    failed = [n for n, c in results["cells"].items() if c["status"] == "failed"]
    if failed:
        console.print(f"  failed cells ({', '.join(failed)}) are skipped when this run is repeated; add "
                      f"[bold]--retry-failed[/] to rerun them")

    if results["thresholds"]:
        verdicts = Table(title="verdicts")
        for col in ("threshold", "cell", "metric", "value", "verdict"):
            verdicts.add_column(col)
        for t in results["thresholds"]:
            colour = {"BREAK": "red", "HOLD": "green"}.get(t["verdict"], "yellow")
            value = "—" if t["value"] is None else fmt(t["value"])
            verdicts.add_row(t["name"], t["cell"], t["metric"], value, f"[{colour}]{t['verdict']}[/]")
        console.print(verdicts)
    for cell, comb in results["combination"].items():
        console.print(f"  {cell}: {comb['crossed']}/{comb['total']} thresholds crossed → [bold]{comb['label']}[/]")
    for d in results["discriminator"]:
        console.print(f"  discriminator {d['real']} vs {d['shuffled']}: [bold]{d['outcome']}[/] — {d['meaning']}")
    for f in results.get("failed_probes", []):
        console.print(f"  [red]probe {f['probe']} failed[/] on {', '.join(f['cells'])} ({escape(f['source'])}): "
                      f"{escape(f['error'])}")
    for e in results.get("expectations", []):
        mark = "[green]✓[/]" if e["met"] else "[red]✗[/]"
        console.print(f"  expect {mark} {e['what']}: expected {e['expected']}, got {e['got']}")
    console.print(f"results: {exp.paths.run_dir / 'results.json'}   report: {exp.paths.report}")


def cmd_status(args) -> int:
    from ablate.pipeline.ray_executor import status_command

    return status_command(args, console)


def cmd_report(args) -> int:
    from ablate.cli.report_cli import report_command

    return report_command(args, console)


def cmd_bench(args) -> int:
    from ablate.training.bench import bench_command

    return bench_command(args, console)


def cmd_clean(args) -> int:
    from ablate.cli.report_cli import clean_command

    return clean_command(args, console)


def cmd_convert_checkpoint(args) -> int:
    from ablate.model.reference_import import convert_command

    return convert_command(args, console)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan, "plugins": cmd_plugins,
            "report": cmd_report, "status": cmd_status, "clean": cmd_clean, "bench": cmd_bench,
            "convert-checkpoint": cmd_convert_checkpoint}


if __name__ == "__main__":
    sys.exit(main())
