"""The plugin manager: built-ins arrive through entry points, local files through --plugin,
a misspelled hook or a broken plugin is reported, and a pip-installed third-party package works."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ablate import cli
from ablate.errors import AblateError
from ablate.plugins import load_registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "examples" / "ablate-example-objective"


def test_builtins_come_from_the_entry_point_group():
    reg = load_registry()
    assert {"ce", "kl_ce", "temperature_kl", "masked_kl", "jsd"} <= set(reg.names("objective"))
    assert {"synthetic", "text-files", "llama-local", "hf-causal-lm", "tinyllama"} <= set(reg.names("corpus") + reg.names("teacher"))
    assert reg.components["objective"]["ce"].source.startswith("ablate ")  # distribution name + version


def test_unknown_name_lists_available():
    with pytest.raises(AblateError, match=r"Unknown objective plugin 'klce'. Available: .*kl_ce"):
        load_registry().get("objective", "klce")


def test_misspelled_hook_is_an_error(tmp_path):
    f = tmp_path / "typo.py"
    f.write_text("from ablate import hookimpl\n@hookimpl\ndef ablate_objective(register):\n    pass\n")
    with pytest.raises(AblateError, match="ablate_objective"):
        load_registry([f])


def test_local_plugin_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent("""
        from ablate import hookimpl
        from ablate.components import Objective, ObjectiveResult
        from ablate.losses import cross_entropy

        class Half(Objective):
            name = "half_ce"
            def formula(self):
                return "L = CE/2"
            def __call__(self, batch):
                ce = cross_entropy(batch.logits, batch.targets)
                return ObjectiveResult(ce / 2, {"ce": ce.detach()})

        @hookimpl
        def ablate_objectives(register):
            register(Half)
    """))
    reg = load_registry([f])
    assert reg.components["objective"]["half_ce"].source == str(f)


def test_local_plugin_that_fails_to_import(tmp_path, capsys):
    f = tmp_path / "broken.py"
    f.write_text("import no_such_module_xyz\n")
    assert cli.main(["plugins", "--plugin", str(f)]) == 2
    err = capsys.readouterr().err
    assert "broken.py failed to import" in err and "no_such_module_xyz" in err


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """pip-install the example package into an isolated target directory, as a stranger would."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name  # build outside the repo
    shutil.copytree(EXAMPLE, source)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def _ablate(args, target, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "ablate.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=600)


def test_pip_installed_package_is_listed(installed_example):
    out = _ablate(["plugins"], installed_example)
    assert out.returncode == 0, out.stderr
    assert "smoothed_ce" in out.stdout and "ablate-example-objective 0.2.0" in out.stdout


@pytest.mark.slow
def test_pip_installed_objective_runs_a_spec(installed_example, tmp_path):
    spec = (ROOT / "specs" / "demo.toml").read_text()
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "third.toml").write_text(spec.replace('name = "demo"', 'name = "third"'))
    out = _ablate(["run", "specs/third.toml", "--profile", "tiny", "--quiet", "--device", "cpu",
                   "--set", "cells.0.objective={name=\"smoothed_ce\", epsilon=0.2}"], installed_example, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    results = json.loads((tmp_path / "runs" / "third" / "results.json").read_text())
    cell = results["cells"]["router_off_real"]
    assert cell["status"] == "done" and "ε = 0.2" in cell["objective_formula"]
