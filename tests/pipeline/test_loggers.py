"""Loggers receive a run's events: every event in order with metrics.csv's numbers, from the local
executor live, from an executor that delivers none (replayed from its records) and from Ray
workers; TensorBoard's event files and W&B's offline runs hold the same numbers; a logger that
raises is reported once and changes nothing in the run's results; none runs unless asked."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from ablate.api.plugins import load_registry
from ablate.config.spec import spec_from_dict
from ablate.errors import SpecError
from ablate.pipeline import events as ev
from cli_run import MICRO_DEMO, ablate_in

pytestmark = pytest.mark.seconds(28)  # on one core (tests/conftest.py: longest files first)

ROOT = Path(__file__).resolve().parents[2]
SPEC_ARGS = [*MICRO_DEMO, "--set", "train.steps=4", "--device", "cpu"]
CELLS = ["router_off_real", "router_off_shuf", "router_on_real", "router_on_shuf"]
WANDB_PLUGIN = ROOT / "plugins" / "examples" / "ablate-wandb-logger" / "ablate_wandb_logger" / "__init__.py"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None
TIMING = {"provenance", "seconds", "wall_seconds", "stage_seconds", "tokens_per_s", "dt_ms", "first_step_ms",
          "median_step_ms"}  # differ run to run

LOGGERS = '''
"""Test loggers: one writes every event as a JSON line, one raises on every event."""
from ablate.api import Logger, Params, hookimpl


class Where(Params):
    path: str = "events.jsonl"


class Recorder(Logger):
    name = "recorder"
    Params = Where

    def handle(self, event):
        with open(self.params.path, "a") as f:
            f.write(event.to_json() + "\\n")

    def close(self):
        with open(self.params.path, "a") as f:
            f.write('{"kind": "closed"}\\n')


class Raiser(Logger):
    name = "raiser"

    def handle(self, event):
        raise RuntimeError("logger exploded")

    def close(self):
        raise RuntimeError("close exploded too")


@hookimpl
def ablate_loggers(register):
    register(Recorder)
    register(Raiser)
'''

SILENT_EXECUTOR = '''
from ablate.api import CellJob, Executor, hookimpl
from ablate.pipeline.cell_job import run_cell


class Silent(Executor):
    name = "silent"

    def run(self, jobs, device, stop, registry, ui):
        return {job.cell: run_cell(job, device, stop, registry, ui) for job in jobs}


@hookimpl
def ablate_executors(register):
    register(Silent)
'''


def run_in(cwd: Path, *extra: str, env: dict | None = None) -> tuple[int, str]:
    """`ablate run` of the tiny demo in cwd with the test loggers' plugin → (exit code, stderr)."""
    from rich.console import Console

    from ablate.cli import main as cli_main

    cwd.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "specs" / "demo.toml", cwd / "demo.toml")
    (cwd / "loggers.py").write_text(LOGGERS)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        mp.setattr(cli_main, "err_console", Console(file=err, width=400))
        code = ablate_in(cwd, mp, "run", *SPEC_ARGS, "--plugin", str(cwd / "loggers.py"), *extra)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny demo in two directories: without loggers, and with the recorder, a logger that
    raises on every event, TensorBoard and (when installed) W&B in offline mode."""
    base = tmp_path_factory.mktemp("loggers")
    assert run_in(base / "plain", "--quiet")[0] == 0
    extra = ["--logger", "recorder", "--logger", "raiser"] + (["--logger", "tensorboard"] if HAS_TENSORBOARD else [])
    if HAS_WANDB:
        extra += ["--plugin", str(WANDB_PLUGIN), "--logger", "wandb"]
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(base / "wandb-config"),
           "WANDB_CACHE_DIR": str(base / "wandb-cache")}
    code, err = run_in(base / "logged", *extra, env=env)
    assert code == 0, err
    return {"plain": base / "plain", "logged": base / "logged", "stderr": err}


def recorded(cwd: Path) -> list[dict]:
    return [json.loads(line) for line in (cwd / "events.jsonl").read_text().splitlines()]


def metrics_rows(cwd: Path, cell: str) -> list[dict[str, str]]:
    """metrics.csv's rows as written (text), empty cells left out."""
    with open(cwd / "runs" / "demo" / "cells" / cell / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def read_json(cwd: Path, *parts: str):
    return json.loads(cwd.joinpath("runs", "demo", *parts).read_text())


def cell_sequence(cwd: Path, cell: str) -> list[tuple]:
    """What a cell trained from scratch sends: started, evaluations and rows by step (an evaluation
    at step s comes before the row of step s), finished."""
    steps = [(int(r["step"]), 0, "cell_evaluated") for r in read_json(cwd, "cells", cell, "evals.json")]
    steps += [(int(r["step"]), 1, "step_logged") for r in metrics_rows(cwd, cell)]
    return [("cell_started", cell, None), *[(kind, cell, s) for s, _, kind in sorted(steps)],
            ("cell_finished", cell, None)]


def as_text(values: dict) -> dict[str, str]:
    """An event's numbers as csv writes them (str(float) is repr: exact)."""
    return {k: str(v) for k, v in values.items()}


def number(x) -> float | str:
    """A number to compare exactly, NaN equal to NaN."""
    return "nan" if math.isnan(float(x)) else float(x)


def stable(obj):
    """results.json without what differs between two runs of the same work (timings, provenance)."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_logger_receives_every_event_of_a_run_in_order_with_the_numbers_of_metrics_csv(runs):
    cwd = runs["logged"]
    events = recorded(cwd)
    head = [("run_started", None, None)] + [("stage_finished", None, None)] * 4
    tail = [("stage_finished", None, None), ("probes_finished", None, None), ("stage_finished", None, None),
            ("verdicts", None, None), ("closed", None, None)]
    seen = [(e["kind"], e.get("cell"), e.get("step")) for e in events]
    assert seen[:len(head)] == head and seen[len(seen) - len(tail):] == tail
    assert seen[len(head):len(seen) - len(tail)] == [x for c in CELLS for x in cell_sequence(cwd, c)]  # cell by cell

    results = read_json(cwd, "results.json")
    assert events[0]["spec"] == read_json(cwd, "spec.resolved.json") and events[0]["run"] == "demo"
    assert events[0]["provenance"]["command"].startswith("ablate run demo.toml")
    assert [(e["stage"], e["key"]) for e in events if e["kind"] == "stage_finished"] == \
        [(name, st["key"]) for name, st in results["stages"].items()]
    for cell in CELLS:
        mine = [e for e in events if e.get("cell") == cell]
        rows = [{"step": str(e["step"]), **as_text(e["values"])} for e in mine if e["kind"] == "step_logged"]
        assert rows == metrics_rows(cwd, cell)  # every number, as metrics.csv holds it
        evals = [{"step": e["step"], "val_loss": e["val_loss"]} for e in mine if e["kind"] == "cell_evaluated"]
        assert evals == read_json(cwd, "cells", cell, "evals.json")
        assert mine[-1]["outcome"] == read_json(cwd, "cells", cell, "outcome.json") and mine[-1]["cached"] is False
        assert mine[0]["config"]["cell"]["name"] == cell and mine[0]["config"]["train"]["steps"] == 4
    probes, verdicts = events[-4], events[-2]
    assert probes["metrics"] == read_json(cwd, "probes.json")["cells"] and probes["failed"] == []
    assert verdicts["thresholds"] == results["thresholds"] and verdicts["discriminator"] == results["discriminator"]
    assert verdicts["metrics"] == {n: c["metrics"] for n, c in results["cells"].items()}


@pytest.mark.slow
def test_a_logger_that_raises_on_every_event_is_reported_once_and_changes_nothing(runs):
    plain, logged = runs["plain"], runs["logged"]
    assert runs["stderr"].count("logger 'raiser' failed") == 1
    assert "RuntimeError: logger exploded" in runs["stderr"] and "close exploded" not in runs["stderr"]
    assert stable(read_json(logged, "results.json")) == stable(read_json(plain, "results.json"))
    for cell in CELLS:
        for name in ("evals.json", "checkpoint.safetensors"):
            a, b = (d / "runs" / "demo" / "cells" / cell / name for d in (plain, logged))
            assert a.read_bytes() == b.read_bytes(), (cell, name)
        drop = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
        assert drop(metrics_rows(logged, cell)) == drop(metrics_rows(plain, cell))
    assert not (plain / "runs" / "demo" / "tensorboard").exists()  # no logger unless asked


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed: pip install 'ablate[tensorboard]'")
def test_tensorboard_event_files_hold_the_numbers_of_metrics_csv(runs):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = runs["logged"]
    assert sorted(p.name for p in (cwd / "runs" / "demo" / "tensorboard").iterdir()) == sorted(CELLS)
    for cell in CELLS:
        acc = EventAccumulator(str(cwd / "runs" / "demo" / "tensorboard" / cell))
        acc.Reload()
        rows = metrics_rows(cwd, cell)
        columns = [c for c in rows[0] if c != "step"]
        assert set(columns) | {"val_loss"} == set(acc.Tags()["scalars"])
        for column in columns:  # TensorBoard keeps float32
            got = [(e.step, e.value) for e in acc.Scalars(column)]
            want = [(int(r["step"]), float(np.float32(float(r[column])))) for r in rows]
            np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"{cell} {column}")
        evals = read_json(cwd, "cells", cell, "evals.json")
        assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == \
            [(r["step"], float(np.float32(r["val_loss"]))) for r in evals]
        texts = {t.split("/")[0]: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
        assert {"config", "outcome", "final_metrics", "verdicts"} <= set(texts)
        assert f"| val_loss | {read_json(cwd, 'results.json')['cells'][cell]['metrics']['val_loss']} |" in \
            texts["final_metrics"]
        hparams = acc.summary_metadata["_hparams_/session_start_info"].plugin_data
        assert hparams.plugin_name == "hparams" and b"train.lr" in hparams.content and b"cell.router" in hparams.content
        results = read_json(cwd, "results.json")
        mine = [t for t in results["thresholds"] if t["cell"] == cell]
        for t in mine:
            assert f"{t['name']}: {t['metric']} = {t['value']} → **{t['verdict']}**" in texts["verdicts"]
        assert ("combination:" in texts["verdicts"]) == (cell in results["combination"])


def wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB-style log: 7-byte header, 32 KiB blocks,
    records with a 7-byte header: checksum, length, type; full = 1, first = 2, middle = 3, last = 4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb): the W&B logger is not tested")
def test_the_wandb_logger_offline_writes_one_run_per_cell_grouped_by_experiment(runs):
    cwd = runs["logged"]
    files = sorted((cwd / "runs" / "demo" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == len(CELLS)
    seen = {}
    for path in files:
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
                history.setdefault(items["_step"], {}).update(items)
        seen[run.display_name] = (run.run_group, config, history)
    assert sorted(seen) == sorted(CELLS)
    for cell, (group, config, history) in seen.items():
        assert group == "demo" and config["cell"]["name"] == cell and config["train"]["steps"] == 4
        for row in metrics_rows(cwd, cell):  # W&B keeps each number's JSON: exact (0.0 reads "0")
            logged = history[row["step"]]
            assert {k: number(json.loads(logged[k])) for k in row if k != "step"} == \
                {k: number(v) for k, v in row.items() if k != "step"}
        assert {str(r["step"]): r["val_loss"] for r in read_json(cwd, "cells", cell, "evals.json")} == \
            {s: json.loads(h["val_loss"]) for s, h in history.items() if "val_loss" in h}


@pytest.mark.slow
def test_an_executor_that_delivers_no_events_has_its_cells_events_replayed_from_their_records(runs, tmp_path):
    cwd = tmp_path / "silent"
    cwd.mkdir()
    shutil.copytree(runs["plain"] / ".ablate-cache", cwd / ".ablate-cache")  # the stages; the cells train
    (cwd / "silent.py").write_text(SILENT_EXECUTOR)
    code, err = run_in(cwd, "--quiet", "--executor", "silent", "--plugin", str(cwd / "silent.py"),
                       "--logger", "recorder")
    assert code == 0, err
    events = recorded(cwd)
    cells = [(e["kind"], e.get("cell"), e.get("step")) for e in events if e.get("cell")]
    assert cells == [x for cell in CELLS for x in cell_sequence(cwd, cell)]
    for cell in CELLS:
        rows = [{"step": str(e["step"]), **as_text(e["values"])} for e in events
                if e["kind"] == "step_logged" and e["cell"] == cell]
        assert rows == metrics_rows(cwd, cell)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed: pip install 'ablate[ray]'")
def test_ray_workers_events_reach_the_loggers_with_the_numbers_of_metrics_csv(runs, tmp_path):
    cwd = tmp_path / "ray"
    cwd.mkdir()
    shutil.copytree(runs["plain"] / ".ablate-cache", cwd / ".ablate-cache")
    code, err = run_in(cwd, "--quiet", "--executor", "ray", "--set", "executor.local_num_cpus=2",
                       "--set", "executor.local_num_gpus=2", "--logger", "recorder")
    assert code == 0, err
    events = recorded(cwd)
    for cell in CELLS:  # cells run two at a time: each cell's own events in order
        mine = [(e["kind"], e.get("cell"), e.get("step")) for e in events if e.get("cell") == cell]
        assert mine == cell_sequence(cwd, cell)
        rows = [{"step": str(e["step"]), **as_text(e["values"])} for e in events
                if e["kind"] == "step_logged" and e["cell"] == cell]
        assert rows == metrics_rows(cwd, cell)
    assert events[-2]["kind"] == "verdicts" and not (cwd / "runs" / "demo" / ".events").exists()


# ------------------------------------------------------------------------------ units


class Counting(ev.Logger):
    name = "counting"

    def __init__(self, params=None):
        super().__init__(params)
        self.seen = []

    def on_step_logged(self, event):
        self.seen.append(event)
        event.values["loss"] = -1.0  # a logger's copy: the run's numbers stay as they are


class Failing(Counting):
    name = "failing"

    def handle(self, event):
        self.seen.append(event)
        raise ValueError("nope")


def test_the_dispatcher_turns_off_a_failing_logger_after_one_warning_and_hands_out_copies():
    good, bad, warnings = Counting(), Failing(), []
    dispatch = ev.Dispatcher({"failing": bad, "counting": good}, warnings.append)
    values = {"loss": 2.5}
    for step in range(3):
        dispatch(ev.StepLogged("c", step, values))
    dispatch.close()
    assert len(bad.seen) == 1 and [e.step for e in good.seen] == [0, 1, 2] and values == {"loss": 2.5}
    assert len(warnings) == 1 and "logger 'failing' failed on a step_logged event (ValueError: nope)" in warnings[0]
    assert not ev.NO_EVENTS and not dispatch  # no loggers: nothing is called


def test_events_survive_json_and_a_feed_reads_only_whole_lines(tmp_path):
    sent = [ev.CellStarted("c", {"train": {"steps": 2}}, 2, None), ev.StepLogged("c", 0, {"loss": float("nan")}),
            ev.CellEvaluated("c", 2, 1.25), ev.CellFinished("c", False, {"steps": 2})]
    sink, feed = ev.EventFile(tmp_path / "ev" / "c.jsonl", print), ev.EventFeed(tmp_path / "ev")
    for event in sent[:2]:
        sink(event)
    with open(feed.path("c"), "a") as f:
        f.write(sent[2].to_json()[:10])  # a line being written
    got = feed.read("c")
    assert [e.kind for e in got] == ["cell_started", "step_logged"] and got[0] == sent[0]
    with open(feed.path("c"), "a") as f:
        f.write(sent[2].to_json()[10:] + "\n")
    sink(sent[3])
    assert feed.read("c") == sent[2:] and feed.read("c") == [] and feed.read("other") == []


BASE = {"name": "x", "corpus": {"plugin": "synthetic"}, "teacher": {"plugin": "llama-local"}, "cells": [{"name": "c"}]}


def problems(raw: dict, loggers=()) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, registry=load_registry(), loggers=loggers)
    return str(info.value)


def test_loggers_are_chosen_and_their_parameters_validated_like_probes():
    registry = load_registry()
    assert spec_from_dict(BASE, registry=registry).loggers.use == []  # none unless asked
    assert "unknown logger plugin 'nope'" in problems({**BASE, "loggers": {"use": ["nope"]}}).lower()
    assert "loggers.use[0]" in problems({**BASE, "loggers": {"use": ["nope"]}})
    msg = problems({**BASE, "loggers": {"recorder": {"path": "x"}}})
    assert "loggers.recorder: parameters for logger 'recorder', which is not used" in msg
    if HAS_TENSORBOARD:
        msg = problems({**BASE, "loggers": {"tensorboard": {"flush_secs": 0, "colour": 1}}}, loggers=["tensorboard"])
        assert "loggers.tensorboard.flush_secs" in msg and "logger 'tensorboard' accepts: dir, flush_secs" in msg
        spec = spec_from_dict({**BASE, "loggers": {"use": ["tensorboard"], "tensorboard": {"flush_secs": 2}}},
                              registry=registry, loggers=["tensorboard"])
        assert spec.loggers.use == ["tensorboard"] and spec.loggers.tables() == {"tensorboard": {"flush_secs": 2}}


def test_tensorboard_missing_is_a_spec_error_naming_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    msg = problems(BASE, loggers=["tensorboard"])
    assert "loggers.tensorboard" in msg and "pip install 'ablate[tensorboard]'" in msg
