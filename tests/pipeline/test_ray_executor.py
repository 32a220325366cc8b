"""The ray executor on a local Ray that declares 2 GPUs on the CPU: at most 2 cells at once, each
with its own CUDA_VISIBLE_DEVICES, the local executor's numbers bit for bit; a worker that dies
mid-cell is retried and resumes from its checkpoint; a cell that raises is not retried and is
reported; a rerun trains only the cells without their marker; failed cells wait for
--retry-failed; `ablate status`. The Ray tests are skipped where Ray is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ablate.pipeline import store
from cli_run import MICRO_DEMO, ablate_in

pytestmark = pytest.mark.seconds(70)  # on one core (tests/conftest.py: longest files first)

ROOT = Path(__file__).resolve().parents[2]
SPEC_ARGS = [*MICRO_DEMO, "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--device", "cpu", "--quiet"]
RAY = ["--executor", "ray"]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install 'ablate[ray]'")

# Test objectives: plain CE (the built-in `ce`'s numbers), with a side effect.
PLUGIN = '''
import os
from pathlib import Path
from ablate import hookimpl
from ablate.training import losses
from ablate.api.components import Objective, ObjectiveResult, Params


class At(Params):
    at: int = 3


class _CE(Objective):
    def formula(self):
        return "CE"

    def __call__(self, batch):
        ce = losses.cross_entropy(batch.logits, batch.targets)
        return ObjectiveResult(ce, {"ce": ce.detach()})


class ExitOnce(_CE):
    """The worker process dies (os._exit) at training call `at`, once: the first attempt leaves
    a marker in the run's directory."""
    name = "exit_once"
    Params = At

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        marker = Path("exited-once")
        if self.calls == self.params.at and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


class Raises(_CE):
    """Trains, then raises outside the objective's guarded calls (its formula); counts attempts."""
    name = "raises"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        with open("attempts", "a") as f:
            f.write(f"{os.getpid()}\\n")

    def formula(self):
        raise RuntimeError("formula exploded")


@hookimpl
def ablate_objectives(register):
    register(ExitOnce)
    register(Raises)
