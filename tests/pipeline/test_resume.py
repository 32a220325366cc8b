"""Nothing lost: a demo run killed (SIGKILL) or stopped (SIGINT/SIGTERM) at any point resumes to the
same results as an uninterrupted run; a truncated artifact recomputes only what depends on it;
`ablate plan` tells what is cached; `--fresh` recomputes.

Every run uses the demo spec's `tiny` profile (10 training steps per cell, a checkpoint every 5)
on the CPU with one thread (OMP_NUM_THREADS=1), so
runs are deterministic and their results comparable bit for bit. "Results equal" compares
everything a run computes (cell metrics, evaluations, training logs, thresholds, verdicts, stage
keys, teacher and oracle statistics) and leaves out timings, provenance and cached flags.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ablate.pipeline import store
from cli_run import STAGES, ablate_in, demo_dir

ROOT = Path(__file__).resolve().parents[2]
ABLATE = shutil.which("ablate") or str(Path(sys.executable).with_name("ablate"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# train.fuse=off: these kill points are between and inside cells trained one after the other
# (tests/training/test_fused.py kills and resumes a fused group)
SPEC_ARGS = ["demo.toml", "--profile", "tiny", "--set", "train.steps=10", "--set", "train.checkpoint_every=5",
             "--set", "train.fuse=off"]
ARGS = [*SPEC_ARGS, "--device", "cpu"]
CELLS = ("router_off_real", "router_off_shuf", "router_on_real", "router_on_shuf")
TIMING = {"dt_ms", "tokens_per_s", "seconds"}

pytestmark = [pytest.mark.slow, pytest.mark.seconds(100)]


# ----------------------------------------------------------------------------------- helpers


def run_ablate(cwd: Path, *extra: str, quiet: bool = True) -> subprocess.CompletedProcess:
    args = [ABLATE, "run", *ARGS, *(["--quiet"] if quiet else []), *extra]
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def start_ablate(cwd: Path) -> subprocess.Popen:
    """A background `ablate run` in its own process group (so a kill reaches all of it)."""
    return subprocess.Popen([ABLATE, "run", *ARGS, "--quiet"], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """Poll every 5 ms until ready() holds; fail if the run ends first."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point\n{out}\n{err}")
        if time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("kill point never reached")
        time.sleep(0.005)


def sigkill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def results_of(cwd: Path) -> dict:
    return json.loads((cwd / "runs" / "demo" / "results.json").read_text())


def comparable(results: dict) -> dict:
    """What a run computed, without timings, provenance or cached flags."""
    def untimed(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in TIMING}

    cells = {name: {"status": c["status"], "metrics": c["metrics"], "evals": c["evals"],
                    "history": [untimed(row) for row in c["history"]]} for name, c in results["cells"].items()}
    return {"cells": cells, "pairs": results["pairs"], "thresholds": results["thresholds"],
            "combination": results["combination"], "discriminator": results["discriminator"],
            "keys": {n: s["key"] for n, s in results["stages"].items()},
            "teacher": results["teacher"], "oracle": untimed(results["oracle"])}


def recomputed(results: dict) -> set[str]:
    """Stages and cells this run computed rather than reused."""
    return ({n for n in STAGES if not results["stages"][n]["cached"]}
            | {n for n, c in results["cells"].items() if not c["cached"]}
            | ({"probes"} if not results["stages"]["probes"]["cached"] else set()))


