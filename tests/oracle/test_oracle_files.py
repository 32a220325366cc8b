"""An oracle from files (`[oracle] source = "files"`, ablate.oracle.files): the reference's
oracle files (§4.4, §11.3) are checked before any cell trains, imported once per content, and a
spec using them runs end to end; nothing here touches the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ablate.oracle import files as oracle_files

from ablate.pipeline import stages
from ablate.errors import InputError, SpecError
from ablate.config.spec import OracleSpec, load_spec
from cli_run import ablate_in
from oracle_fixtures import DIM, ROWS, VOCAB, file_sets, write_reference_oracle

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "specs" / "demo.toml"
TINY = load_spec(DEMO, [], "tiny")
SPEC_ARGS = ["demo.toml", "--profile", "tiny", "--set", "backbone.pretrain.steps=2", "--set", "teacher.steps=2",
             "--set", "train.steps=6", "--device", "cpu", "--quiet"]


def oracle_spec(files: dict[str, Path], **changes) -> OracleSpec:
    fields = {**TINY.oracle.model_dump(exclude={"source", "table", "sidecar", "stats", "shuffled_table",
                                                "shuffled_sidecar"}),
              "source": "files", **{k: str(v) for k, v in files.items()}, **changes}
    return OracleSpec(**fields)


# ------------------------------------------------------------------------------------ spec


def test_spec_needs_table_and_sidecar_for_files_and_none_for_teacher():
    with pytest.raises(ValueError, match="needs `table"):
        OracleSpec(source="files", table="a.safetensors")
    with pytest.raises(ValueError, match='source = "teacher"'):
        OracleSpec(table="a.safetensors")
    with pytest.raises(ValueError, match="both shuffled_table and shuffled_sidecar"):
        OracleSpec(source="files", table="a", sidecar="b", shuffled_table="c")
    with pytest.raises(SpecError, match="oracle"):
        load_spec(DEMO, ['oracle.source="files"'], "tiny")


def test_a_computed_oracles_key_ignores_the_file_fields(monkeypatch):
    seen = []
    monkeypatch.setattr(stages, "stage_key", lambda stage, config, inputs, components=(): seen.append(config) or "k")
    stages.oracle_key(TINY, "teacher-key", "corpus-key")
    old = TINY.oracle.model_dump(exclude={"teacher_max_ce", "teacher_health", "source", "table", "sidecar", "stats",
                                          "shuffled_table", "shuffled_sidecar", *stages.CONTROL_SEEDS})
    assert seen == [old]  # no file fields (nor control seeds: they are the control cells' keys)


# ---------------------------------------------------------------------------------- import


def test_import_reads_the_reference_format(tmp_path):
    files = write_reference_oracle(tmp_path)
    o = oracle_spec(files)
    oracle = oracle_files.import_oracle(o, VOCAB)
    assert oracle.table.dtype == torch.float32 and oracle.sidecar.dtype == torch.float32
    assert tuple(oracle.sidecar.shape) == (ROWS, VOCAB)
    assert torch.equal(oracle.populated, torch.arange(ROWS) % 7 != 3)
    assert torch.equal(oracle.counts, oracle.populated.long())
    assert torch.equal(oracle.sidecar.to(torch.bfloat16).to(torch.float32), oracle.sidecar)  # exact upcast
    s = oracle.stats
    assert s["origin"] == "files" and s["populated_rows"] == int(oracle.populated.sum())
    assert s["imported"]["sidecar_dtype"] == "bfloat16"
    assert s["imported"]["stats"]["pca_explained_variance_ratio_total"] == 0.9338690864205668
    assert set(s["imported"]["files"]) == set(files)
    assert s["shuffled_twin"] == {"given": True, "matches_shuffle_seed": True, "shuffle_seed": 0,
                                  "rows_moved": s["shuffled_twin"]["rows_moved"]}
    from ablate.oracle.build import shuffled

    built = shuffled(oracle, 0)
    assert torch.equal(oracle.shuffled_twin.table, built.table)
    assert torch.equal(oracle.shuffled_twin.sidecar, built.sidecar)


def test_stats_default_beside_the_table_and_twin_optional(tmp_path):
    files = write_reference_oracle(tmp_path)
    oracle = oracle_files.import_oracle(oracle_spec({k: files[k] for k in ("table", "sidecar")}), VOCAB)
    assert oracle.shuffled_twin is None and oracle.stats["shuffled_twin"]["given"] is False
    assert oracle.stats["imported"]["stats"]["teacher"] == "TinyLlama/TinyLlama_v1.1"  # <table>.stats.json found


def test_another_permutation_is_accepted_and_reported(tmp_path):
    files = write_reference_oracle(tmp_path)
    oracle = oracle_files.import_oracle(oracle_spec(files, shuffle_seed=5), VOCAB)
    assert oracle.stats["shuffled_twin"]["matches_shuffle_seed"] is False
    assert oracle.stats["shuffled_twin"]["rows_moved"] > 0


def _rewrite(path: Path, name: str, tensor: torch.Tensor) -> None:
    save_file({name: tensor.contiguous()}, path)


BAD = {
    "wrong tensor name": (lambda f: _rewrite(f["table"], "weight", torch.ones(ROWS, DIM)), "holds no tensor 'engram.weight'"),
    "wrong rows": (lambda f: _rewrite(f["table"], "engram.weight", torch.ones(ROWS + 1, DIM)), f"rows = {ROWS + 1}"),
    "wrong engram_dim": (lambda f: _rewrite(f["table"], "engram.weight", torch.ones(ROWS, DIM + 2)),
                         f"engram_dim = {DIM + 2}"),
    "wrong dtype": (lambda f: _rewrite(f["table"], "engram.weight", torch.ones(ROWS, DIM, dtype=torch.float16)),
                    "is F16, expected F32"),
    "wrong vocabulary": (lambda f: _rewrite(f["sidecar"], "teacher_logits.weight",
                                            torch.ones(ROWS, VOCAB + 1, dtype=torch.bfloat16)), "the corpus"),
    "unequal masks": (lambda f: _rewrite(f["sidecar"], "teacher_logits.weight",
                                         torch.ones(ROWS, VOCAB, dtype=torch.bfloat16)), "disagree on"),
    "non-finite": (lambda f: _rewrite(f["table"], "engram.weight", torch.full((ROWS, DIM), float("nan"))), "NaN"),
    "other hash seeds": (lambda f: f["stats"].write_text(json.dumps({"hash_seeds": [1, 2]})), "seeds = [1, 2]"),
    "twin not a permutation": (lambda f: _rewrite(f["shuffled_table"], "engram.weight",
                                                  load_file(f["shuffled_table"])["engram.weight"] * 2),
                               "not one row permutation"),
    "not safetensors": (lambda f: f["sidecar"].write_bytes(b"junk"), "not a readable safetensors file"),
    "missing file": (lambda f: f["sidecar"].unlink(), "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_input_errors_naming_the_fix(tmp_path, case):
    files = write_reference_oracle(tmp_path)
    damage, message = BAD[case]
    damage(files)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        oracle_files.import_oracle(oracle_spec(files), VOCAB)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """One tiny run of the demo on imported files → (cwd, files, results)."""
    cwd = tmp_path_factory.mktemp("oracle_files")
    shutil.copy(DEMO, cwd / "demo.toml")
    files = write_reference_oracle(cwd / "reference")
    with pytest.MonkeyPatch.context() as mp:
        code = ablate_in(cwd, mp, "run", *SPEC_ARGS, *file_sets(files))
    assert code == 0
    return cwd, files, json.loads((cwd / "runs" / "demo" / "results.json").read_text())


@pytest.mark.slow
def test_a_spec_on_reference_files_runs_end_to_end(imported_run):
    cwd, files, results = imported_run
    oracle = results["oracle"]
    assert oracle["origin"] == "files" and oracle["imported"]["sidecar_dtype"] == "bfloat16"
    assert oracle["shuffled_twin"]["matches_shuffle_seed"] is True
    assert oracle["imported"]["files"]["table"]["path"] == str(files["table"])
    assert all(c["status"] == "done" for c in results["cells"].values())
    report = (cwd / "reports" / "demo.md").read_text()
    assert "### Oracle imported from files" in report and "| 0.9339 | — |" in report
    assert "`pca_explained_variance_ratio_total`" in report


@pytest.mark.slow
def test_a_second_run_is_fully_cached_and_plan_says_so(imported_run, monkeypatch):
    cwd, files, first = imported_run
    assert ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *file_sets(files)) == 0
    results = json.loads((cwd / "runs" / "demo" / "results.json").read_text())
    assert all(s["cached"] for s in results["stages"].values()), results["stages"]
    assert results["stages"]["oracle"]["key"] == first["stages"]["oracle"]["key"]
    plan = plan_of(cwd, files)
    assert plan["oracle"] == {"key": first["stages"]["oracle"]["key"], "status": "cached"}
    assert plan["teacher"]["status"] == "not needed (oracle from files)"  # no teacher pass, nothing to prepare
    assert {row["status"] for n, row in plan.items() if n != "teacher"} == {"cached", "always rewritten (cheap)"}
    moved = {role: cwd / "moved" / p.name for role, p in files.items()}  # the key is the files' content
    shutil.copytree(files["table"].parent, cwd / "moved")
    assert plan_of(cwd, moved)["oracle"] == plan["oracle"]
    changed = write_reference_oracle(cwd / "changed", seed=1)
    assert plan_of(cwd, changed)["oracle"]["status"] == "would run (not built)"


def plan_of(cwd: Path, files: dict[str, Path]) -> dict[str, dict]:
    """`ablate plan` of the run above as data: name → {key, status}."""
    from ablate.pipeline.engine import Experiment, resolve_device
    from ablate.api.plugins import load_registry
    from ablate.pipeline.ui import QuietUI

    registry = load_registry()
    sets = [a for a in SPEC_ARGS[3:-3] if a != "--set"] + [f'oracle.{r}="{p}"' for r, p in files.items()]
    spec = load_spec(cwd / "demo.toml", [*sets, 'oracle.source="files"'], "tiny", registry)
    rows = Experiment(spec, registry, resolve_device("cpu"), QuietUI(), root=cwd).plan()
    return {row["name"]: {"key": row["key"], "status": row["status"]} for row in rows}


BAD_RUNS = ["wrong tensor name", "wrong rows", "wrong vocabulary", "unequal masks"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_files_stop_the_run_before_any_cell(imported_run, monkeypatch, capsys, case):
    cwd, _, _ = imported_run  # its cache: the stages before the oracle are reused
    files = write_reference_oracle(cwd / f"bad-{BAD_RUNS.index(case)}")
    BAD[case][0](files)
    name = f"bad{BAD_RUNS.index(case)}"
    code = ablate_in(cwd, monkeypatch, "run", *SPEC_ARGS, *file_sets(files), "--set", f"name={name}")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert "[oracle]" in err and BAD[case][1] in err
    assert not (cwd / "runs" / name / "cells").exists()
