"""results.json through the Results model: a run's file reads back unchanged, and a file that is
not a results.json (another tool's JSON, a broken edit, a missing one) is refused by `ablate
report` with a paragraph naming the file, exit 2 (bad input) and no traceback."""

import contextlib
import io
import json
import shutil

import pytest

from ablate.errors import AblateError
from ablate.verdicts.schema import Results, read_results
from cli_run import ablate_in
from report_fixtures import make_results


def test_a_results_file_reads_back_unchanged(tmp_path):
    results = make_results(tmp_path)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert read_results(path) == json.loads(json.dumps(results))  # nothing added, nothing dropped


@pytest.mark.parametrize("edit, where", [
    (lambda r: r.pop("cells"), "cells"),
    (lambda r: r["cells"]["off_real"].update(status="half-done"), "status"),
    (lambda r: r["cells"]["off_real"]["config"].update(router="maybe"), "router"),
    (lambda r: r.update(schema_version=7), "schema_version"),
])
def test_a_broken_results_file_is_named_with_the_fix(tmp_path, edit, where):
    results = make_results(tmp_path)
    edit(results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with pytest.raises(AblateError, match=rf"(?s){path}.*{where}.*re-run its spec"):
        read_results(path)
    with pytest.raises(ValueError):
        Results.model_validate(results)


def test_ablate_report_refuses_a_foreign_results_file(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "zeb139"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"model": "gpt", "accuracy": 0.9}))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = ablate_in(tmp_path, monkeypatch, "report", "zeb139")
    text = " ".join(printed.getvalue().split())
    assert code == 2 and "Traceback" not in text
    assert "results.json is not a results.json this version of ablate reads" in text and "re-run its spec" in text
    shutil.rmtree(run)
