"""The plugin manager: built-ins arrive through entry points, local files through --plugin,
a misspelled hook or a broken plugin is reported, and a pip-installed third-party package works."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ablate.cli import main as cli
from ablate.errors import AblateError
from ablate.api.plugins import load_registry

from cli_run import ablate_in

pytestmark = pytest.mark.seconds(39)  # on one core (tests/conftest.py: longest files first)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "plugins" / "examples" / "ablate-example-objective"
EXAMPLE_PROBE = ROOT / "plugins" / "examples" / "ablate-example-probe"


def test_builtins_come_from_the_entry_point_group():
    reg = load_registry()
    assert {"ce", "kl_ce", "temperature_kl", "masked_kl", "jsd"} <= set(reg.names("objective"))
    assert {"synthetic", "text-files", "llama-local", "hf-causal-lm", "tinyllama"} <= set(reg.names("corpus") + reg.names("teacher"))
    assert reg.components["objective"]["ce"].source.startswith("ablate ")  # distribution name + version


def test_unknown_name_lists_available():
    with pytest.raises(AblateError, match=r"Unknown objective plugin 'klce'. Available: .*kl_ce"):
        load_registry().get("objective", "klce")


def _objective_plugin(path: Path, name: str, typo: str | None = None) -> Path:
    """Write a --plugin file registering a CE objective `name`, plus an empty hook `typo` if given."""
    extra = f"@hookimpl\ndef {typo}(register):\n    pass\n" if typo else ""
    path.write_text(textwrap.dedent(f"""
        from ablate import hookimpl
        from ablate.api.components import Objective, ObjectiveResult
        from ablate.training.losses import cross_entropy

        class Mine(Objective):
            name = {name!r}
            def formula(self):
                return "L = CE"
            def __call__(self, batch):
                ce = cross_entropy(batch.logits, batch.targets)
                return ObjectiveResult(ce, {{"ce": ce.detach()}})

        @hookimpl
        def ablate_objectives(register):
            register(Mine)
    """) + extra)
    return path


def test_misspelled_hook_marks_only_that_plugin_broken(tmp_path):
    f = _objective_plugin(tmp_path / "typo.py", "typo_ce", typo="ablate_objective")
    reg = load_registry([f])
    assert "implements hook 'ablate_objective'" in reg.broken[str(f)]
    assert "did you mean 'ablate_objectives'?" in reg.broken[str(f)]
    assert "typo_ce" not in reg.names("objective")  # left out whole: its good hook is not used either
    assert "kl_ce" in reg.names("objective")


def test_plugins_command_lists_a_misspelled_hook_as_broken(tmp_path, monkeypatch, capsys):
    f = _objective_plugin(tmp_path / "typo.py", "typo_ce", typo="ablate_probe")
    assert ablate_in(ROOT, monkeypatch, "plugins", "--plugin", str(f)) == 0
    out = capsys.readouterr().out
    assert f"broken plugin {f}" in out and "'ablate_probe'" in out and "did you mean 'ablate_probes'?" in out
    assert "kl_ce" in out


def test_broken_plugin_fails_only_the_specs_that_use_it(tmp_path, monkeypatch, capsys):
    f = _objective_plugin(tmp_path / "typo.py", "typo_ce", typo="ablate_probe")
    spec = str(ROOT / "specs" / "demo.toml")
    assert ablate_in(tmp_path, monkeypatch, "validate", spec, "--plugin", str(f)) == 0
    capsys.readouterr()
    assert ablate_in(tmp_path, monkeypatch, "validate", spec, "--plugin", str(f),
                     "--set", 'cells.0.objective={name="typo_ce"}') == 2
    err = capsys.readouterr().err
    assert "Unknown objective plugin 'typo_ce'" in err and str(f) in err and "did you mean 'ablate_probes'?" in err


def test_a_failing_hook_or_a_bad_registration_is_broken_not_fatal(tmp_path):
    raises = tmp_path / "raises.py"
    raises.write_text("from ablate import hookimpl\n@hookimpl\ndef ablate_probes(register):\n    raise RuntimeError('boom')\n")
    bad = tmp_path / "bad.py"
    bad.write_text("from ablate import hookimpl\n@hookimpl\ndef ablate_objectives(register):\n    register(object)\n")
    reg = load_registry([raises, bad])
    assert "RuntimeError: boom" in reg.broken[str(raises)]
    assert "not an ablate.api.components.Component" in reg.broken[str(bad)]
    assert "kl_ce" in reg.names("objective")


def test_two_plugins_registering_one_name_conflict(tmp_path, monkeypatch, capsys):
    a = _objective_plugin(tmp_path / "a.py", "dup_ce")
    b = _objective_plugin(tmp_path / "b.py", "dup_ce")
    spec = str(ROOT / "specs" / "demo.toml")
    plugins = ["--plugin", str(a), "--plugin", str(b)]
    assert ablate_in(tmp_path, monkeypatch, "validate", spec, *plugins) == 0  # a spec not using it runs
    assert ablate_in(tmp_path, monkeypatch, "plugins", *plugins) == 0
    out = capsys.readouterr().out
    assert "conflict" in out and str(a) in out and str(b) in out
    assert ablate_in(tmp_path, monkeypatch, "validate", spec, *plugins, "--set", 'cells.0.objective={name="dup_ce"}') == 2
    err = capsys.readouterr().err
    assert "'dup_ce' is registered by more than one plugin" in err and str(a) in err and str(b) in err
    assert "Uninstall one" in err


def test_the_same_plugin_file_twice_is_not_a_conflict(tmp_path):
    a = _objective_plugin(tmp_path / "a.py", "dup_ce")
    reg = load_registry([a, a])
    assert reg.get("objective", "dup_ce").name == "dup_ce" and not reg.conflicts and not reg.broken


def test_local_plugin_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(textwrap.dedent("""
        from ablate import hookimpl
        from ablate.api.components import Objective, ObjectiveResult
        from ablate.training.losses import cross_entropy

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


