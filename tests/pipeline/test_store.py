"""The store: atomic writes, completion markers and checksums, content digests, tensor-tree state
files, locks, cell directories, `ablate clean`, and the no-unpickling rule."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ablate.training import cells

from ablate.cli import main as cli

from ablate.config import expr

from ablate.pipeline import stages

from ablate.pipeline import store
from ablate.errors import AblateError, InputError
from ablate.training.optim import CellOptimizer

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- atomic files


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    store.write_json(target, {"v": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_staging_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "oracle-abc"
    final.mkdir()
    (final / "partial").write_text("from an interrupted attempt")
    with pytest.raises(KeyboardInterrupt):
        with store.staging(final) as tmp:
            (tmp / "x").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle-abc"]
    assert (final / "partial").exists()
    with store.staging(final) as tmp:
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["x"]


def test_remove_temps_removes_only_hidden_temp_leftovers(tmp_path):
    (tmp_path / ".oracle-k.1a2b.tmp").mkdir()
    (tmp_path / ".results.json.x9.tmp").write_text("")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "oracle-k").mkdir()
    assert [p.name for p in store.remove_temps(tmp_path, "oracle-k")] == [".oracle-k.1a2b.tmp"]
    store.remove_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle-k", "results.json"]


# ---------------------------------------------------------------------------------- markers


def _artifact(directory: Path, data: bytes = b"weights", stats: dict | None = None, inputs=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "table.safetensors").write_bytes(data)
    (directory / "sub").mkdir(exist_ok=True)
    (directory / "sub" / "config.json").write_text('{"a": 1}')
    store.write_json(directory / "stats.json", stats or {"seconds": 1.0})
    store.mark_done(directory, inputs)
    return directory


def test_marker_checksums_detect_truncation_and_missing_files(tmp_path):
    art = _artifact(tmp_path / "a")
    assert store.is_done(art) and store.corrupt_files(art) == []
    with open(art / "table.safetensors", "r+b") as f:
        f.truncate(3)
    assert not store.is_done(art) and store.corrupt_files(art) == ["table.safetensors"]
    assert store.is_done(art, verify=False)
    (art / "sub" / "config.json").unlink()
    assert store.corrupt_files(art) == ["sub/config.json", "table.safetensors"]
    (art / store.MARKER).unlink()
    assert not store.is_done(art) and store.corrupt_files(art) == [store.MARKER]
    (art / store.MARKER).write_text("{not json")
    assert not store.is_done(art) and store.content_digest(art) is None


def test_content_digest_follows_data_not_timings(tmp_path):
    a = store.content_digest(_artifact(tmp_path / "a", stats={"seconds": 1.0}))
    b = store.content_digest(_artifact(tmp_path / "b", stats={"seconds": 2.5}))
    c = store.content_digest(_artifact(tmp_path / "c", data=b"other weights"))
    assert a == b != c


def test_cache_status_reports_why_an_entry_cannot_be_reused(tmp_path):
    upstream = _artifact(tmp_path / "teacher-1")
    digest = store.content_digest(upstream)
    entry = _artifact(tmp_path / "oracle-1", inputs={"teacher": digest})
    assert stages.cache_status(entry, {"teacher": digest}) == (True, "")
    assert stages.cache_status(entry, {"teacher": None}) == (True, "")  # input not rebuilt yet: unknown
    assert stages.cache_status(entry, {"teacher": "f" * 16}) == (
        False, "built from a different teacher than the current one")
    assert stages.cache_status(tmp_path / "oracle-2", {}) == (False, "not built")
    (entry / "stats.json").write_text("{}")
    assert stages.cache_status(entry, {"teacher": digest}) == (False, "incomplete or corrupt (stats.json)")


class _UI:
    def __init__(self):
        self.messages = []

    def info(self, msg):
        self.messages.append(msg)

    warn = info


def test_build_or_reuse_builds_once_and_rebuilds_a_corrupt_entry(tmp_path):
    builds = []

    def build(tmp):
        builds.append(tmp)
        (tmp / "data.bin").write_bytes(b"abc")

    ui = _UI()
    path, cached = stages.build_or_reuse(tmp_path, "corpus", "k1", {}, ui, False, build)
    assert not cached and (path / "data.bin").read_bytes() == b"abc" and store.is_done(path)
    assert stages.build_or_reuse(tmp_path, "corpus", "k1", {}, ui, False, build) == (path, True)
    assert stages.build_or_reuse(tmp_path, "corpus", "k1", {}, ui, True, build) == (path, False)  # fresh
    (path / "data.bin").write_bytes(b"ab")
    assert stages.build_or_reuse(tmp_path, "corpus", "k1", {}, ui, False, build) == (path, False)
    assert len(builds) == 3 and any("incomplete or corrupt (data.bin)" in m for m in ui.messages)
    assert not list(tmp_path.glob(".corpus-k1*"))


# ------------------------------------------------------------------------------ tensor trees

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=True),
                    st.text(max_size=8))


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return (torch.randn(shape, generator=g) * 100).to(dtype)


TREES = st.recursive(st.one_of(SCALARS, tensors()), lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-5, 5)), kids, max_size=3)), max_leaves=12)


def same_tree(a, b) -> bool:
    """Structural equality: same container types, dict keys with their types, tensors equal
    in dtype, shape and values, floats equal (NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@settings(max_examples=40, deadline=None)
@given(tree=TREES)
def test_tensor_tree_round_trips_exactly(tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("tree") / "state.safetensors"
    store.save_tree(path, {"state": tree})
    assert same_tree(store.load_tree(path), {"state": tree})


def test_optimiser_state_survives_the_round_trip(tmp_path):
    """Muon + Adam restored from a state file continue exactly like the original optimiser."""
    torch.manual_seed(0)
    params = {"proj.weight": torch.nn.Parameter(torch.randn(4, 3)), "gate": torch.nn.Parameter(torch.randn(2))}

    def step(ps, opt):
        loss = (ps["proj.weight"].sin().sum() + ps["gate"].pow(2).sum())
        loss.backward()
        opt.step()
        opt.zero_grad()

    opt = CellOptimizer(params.items(), 0.01)
    for _ in range(3):
        step(params, opt)
    store.save_tree(tmp_path / "s.safetensors", {"opt": opt.state_dict(),
                                                  "params": {k: v.detach() for k, v in params.items()}})
    saved = store.load_tree(tmp_path / "s.safetensors")
    twin = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    twin_opt = CellOptimizer(twin.items(), 0.01)
    twin_opt.load_state_dict(saved["opt"])
    for _ in range(2):
        step(params, opt)
        step(twin, twin_opt)
    assert all(torch.equal(params[k], twin[k]) for k in params)


def test_damaged_or_foreign_state_files_are_input_errors(tmp_path):
    path = tmp_path / "state.safetensors"
    store.save_tree(path, {"step": 5, "w": torch.ones(100)})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(InputError, match="not a readable state file"):
        store.load_tree(path)
    save_file({"w": torch.ones(2)}, str(path))  # a safetensors file not written by save_tree
    with pytest.raises(InputError):
        store.load_tree(path)
    with pytest.raises(TypeError):
        store.save_tree(path, {"bad": object()})


def test_check_tensor_names_shape_and_dtype(tmp_path):
    store.check_tensor(torch.zeros(3, 4), "table", (3, None), torch.float32, tmp_path / "t")
    with pytest.raises(InputError, match=r"table is \(3, 4\) torch.float32, expected \[5, \*\] torch.float32"):
        store.check_tensor(torch.zeros(3, 4), "table", (5, None), torch.float32, tmp_path / "t")
    with pytest.raises(InputError, match="int64"):
        store.check_tensor(torch.zeros(3), "tokens", (None,), torch.int64, tmp_path / "t")


# ------------------------------------------------------------------------------------ locks

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _holder(code: str, *args: str, then: str = "pass") -> subprocess.Popen:
    """A process that runs `code` (taking a lock), prints 'held', sleeps argv[2] seconds, runs
    `then` while still holding it, and exits (the kernel releases its locks)."""
    proc = subprocess.Popen([sys.executable, "-c", f"import sys, time; from ablate.pipeline import store; {code}; "
                             f"print('held', flush=True); time.sleep(float(sys.argv[2])); {then}", *args],
                            env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_lock_refuses_a_second_writer_and_survives_sigkill(tmp_path):
    holder = _holder("store.RunLock(sys.argv[1]).__enter__()", str(tmp_path), "600")
    try:
        with pytest.raises(AblateError, match=f"pid {holder.pid} on"):
            with store.RunLock(tmp_path):
                pass
        assert store.is_locked(tmp_path / store.RUN_LOCK)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not store.is_locked(tmp_path / store.RUN_LOCK)  # the kernel dropped the dead holder's lock
    with store.RunLock(tmp_path):
        with pytest.raises(AblateError, match=f"pid {os.getpid()}"):  # one writer, even in one process
            with store.RunLock(tmp_path):
                pass


def test_stage_lock_waits_for_the_process_computing_the_entry(tmp_path):
    marker = tmp_path / "holder-finished"
    holder = _holder("held = store.stage_lock(sys.argv[1], 'oracle-k', print); held.__enter__()", str(tmp_path), "0.5",
                     then=f"open({str(marker)!r}, 'w').close()")
    waits = []
    with store.stage_lock(tmp_path, "oracle-k", waits.append):
        finished_first = marker.exists()  # written by the holder while it still held the lock
    holder.wait()
    assert len(waits) == 1 and f"pid {holder.pid}" in waits[0] and "computing oracle-k" in waits[0]
    assert finished_first


# ---------------------------------------------------------------------------- cell directories


def test_prepare_dir_keeps_a_matching_state_and_drops_a_bad_one(tmp_path):
    cell_dir = tmp_path / "cell"
    ident = cells.identity("k1", {"backbone": "b", "oracle": "o"})
    assert cells.prepare_dir(cell_dir, ident, print) is None
    cells.save_state(cell_dir, {"step": 5, "w": torch.ones(2)})
    (cell_dir / ".metrics.csv.abc.tmp").write_text("half")
    state = cells.prepare_dir(cell_dir, ident, print)
    assert state["step"] == 5 and not list(cell_dir.glob("*.tmp"))

    warnings = []
    (cell_dir / cells.STATE_FILE).write_bytes(b"\x00garbage")
    assert cells.prepare_dir(cell_dir, ident, warnings.append) is None
    assert "restarts from step 0" in warnings[0] and not (cell_dir / cells.STATE_FILE).exists()

    cells.save_state(cell_dir, {"step": 5})
    other_oracle = cells.identity("k1", {"backbone": "b", "oracle": "o2"})
    assert cells.prepare_dir(cell_dir, other_oracle, print) is None  # trained on another oracle: start over
    assert cells.recorded_identity(cell_dir) == other_oracle


# ------------------------------------------------------------------------------------ clean


def test_clean_removes_unreferenced_and_half_written_entries_only(tmp_path, monkeypatch, capsys):
    cache, runs = tmp_path / ".ablate-cache", tmp_path / "runs"
    for name in ("corpus-aaa", "oracle-bbb", "oracle-ccc", "teacher-ddd", ".oracle-eee.x1.tmp"):
        (cache / name).mkdir(parents=True)
    store.write_json(runs / "done" / "results.json", {"stages": {"corpus": {"key": "aaa"}, "cells": {"key": ""}}})
    store.write_json(runs / "interrupted" / "stages.json", {"oracle": "bbb"})
    monkeypatch.chdir(tmp_path)
    assert cli.main(["clean", "--dry-run"]) == 0
    assert len(list(cache.iterdir())) == 5
    assert cli.main(["clean"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == ["corpus-aaa", "oracle-bbb"]

    holder = _holder("store.RunLock(sys.argv[1]).__enter__()", str(runs / "interrupted"), "600")
    try:
        assert cli.main(["clean"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# --------------------------------------------------------------------------------- security

SOURCES = sorted((ROOT / "ablate").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))


def test_nothing_is_unpickled_or_evaluated():
    """Artifacts are safetensors or JSON: no pickle, no torch.load without weights_only=True, no
    numpy.load with pickles, no eval/exec of text; spec expressions go through ablate.config.expr's parser.
    The one reader of foreign pickles (a reference checkpoint.pt) is ablate.model.safe_pickle, a
    restricted unpickler that never calls pickle's own loaders (its behaviour: test_reference_import)."""
    restricted = ROOT / "ablate" / "model" / "safe_pickle.py"
    for path in SOURCES:
        text = path.read_text()
        where = path.relative_to(ROOT)
        if path == restricted:
            assert not re.search(r"pickle\.(loads?|Unpickler)\(|torch\.load\(", text), where
        else:
            assert not re.search(r"^\s*(import|from)\s+(pickle|dill|cloudpickle|marshal|shelve)\b", text, re.M), where
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), where
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), where
        for call in re.finditer(r"\b(?:np|numpy)\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call.group(1), where
        assert "yaml.load(" not in text, where


def test_spec_expressions_are_parsed_not_evaluated():
    assert expr.evaluate("log_vocab - 0.1", {"log_vocab": 2.0}) == pytest.approx(1.9)
    for text in ("__import__('os').system('true')", "(lambda: 1)()", "log_vocab.__class__", "[1][0]"):
        with pytest.raises(expr.ExprError):
            expr.evaluate(text, {"log_vocab": 2.0})
