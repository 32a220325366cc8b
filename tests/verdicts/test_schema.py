"""results.json through the Results model: a run's file reads back unchanged, and a file that is
not a results.json (another tool's JSON, a broken edit, a missing one) is refused by `ablate
report` with a paragraph naming the file, exit 2 (bad input) and no traceback."""

import contextlib
import io
import json
import shutil
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.errors import AblateError
from ablate.verdicts.results import step_times
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


@settings(max_examples=60, deadline=None)
@given(first=st.floats(0.01, 1e5), later=st.lists(st.floats(0.01, 1e4), max_size=12), logged_alone=st.booleans())
def test_step_times_are_the_first_step_and_the_median_of_the_rest(first, later, logged_alone):
    """A cell's cold start as the results record it: the step-0 row's dt_ms (only when step 0
    was logged) and the median of the later rows' dt_ms, against statistics.median."""
    history = ([{"step": 0.0, "dt_ms": first}] if logged_alone else []) + \
        [{"step": float(10 * (i + 1)), "dt_ms": v} for i, v in enumerate(later)]
    times = step_times(history)
    assert times["first_step_ms"] == (first if logged_alone else None)
    assert times["median_step_ms"] == (statistics.median(later) if later else None)


def test_the_report_shows_each_cells_first_and_median_step(tmp_path):
    from report_fixtures import render

    results = make_results(tmp_path)
    results["cells"]["on_real"].update(seconds=12.5, first_step_ms=1499.0, median_step_ms=45.25)
    text, _ = render(tmp_path, results)
    header = next(line for line in text.splitlines() if line.startswith("| cell | cached | seconds"))
    assert "| first step (ms) | median step (ms) |" in header
    assert next(line for line in text.splitlines() if line.startswith("| on_real |") and "1499" in line)