def _pip_install(package: Path, tmp_path_factory) -> Path:
    """pip-install an example package into an isolated target directory, as a stranger would
    (offline: no dependencies, no build isolation)."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / package.name  # build outside the repo
    shutil.copytree(package, source)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    return _pip_install(EXAMPLE, tmp_path_factory)


def _ablate(args, target, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "ablate.cli.main", *args], capture_output=True, text=True, env=env,
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


def test_two_plugins_registering_one_probe_name_stop_a_run_before_any_work(tmp_path, monkeypatch, capsys):
    """A spec that selects a probe name two plugins claim fails `run` at once, not after the cells
    have trained."""
    probe = textwrap.dedent("""
        from ablate import hookimpl
        from ablate.api.components import Probe

        class Twice(Probe):
            name = "claimed_twice"
            def run(self, cell):
                return {}

        @hookimpl
        def ablate_probes(register):
            register(Twice)
    """)
    (tmp_path / "a.py").write_text(probe)
    (tmp_path / "b.py").write_text(probe)
    (tmp_path / "demo.toml").write_text((ROOT / "specs" / "demo.toml").read_text())
    code = ablate_in(tmp_path, monkeypatch, "run", "demo.toml", "--profile", "tiny", "--device", "cpu", "--quiet",
                     "--plugin", str(tmp_path / "a.py"), "--plugin", str(tmp_path / "b.py"),
                     "--set", 'probes.use=["builtins", "claimed_twice"]')
    err = capsys.readouterr().err
    assert code == 2 and "'claimed_twice' is registered by more than one plugin" in err
    assert not (tmp_path / ".ablate-cache").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ the example probe package


@pytest.fixture(scope="module")
def installed_probe(tmp_path_factory):
    return _pip_install(EXAMPLE_PROBE, tmp_path_factory)


PROBE_RUN = ["--profile", "tiny", "--quiet", "--device", "cpu", "--set", "backbone.pretrain.steps=2",
             "--set", "teacher.steps=2", "--set", "train.steps=6"]


def test_example_probe_package_is_listed_and_validated(installed_probe):
    out = _ablate(["plugins"], installed_probe)
    assert out.returncode == 0, out.stderr
    assert "next-token-accuracy" in out.stdout and "ablate-example-probe 0.1.0" in out.stdout
    ok = _ablate(["validate", "specs/demo.toml", "--set", 'probes.use=["builtins", "next-token-accuracy"]',
                  "--set", "probes.next-token-accuracy={k=3}"], installed_probe)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _ablate(["validate", "specs/demo.toml", "--set", 'probes.use=["builtins", "next-token-accuracy"]',
                   "--set", "probes.next-token-accuracy={k=0, top=2}"], installed_probe)
    assert bad.returncode == 2
    assert "probes.next-token-accuracy.k" in bad.stderr and "probes.next-token-accuracy.top" in bad.stderr
    assert "probe 'next-token-accuracy' accepts: k" in bad.stderr


@pytest.fixture(scope="module")
def probe_runs(installed_probe, tmp_path_factory):
    """The demo at a few steps in one directory: first with the example probe listed (k = 3), then
    with the default `use` (the cells are reused) → {"listed": results, "default": results}."""
    import json

    cwd = tmp_path_factory.mktemp("probe_run")
    (cwd / "specs").mkdir()
    (cwd / "specs" / "probed.toml").write_text((ROOT / "specs" / "demo.toml").read_text().replace(
        'name = "demo"', 'name = "probed"'))
    out = {}
    for label, sets in [("listed", ["--set", 'probes.use=["builtins", "next-token-accuracy"]',
                                    "--set", "probes.next-token-accuracy={k=3}"]),
                        ("default", [])]:
        run = _ablate(["run", "specs/probed.toml", *PROBE_RUN, *sets], installed_probe, cwd=cwd)
        assert run.returncode == 0, run.stdout + run.stderr
        out[label] = (json.loads((cwd / "runs" / "probed" / "results.json").read_text()),
                      (cwd / "reports" / "probed.md").read_text())
    return out


@pytest.mark.slow
def test_a_listed_example_probe_runs_and_appears_in_the_report(probe_runs):
    results, report = probe_runs["listed"]
    for cell in results["cells"].values():
        acc = cell["metrics"]["next_token_topk_acc"]
        assert 0.0 <= acc <= 1.0 and {"inj_rms_L2", "inj_rms_L5"} <= cell["metrics"].keys()
    info = results["metric_info"]["next_token_topk_acc"]  # its metadata travels with the results
    assert info["unit"] == "fraction, in [0, 1]" and info["section"] == "next-token accuracy (example probe)"
    assert "### next-token accuracy (example probe)" in report and "| next_token_topk_acc |" in report
    assert "**next_token_topk_acc** [fraction, in [0, 1]]" in report


@pytest.mark.slow
def test_an_example_probe_not_listed_does_not_run(probe_runs):
    results, report = probe_runs["default"]
    assert all("next_token_topk_acc" not in c["metrics"] for c in results["cells"].values())
    assert "next_token_topk_acc" not in results["metric_meanings"] and "next_token_topk_acc" not in report
    assert "engram_logit_entropy" in results["cells"]["router_on_real"]["metrics"]  # the built-ins ran