def plan_of(cwd: Path, *overrides: str) -> dict[str, str]:
    """`ablate plan` as data: stage or cell name → status."""
    from ablate.pipeline.engine import Experiment, resolve_device
    from ablate.api.plugins import load_registry
    from ablate.config.spec import load_spec
    from ablate.pipeline.ui import QuietUI

    registry = load_registry()
    spec = load_spec(cwd / "demo.toml", ["train.steps=10", "train.checkpoint_every=5", *overrides], "tiny", registry)
    rows = Experiment(spec, registry, resolve_device("cpu"), QuietUI(), root=cwd).plan()
    return {row["name"].removeprefix("cell "): row["status"] for row in rows}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run: its directory and results."""
    cwd = demo_dir(tmp_path_factory.mktemp("resume") / "baseline")
    done = run_ablate(cwd)
    assert done.returncode == 0, done.stderr
    return cwd, results_of(cwd)


# -------------------------------------------------------------------------- SIGKILL points


def _cell_file(cell: str, name: str):
    return lambda cwd: cwd / "runs" / "demo" / "cells" / cell / name


KILL_POINTS = {
    # name: (stages seeded from the baseline, "ready to kill" path, check of the state killed in)
    "during oracle extraction": (
        ("corpus", "backbone", "teacher"),
        lambda cwd: next((cwd / ".ablate-cache").glob(".oracle-*.tmp"), None),
        lambda cwd: not list((cwd / ".ablate-cache").glob("oracle-*/DONE"))),
    "mid-cell": (
        STAGES, _cell_file("router_on_real", "state.safetensors"),
        lambda cwd: not _cell_file("router_on_real", "DONE")(cwd).exists()),
    "between cells": (
        STAGES, _cell_file("router_off_real", "DONE"),
        lambda cwd: not _cell_file("router_off_shuf", "DONE")(cwd).exists()),
    "during the report": (
        STAGES, lambda cwd: cwd / "reports" / "demo",
        lambda cwd: not (cwd / "reports" / "demo.md").exists()),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_equals_uninterrupted(point, baseline, tmp_path):
    base_dir, base = baseline
    seeded, target, killed_in_time = KILL_POINTS[point]
    cwd = demo_dir(tmp_path / "run", base_dir, seeded)
    proc = start_ablate(cwd)
    wait_for(proc, lambda: (lambda p: p is not None and p.exists())(target(cwd)))
    sigkill(proc)
    assert killed_in_time(cwd), f"the kill landed after the {point} point"
    assert (cwd / "runs" / "demo" / store.RUN_LOCK).exists()  # the dead run's lock file is left behind

    resumed = run_ablate(cwd, quiet=False)
    assert resumed.returncode == 0, resumed.stderr
    results = results_of(cwd)
    assert comparable(results) == comparable(base)
    assert (cwd / "reports" / "demo.md").is_file()
    assert not list(cwd.rglob(f".*{store.TEMP_SUFFIX}")), "half-written files of the killed run remain"
    assert not list((cwd / "runs" / "demo" / "cells").glob("*/state.safetensors"))
    redone = recomputed(results)
    assert not redone & set(seeded), "a finished stage was recomputed"
    if point == "mid-cell":
        assert "resuming from step" in resumed.stderr
        assert not redone & {"router_off_real", "router_off_shuf"}
    if point == "between cells":
        assert "router_off_real" not in redone and "router_off_shuf" in redone
    if point == "during the report":
        assert redone == set()


# ------------------------------------------------------------------------------- signals


def test_sigint_mid_cell_saves_prints_resume_and_exits_130(baseline, tmp_path):
    base_dir, base = baseline
    cwd = demo_dir(tmp_path / "run", base_dir, STAGES)
    proc = start_ablate(cwd)
    state = _cell_file("router_off_shuf", "state.safetensors")(cwd)
    wait_for(proc, state.exists)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Resume with" in err and "Traceback" not in out + err
    saved = store.load_tree(state)
    assert 5 <= saved["step"] < 10 and not saved["complete"]
    assert not _cell_file("router_off_shuf", "DONE")(cwd).exists()
    assert not (cwd / "runs" / "demo" / "results.json").exists()

    resumed = run_ablate(cwd, quiet=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {saved['step']}" in resumed.stderr
    assert comparable(results_of(cwd)) == comparable(base)


def test_sigterm_during_a_stage_stops_after_it_and_a_second_signal_stops_at_once(baseline, tmp_path):
    base_dir, _ = baseline
    cache = lambda cwd: cwd / ".ablate-cache"  # noqa: E731
    # one SIGTERM while the oracle is computed: the stage completes and is kept, then exit 130
    cwd = demo_dir(tmp_path / "once", base_dir, ("corpus", "backbone", "teacher"))
    proc = start_ablate(cwd)
    wait_for(proc, lambda: bool(list(cache(cwd).glob(".oracle-*.tmp"))))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Resume with" in err
    assert len(list(cache(cwd).glob("oracle-*/DONE"))) == 1
    assert not (cwd / "runs" / "demo" / "cells").exists()

    # two signals: the stage is abandoned at once, leaving no half-written entry
    cwd = demo_dir(tmp_path / "twice", base_dir, ("corpus", "backbone", "teacher"))
    proc = start_ablate(cwd)
    wait_for(proc, lambda: bool(list(cache(cwd).glob(".oracle-*.tmp"))))
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Resume with" in err and "Traceback" not in err
    assert not list(cache(cwd).glob("oracle-*")) and not list(cache(cwd).glob(".oracle-*.tmp"))


class StopInsideEvaluation:
    """A stop flag that turns on the first time it is polled inside an evaluation (evaluation
    runs without autograd; training steps poll with autograd on) after a training step, i.e.
    not inside the step-0 evaluation."""

    def __init__(self):
        self.set = self.trained = False

    def __call__(self) -> bool:
        if torch.is_grad_enabled():
            self.trained = True
        elif self.trained:
            self.set = True
        return self.set

    def installed(self):
        from contextlib import nullcontext

        return nullcontext(self)


def test_stop_inside_evaluation_resumes_to_equal_results(baseline, tmp_path, monkeypatch):
    from ablate.pipeline.engine import Experiment, Interrupted, resolve_device
    from ablate.api.plugins import load_registry
    from ablate.config.spec import load_spec
    from ablate.pipeline.ui import QuietUI

    base_dir, base = baseline
    cwd = demo_dir(tmp_path / "run", base_dir, STAGES)
    registry = load_registry()
    spec = load_spec(cwd / "demo.toml", ["train.steps=10", "train.checkpoint_every=5"], "tiny", registry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = Experiment(spec, registry, resolve_device("cpu"), QuietUI(), root=cwd, stop=StopInsideEvaluation())
        with pytest.raises(Interrupted):
            exp.run()
    finally:
        torch.set_num_threads(threads)
    state = store.load_tree(_cell_file("router_off_real", "state.safetensors")(cwd))
    # stopped inside the evaluation after the last (10th) update: nothing of it recorded
    assert state["step"] == 10 and [e["step"] for e in state["evals"]] == [0] and not state["complete"]
    assert ablate_in(cwd, monkeypatch, "run", *ARGS, "--quiet") == 0
    assert comparable(results_of(cwd)) == comparable(base)


# ------------------------------------------------------------------ truncation, plan, fresh


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(1, path.stat().st_size // 2))


def _entry(cwd: Path, stage: str, key: str = "*") -> Path:
    (entry,) = (cwd / ".ablate-cache").glob(f"{stage}-{key}")
    return entry


TRUNCATIONS = {
    # artifacts truncated together (their dependants are disjoint) → what must be recomputed
    "corpus, oracle, a cell": (
        lambda cwd: [_entry(cwd, "corpus") / "train.safetensors", _entry(cwd, "oracle") / "sidecar.safetensors",
                     _cell_file("router_on_shuf", "checkpoint.safetensors")(cwd)],
        {"corpus", "oracle", "router_on_shuf"}),
    "backbone, teacher, a cell log, probes": (
        lambda cwd: [_entry(cwd, "backbone") / "backbone.safetensors", _entry(cwd, "teacher") / "hf" / "model.safetensors",
                     _cell_file("router_off_real", "metrics.csv")(cwd), cwd / "runs" / "demo" / "probes.json"],
        {"backbone", "teacher", "router_off_real", "probes"}),
    "markers and small files": (
        lambda cwd: [_entry(cwd, "corpus") / "meta.json", _entry(cwd, "oracle") / store.MARKER,
                     _cell_file("router_off_shuf", "key.json")(cwd), _cell_file("router_on_real", "evals.json")(cwd),
                     cwd / "runs" / "demo" / "results.json", cwd / "runs" / "demo" / store.STAGES_FILE],
        {"corpus", "oracle", "router_off_shuf", "router_on_real"}),
}


@pytest.mark.parametrize("case", list(TRUNCATIONS))
def test_truncated_artifacts_recompute_only_what_depends_on_them(case, baseline, tmp_path, monkeypatch):
    """A stage depends on its inputs' data: a truncated artifact is reported and recomputed; a
    recomputed artifact with byte-identical data (deterministic on the CPU) keeps its dependants."""
    base_dir, base = baseline
    cwd = tmp_path / "run"
    shutil.copytree(base_dir, cwd)
    files, expected = TRUNCATIONS[case]
    before = {f: store.file_digest(f) for f in files(cwd)}
    for f in before:
        _truncate(f)

    plan = plan_of(cwd)
    for name, status in plan.items():
        if name in expected & set(STAGES):
            assert status.startswith("would run (incomplete or corrupt") or status == "would run (not built)", (
                name, status)
        elif name in expected and name != "probes":
            assert status == "would run", (name, status)
        elif name in STAGES or name in CELLS:
            assert status.startswith("cached"), (name, status)

    assert ablate_in(cwd, monkeypatch, "run", *ARGS) == 0  # not --quiet: the warnings are shown
    results = results_of(cwd)
    assert recomputed(results) == expected
    assert comparable(results) == comparable(base)
    for f, digest in before.items():
        if f.name not in store.RECORD_FILES | {"probes.json", "results.json", store.MARKER}:  # those hold timings
            assert store.file_digest(f) == digest, f"{f} was rebuilt with different bytes"


def test_plan_lists_keys_and_cache_state_and_fresh_recomputes(baseline, tmp_path, monkeypatch, capsys):
    base_dir, base = baseline
    cwd = tmp_path / "run"
    shutil.copytree(base_dir, cwd)
    assert ablate_in(cwd, monkeypatch, "plan", *SPEC_ARGS) == 0
    printed = capsys.readouterr().out
    assert all(st["key"] in printed for st in base["stages"].values() if st["key"])
    assert 'would run eager (train.compile = "auto": 40 steps over all cells < 3000)' in " ".join(printed.split())
    assert set(plan_of(cwd).values()) == {"cached", "always rewritten (cheap)"}
    # checkpoint_every changes when state is saved, not what is computed: same keys
    assert set(plan_of(cwd, "train.checkpoint_every=7").values()) == {"cached", "always rewritten (cheap)"}
    # a training setting changes the cells' keys only
    plan = plan_of(cwd, "train.lr=0.001")
    assert [n for n, st in plan.items() if st == "would run"] == [*CELLS, "probes"]
    # an interrupted cell is listed as resumable
    state = _cell_file("router_on_real", "state.safetensors")(cwd)
    store.save_tree(state, {"step": 5})
    (state.parent / store.MARKER).unlink()
    assert plan_of(cwd)["router_on_real"] == "would resume from its last checkpoint"
    shutil.rmtree(state.parent)

    # --fresh recomputes this spec's stages (replacing their cache entries) and cells, nothing else
    digests = {s: store.content_digest(_entry(cwd, s)) for s in STAGES}
    other = cwd / ".ablate-cache" / "oracle-0123456789abcdef"
    shutil.copytree(_entry(cwd, "oracle"), other)
    assert ablate_in(cwd, monkeypatch, "run", *ARGS, "--quiet", "--fresh", "--set", "train.steps=5") == 0
    assert recomputed(results_of(cwd)) == set(STAGES) | set(CELLS) | {"probes"}
    assert other.is_dir(), "--fresh removed another spec's cache entry"
    assert {s: store.content_digest(_entry(cwd, s, base["stages"][s]["key"])) for s in STAGES} == digests

    # clean: the unreferenced entry goes, everything this run uses stays
    assert ablate_in(cwd, monkeypatch, "clean") == 0
    assert not other.exists()
    assert all(_entry(cwd, s).is_dir() for s in STAGES)


# ------------------------------------------------------------------------------------ costs


def test_stage_costs_count_the_work_done_and_nothing_for_a_cache_hit(baseline, tmp_path, monkeypatch):
    cwd, results = baseline
    spec, stages = results["spec"], results["stages"]
    from ablate_builtins.teachers import LlamaLocalParams

    pre, train = spec["backbone"]["pretrain"], spec["train"]
    teacher = LlamaLocalParams.model_validate({k: v for k, v in spec["teacher"].items() if k != "plugin"})
    expected = {
        "corpus": stages["corpus"]["info"]["train_tokens"] + stages["corpus"]["info"]["val_tokens"],
        "backbone": pre["steps"] * pre["batch"] * pre["seq_len"],
        "teacher": teacher.steps * teacher.batch * teacher.seq_len,
        "oracle": results["oracle"]["tokens"],
        "cells": len(CELLS) * train["steps"] * train["batch"] * train["seq_len"],
        "probes": None,
    }
    assert {n: s["tokens"] for n, s in stages.items()} == expected
    wall = results["provenance"]["wall_seconds"]  # the whole run, timed apart from the stages
    assert sum(s["seconds"] for s in stages.values()) <= wall
    for name, s in stages.items():
        # a stage's rate is over its own seconds, which lie inside the run's wall time
        assert (s["tokens_per_s"] is None) == (s["tokens"] is None), name
        assert s["tokens"] is None or 0 < s["tokens"] / wall <= s["tokens_per_s"] + 0.5, name
        assert s["peak_gpu_allocated_gib"] is None and s["peak_gpu_reserved_gib"] is None  # CPU run
    report = (cwd / "reports" / "demo.md").read_text()
    assert f"| oracle | {stages['oracle']['key']} | no |" in report

    again = demo_dir(tmp_path / "again")
    shutil.copytree(cwd / ".ablate-cache", again / ".ablate-cache")
    shutil.copytree(cwd / "runs", again / "runs")
    # a write a kill interrupted inside a finished cell (seen when a SIGKILL landed between cells)
    leftover = again / "runs" / "demo" / "cells" / "router_off_real" / f".status.json.x1y2{store.TEMP_SUFFIX}"
    leftover.write_text("{")
    assert ablate_in(again, monkeypatch, "run", *ARGS, "--quiet") == 0
    assert not leftover.exists()  # removed, though the cell itself is reused
    cached = results_of(again)["stages"]
    assert all(s["cached"] and s["tokens"] is None and s["tokens_per_s"] is None for s in cached.values())


def test_results_say_which_cells_read_the_sidecar(baseline):
    _, results = baseline
    uses = {n: c["config"]["uses_sidecar"] for n, c in results["cells"].items()}
    objective = {n: c["config"]["objective"]["name"] for n, c in results["cells"].items()}
    assert uses == {n: objective[n] != "ce" for n in CELLS}
    assert all(p["attributed"] for p in results["pairs"])  # one control per real cell in the demo
