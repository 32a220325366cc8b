"""Every bad input is a clear error before work starts: exit 2, no traceback (`--debug` shows it).

Each case runs `ablate run` in this process on the demo spec (tiny profile) with one change, and
checks the exit code, that the message names the problem, and that no work was done: at most
the corpus was read (the cases only a read corpus can reveal), no backbone, teacher or cell.
"""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ablate.cli import main as cli
from ablate.errors import SpecError
from ablate.api.plugins import load_registry
from ablate.config.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
SPEC = ["demo.toml", "--profile", "tiny"]
REGISTRY = load_registry()


def _teacher_with_vocab(cwd: Path, vocab: int) -> list[str]:
    """A local HF Llama config with another vocabulary (random_init needs no weights)."""
    folder = cwd / "teacher"
    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return ["--set", f'teacher={{ plugin = "hf-causal-lm", model = "{folder}", random_init = true }}',
            "--set", 'axes.teacher="hf-causal-lm"']


def _empty_corpus(cwd: Path) -> list[str]:
    (cwd / "texts").mkdir()
    (cwd / "texts" / "empty.txt").write_text("")
    return ["--set", 'corpus={ plugin = "text-files", path = "texts", vocab_size = 300 }']


CASES = {
    # name: (extra arguments (or a function of the working directory giving them), words the message must hold)
    "spec file missing": ([], "does not exist"),
    "corpus folder missing": (["--set", 'corpus={ plugin = "text-files", path = "no/such/folder" }'],
                              "no/such/folder"),
    "backbone checkpoint missing": (["--set", 'backbone.source="checkpoint"', "--set",
                                     'backbone.checkpoint="missing-backbone.safetensors"'], "missing-backbone.safetensors"),
    "plugin file missing": (["--plugin", "no_such_plugin.py"], "no_such_plugin.py"),
    "teacher vocabulary differs from the backbone's": (lambda cwd: _teacher_with_vocab(cwd, 100), "vocab_size 100"),
    "lambda outside [0, 1]": (["--set", "cells.2.objective.lambda=1.5"], "cells[2].objective.lambda"),
    "empty corpus": (_empty_corpus, "contains no text"),
    "seq_len longer than the corpus": (["--set", "corpus.n_tokens=1000"], "longer than the corpus"),
    "zero rows": (["--set", "oracle.rows=0"], "oracle.rows"),
    "threshold on a metric nothing produces": (["--set", 'thresholds.0.metric="nothing_measures_this"'],
                                               "no probe produces metric 'nothing_measures_this'"),
    "duplicate cell names": (["--set", 'cells.1.name="router_off_real"'], "duplicate cell name 'router_off_real'"),
}


def run_case(name: str, cwd: Path, monkeypatch, debug: bool = False) -> int:
    shutil.copy(DEMO, cwd / "demo.toml")
    extra, _ = CASES[name]
    extra = extra(cwd) if callable(extra) else extra
    spec = ["missing.toml", *SPEC[1:]] if name == "spec file missing" else SPEC
    monkeypatch.chdir(cwd)
    return cli.main(["run", *spec, "--device", "cpu", "--quiet", *extra, *(["--debug"] if debug else [])])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clear_error_before_work(name, tmp_path, monkeypatch, capsys):
    code = run_case(name, tmp_path, monkeypatch)
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    assert CASES[name][1] in " ".join(err.split()), err
    cache = tmp_path / ".ablate-cache"
    assert not [p for p in cache.glob("*") if not p.name.startswith("corpus-") and p.name != ".locks"]
    assert not (tmp_path / "runs" / "demo" / "cells").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    assert run_case("teacher vocabulary differs from the backbone's", tmp_path, monkeypatch, debug=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "InputError" in err


# ------------------------------------------------------------------------------ fuzzing

OVERRIDABLE = ["train.steps", "train.seq_len", "train.lr", "train.batch", "oracle.rows", "oracle.seq_len",
               "oracle.engram_dim", "model.top_k", "model.inject_layers", "model.num_heads", "corpus.vocab_size",
               "corpus.n_tokens", "teacher.hidden_size", "teacher.steps", "backbone.num_kv_heads", "backbone.source",
               "cells.2.objective.lambda", "cells.1.name", "cells.0.oracle", "cells.3.router", "thresholds.0.metric",
               "thresholds.1.cells", "probes.batch", "combine.broken_at", "discriminator.0.real", "seed", "name"]
VALUES = st.one_of(st.integers(-3, 700), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.sampled_from(["real", "router_on_real", "checkpoint", "alpha", "x y", ""]),
                   st.lists(st.integers(-2, 9), max_size=3))


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(OVERRIDABLE), VALUES), min_size=1, max_size=3))
def test_mutated_specs_never_traceback_and_invalid_never_exit_0(changes, tmp_path, monkeypatch, capsys):
    """`ablate plan` (spec, plugins, preflight checks, keys; no training) on mutated specs."""
    shutil.copy(DEMO, tmp_path / "demo.toml")
    sets = [f"{key}={toml_value(value)}" for key, value in changes]
    monkeypatch.chdir(tmp_path)
    code = cli.main(["plan", *SPEC, *[a for s in sets for a in ("--set", s)]])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    try:
        spec_from_dict(tomllib.loads(DEMO.read_text()), sets, "tiny", REGISTRY)
    except SpecError:
        assert code == 2, err
    else:
        assert code in (0, 2)
        assert code == 0 or err.startswith("error:"), err
