"""`ablate report` and `ablate clean`: find runs by name, re-render, compare, prune the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

from ablate import store
from ablate.errors import AblateError


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


def load_results(run_dir: Path) -> dict:
    try:
        return store.read_json(run_dir / "results.json")
    except ValueError as exc:
        raise AblateError(f"{run_dir / 'results.json'} is not valid JSON ({exc}); re-run the spec to rewrite it.") from exc


def report_command(args, console) -> int:
    from ablate.report import render_comparison, render_report

    runs_dir, reports_dir = Path(args.runs_dir), Path(args.reports_dir)
    main_dir = find_run(runs_dir, args.run)
    results = load_results(main_dir)
    if not args.compare:
        path = reports_dir / f"{results['name']}.md"
        render_report(results, main_dir, path)
        console.print(f"report: {path}")
        return 0
    others = [load_results(find_run(runs_dir, name)) for name in args.compare]
    path = reports_dir / f"{results['name']}-vs-{'-'.join(o['name'] for o in others)}.md"
    text = render_comparison([results, *others], path)
    console.print(text, markup=False, highlight=False)
    console.print(f"comparison report: {path}")
    return 0


def referenced_keys(runs_dir: Path) -> set[str]:
    keys = set()
    for run in Path(runs_dir).glob("*/results.json"):
        try:
            keys |= {st["key"] for st in store.read_json(run)["stages"].values() if st.get("key")}
        except (ValueError, KeyError):
            continue
    return keys


def clean_command(args, console) -> int:
    cache = Path(args.cache_dir)
    if not cache.is_dir():
        console.print(f"nothing to clean: {cache} does not exist")
        return 0
    keep = referenced_keys(Path(args.runs_dir))
    removed = 0
    for path in sorted(cache.iterdir()):
        key = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and key not in keep:
            console.print(f"{'would remove' if args.dry_run else 'removing'} {path}")
            if not args.dry_run:
                shutil.rmtree(path)
            removed += 1
    console.print(f"{removed} unreferenced artifact(s) {'found' if args.dry_run else 'removed'}; {len(keep)} referenced kept")
    return 0