'''


def setup(cwd: Path, cache_from: Path | None = None) -> list[str]:
    cwd.mkdir(parents=True)
    shutil.copy(ROOT / "specs" / "demo.toml", cwd / "demo.toml")
    (cwd / "objectives.py").write_text(PLUGIN)
    if cache_from is not None:  # the stages are built; only the cells are under test
        shutil.copytree(cache_from / ".ablate-cache", cwd / ".ablate-cache")
    return ["--plugin", str(cwd / "objectives.py")]


def results(cwd: Path) -> dict:
    return json.loads((cwd / "runs" / "demo" / "results.json").read_text())["cells"]


def same_numbers(a: dict, b: dict, shared_metrics: bool = False) -> None:
    """Every evaluation, logged training number and metric equal (timings aside); shared_metrics:
    only the metrics both have (a cell whose objective differs by name has no pair metrics)."""
    timing = {"tokens_per_s", "dt_ms"}
    assert a["evals"] == b["evals"]
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
    keys = set(a["metrics"]) & set(b["metrics"]) if shared_metrics else set(a["metrics"]) | set(b["metrics"])
    assert {k: a["metrics"].get(k) for k in keys} == {k: b["metrics"].get(k) for k in keys}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, micro_stages):
    cwd = tmp_path_factory.mktemp("ray") / "local"
    plugin = setup(cwd, cache_from=micro_stages)
    with pytest.MonkeyPatch.context() as mp:
        assert ablate_in(cwd, mp, "run", *SPEC_ARGS, *plugin) == 0
    return cwd


@pytest.fixture(scope="module")
def ray_session(local_run):
    """One local Ray for the tests below (the executor uses a connection it finds)."""
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@needs_ray
def test_ray_gives_the_local_numbers_two_cells_at_a_time_each_on_its_own_gpu(local_run, monkeypatch, capsys):
    """Ray started by the executor itself, declaring 2 GPUs on the CPU."""
    cwd = local_run.parent / "ray"
    plugin = setup(cwd)
    code = ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *plugin, *RAY,
                     "--set", "executor.local_num_cpus=2", "--set", "executor.local_num_gpus=2")
    assert code == 0
    local, other = results(local_run), results(cwd)
    assert list(other) == list(local)
    for name in local:
        same_numbers(other[name], local[name])

    spans = []
    for name in local:
        status = store.read_json(cwd / "runs" / "demo" / "cells" / name / "status.json")
        assert status["state"] == "done" and status["pid"] != os.getpid()
        spans.append((status["started"], status["finished"], status["cuda_visible_devices"]))
    assert {gpu for *_, gpu in spans} == {"0", "1"}
    for start, end, gpu in spans:
        overlapping = [g for s, e, g in spans if s < end and e > start]  # itself included
        assert len(overlapping) <= 2 and len(set(overlapping)) == len(overlapping), spans

    capsys.readouterr()
    assert ablate_in(cwd, monkeypatch, "status", "demo") == 0
    assert "4 done" in capsys.readouterr().out


@needs_ray
def test_an_address_nothing_answers_at_is_a_clear_error(local_run, monkeypatch, capsys):
    """(Before ray_session: a process already connected to Ray uses that connection.)"""
    cwd = local_run.parent / "address"
    plugin = setup(cwd, cache_from=local_run)
    assert ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *plugin, *RAY, "--address", "127.0.0.1:1") == 2
    assert "Nothing answers at the Ray address '127.0.0.1:1'" in capsys.readouterr().err


@pytest.mark.slow
@needs_ray
def test_a_worker_killed_mid_cell_is_retried_and_resumes_to_the_uninterrupted_numbers(local_run, ray_session,
                                                                                       monkeypatch, capsys):
    cwd = local_run.parent / "killed"
    plugin = setup(cwd, cache_from=local_run)
    exit_once = ["--set", 'cells.0.objective={ name = "exit_once", at = 3 }']  # 3rd update: after the step-2 save
    loud = [a for a in SPEC_ARGS if a != "--quiet"]
    assert ablate_in(cwd, monkeypatch, "run", *loud, *plugin, *RAY, *exit_once) == 0
    assert (cwd / "exited-once").is_file()  # the first attempt died
    assert "router_off_real: resuming from step 2" in capsys.readouterr().err  # the retry resumed
    cells, local = results(cwd), results(local_run)
    for name in local:  # exit_once computes what `ce` computes: the uninterrupted run's numbers
        same_numbers(cells[name], local[name], shared_metrics=name == "router_off_real")
    assert cells["router_off_real"]["metrics"]["val_loss"] == local["router_off_real"]["metrics"]["val_loss"]


@pytest.mark.slow
@needs_ray
def test_a_cell_that_raises_is_not_retried_is_reported_and_waits_for_retry_failed(local_run, ray_session, monkeypatch,
                                                                                   capsys):
    cwd = local_run.parent / "raises"
    plugin = setup(cwd, cache_from=local_run)
    raises = ["--set", 'cells.0.objective="raises"']
    assert ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *plugin, *RAY, *raises) == 1
    cells = results(cwd)
    assert cells["router_off_real"]["status"] == "failed"
    assert "RuntimeError: formula exploded" in cells["router_off_real"]["error"]
    assert [c["status"] for c in cells.values()][1:] == ["done"] * 3
    assert len((cwd / "attempts").read_text().split()) == 1  # not retried
    capsys.readouterr()
    assert ablate_in(cwd, monkeypatch, "status", "demo") == 0
    out = capsys.readouterr().out
    assert "failed" in out and "formula exploded" in out and "3 done" in out

    assert ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *plugin, *RAY, *raises) == 1  # skipped, not rerun
    assert len((cwd / "attempts").read_text().split()) == 1
    assert "--retry-failed" in capsys.readouterr().out
    assert results(cwd)["router_off_real"]["status"] == "failed"
    assert ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *plugin, *RAY, *raises, "--retry-failed") == 1
    assert len((cwd / "attempts").read_text().split()) == 2


@pytest.mark.slow
@needs_ray
def test_a_rerun_after_a_killed_driver_trains_only_the_unfinished_cells(local_run, ray_session, monkeypatch, capsys):
    """As a driver killed while one cell trained leaves it: no DONE marker, a status that says running."""
    cwd = local_run.parent / "rerun"
    shutil.copytree(local_run, cwd)
    cell_dir = cwd / "runs" / "demo" / "cells" / "router_on_shuf"
    (cell_dir / store.MARKER).unlink()
    store.write_json(cell_dir / "status.json", {"state": "running", "step": 2, "steps": 4, "time": 0})
    capsys.readouterr()
    assert ablate_in(cwd, monkeypatch, "status", "demo") == 0
    assert "interrupted" in capsys.readouterr().out
    loud = [a for a in SPEC_ARGS if a != "--quiet"]  # the driver's progress display and messages
    assert ablate_in(cwd, monkeypatch, "run", *loud, "--plugin", str(cwd / "objectives.py"), *RAY) == 0
    assert "✓ cell router_on_shuf trained" in capsys.readouterr().err
    cells, local = results(cwd), results(local_run)
    assert {n: c["cached"] for n, c in cells.items()} == {**{n: True for n in local}, "router_on_shuf": False}
    for name in local:
        same_numbers(cells[name], local[name])


# ------------------------------------------------------------------------- without Ray running


def test_without_ray_the_ray_executor_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    shutil.copy(ROOT / "specs" / "demo.toml", tmp_path / "demo.toml")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert ablate_in(tmp_path, monkeypatch, "run", *SPEC_ARGS, *RAY, "--address", "auto") == 2
    assert "pip install 'ablate[ray]'" in capsys.readouterr().err
    assert not (tmp_path / ".ablate-cache").exists()


def test_load_mapped_reads_what_safetensors_reads_from_one_shared_map(tmp_path):
    from ablate.pipeline.ray_executor import load_mapped

    tensors = {"table": torch.randn(5, 3), "half": torch.randn(7).to(torch.bfloat16), "counts": torch.arange(5),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors")
    mapped = load_mapped(tmp_path / "t.safetensors")
    expected = load_file(tmp_path / "t.safetensors")
    assert set(mapped) == set(expected)
    for name, t in expected.items():
        assert mapped[name].dtype == t.dtype and torch.equal(mapped[name], t), name
    maps = Path(f"/proc/{os.getpid()}/maps")
    if maps.exists():
        assert str(tmp_path / "t.safetensors") in maps.read_text()  # the file is mapped, not read


def test_status_lists_pending_done_failed_and_interrupted_cells(tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "r"
    store.write_json(run / "spec.resolved.json", {"cells": [{"name": n} for n in ("a", "b", "c", "d")]})
    (run / "cells" / "a").mkdir(parents=True)
    store.mark_done(run / "cells" / "a")
    store.write_json(run / "cells" / "b" / "status.json", {"state": "failed", "error": "non-finite loss at step 3"})
    store.write_json(run / "cells" / "c" / "status.json", {"state": "running", "step": 2, "steps": 9, "time": 0})
    from ablate.pipeline.ray_executor import cell_states

    states = {r["cell"]: r["state"] for r in cell_states(run)}
    assert states == {"a": "done", "b": "failed", "c": "interrupted", "d": "pending"}  # c: no driver holds the run
    with store.RunLock(run):
        assert [r["state"] for r in cell_states(run)] == ["done", "failed", "running", "pending"]
    assert ablate_in(tmp_path, monkeypatch, "status", "r") == 0
    out = capsys.readouterr().out
    assert "non-finite loss at step 3" in out and "--retry-failed" in out
    assert ablate_in(tmp_path, monkeypatch, "status", "nope") == 2
