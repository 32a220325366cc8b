"""`ablate report` and `ablate clean`: find runs by name, re-render, compare, prune the cache."""

from __future__ import annotations

from pathlib import Path

from ablate.training import compile_cache

from ablate.pipeline import store
from ablate.errors import AblateError, InputError


def available_runs(runs_dir: Path) -> list[Path]:
    """Runs with a results.json, most recent first."""
    found = [p.parent for p in Path(runs_dir).glob("*/results.json")]
    return sorted(found, key=lambda p: (p / "results.json").stat().st_mtime, reverse=True)


def find_run(runs_dir: Path, name: str | None) -> Path:
    runs = available_runs(runs_dir)
    if not runs:
        raise AblateError(f"No finished runs in {runs_dir}/ (no */results.json). Run `ablate run SPEC` first, "
                          f"or pass --runs-dir.")
    if name is None:
        return runs[0]
    for run in runs:
        if run.name == name:
            return run
    raise AblateError(f"No run named {name!r} in {runs_dir}/. Available runs: {', '.join(r.name for r in runs)}.")


def report_command(args, console) -> int:
    from ablate.report.markdown import render_comparison, render_report
    from ablate.verdicts.schema import read_results

    runs_dir, reports_dir = Path(args.runs_dir), Path(args.reports_dir)
    other = getattr(args, "other", None)
    outer = getattr(args, "outer", False)
    if outer and not (args.run and other):
        raise InputError("--outer reads two runs: `ablate report RUN_A RUN_B --outer`, RUN_A the objective-axis (KL) "
                         "run (ZEB-139-like), RUN_B the teacher-axis run (ZEB-138-like).")
    if other and not outer:
        raise InputError(f"A second run ({other!r}) is read only with --outer; to set runs side by side use "
                         f"`ablate report {args.run} --compare {other}`.")
    main_dir = find_run(runs_dir, args.run)
    results = read_results(main_dir / "results.json")
    if outer:
        args.compare = [other, *[c for c in args.compare if c != other]]
    if not args.compare:
        path = reports_dir / f"{results['name']}.md"
        render_report(results, main_dir, path)
        console.print(f"report: {path}")
        return 0
    others = [read_results(find_run(runs_dir, name) / "results.json") for name in args.compare]
    path = reports_dir / f"{results['name']}-vs-{'-'.join(o['name'] for o in others)}.md"
    text = render_comparison([results, *others], path, outer=outer)
    console.print(text, markup=False, highlight=False)
    console.print(f"comparison report: {path}")
    return 0


def referenced_keys(runs_dir: Path) -> set[str]:
    """Cache keys some run uses: from its results.json, or (for a run still going or interrupted)
    the stages.json it writes as each stage is resolved."""
    keys = set()
    for run in sorted(p for p in Path(runs_dir).glob("*") if p.is_dir()):
        for name in ("results.json", store.STAGES_FILE):
            try:
                data = store.read_json(run / name)
                found = [st.get("key") for st in data["stages"].values()] if name == "results.json" else list(data.values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            keys |= {k for k in found if isinstance(k, str) and k}
    return keys


def active_runs(runs_dir: Path) -> list[str]:
    """Runs whose lock is held now, described by their holder."""
    active = []
    for lock_path in sorted(Path(runs_dir).glob(f"*/{store.RUN_LOCK}")):
        if store.is_locked(lock_path):
            owner = store.FileLock(lock_path).owner()
            active.append(f"{lock_path.parent.name} (pid {owner.get('pid', '?')})")
    return active


def clean_command(args, console) -> int:
    """Remove cache entries no run references and half-written entries of killed runs."""
    cache = Path(args.cache_dir)
    if not cache.is_dir():
        console.print(f"nothing to clean: {cache} does not exist")
        return 0
    active = active_runs(Path(args.runs_dir))
    if active:
        raise AblateError(f"Runs in progress: {', '.join(active)}. `ablate clean` cannot tell which cache entries "
                          f"they still need; run it after they finish.")
    keep = referenced_keys(Path(args.runs_dir))
    removed = 0
    for path in sorted(cache.iterdir()):
        if not path.is_dir() or path.name in (store.STAGE_LOCKS, compile_cache.DIR_NAME):
            continue
        half_written = path.name.startswith(".") and path.name.endswith(store.TEMP_SUFFIX)
        entry = path.name[1:].split(".", 1)[0] if half_written else path.name
        if (not half_written and entry.rsplit("-", 1)[-1] in keep) or store.is_locked(store.stage_lock_path(cache, entry)):
            continue
        what = "half-written " if half_written else ""
        console.print(f"{'would remove' if args.dry_run else 'removing'} {what}{path}")
        if not args.dry_run:
            store.remove_tree(path, cache)
        removed += 1
    console.print(f"{removed} unreferenced artifact(s) {'found' if args.dry_run else 'removed'}; {len(keep)} referenced kept")
    return 0
