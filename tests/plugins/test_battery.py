"""The η-B battery (§7.5 W/A/X/Q/V): each statistic against an independent float64 (or pure
Python) computation on tiny tensors, its mathematical bounds under hypothesis, and the probe end
to end on a small real Student against a recomputation from the model's own traced forwards."""

import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.oracle.build import gaussian_twin
from ablate.api.plugins import load_registry
from ablate.verdicts.verdict import rubric_metrics
from ablate_builtins import battery as B
from probe_fixtures import LAYERS, make_student, make_table, outputs, view

SETTINGS = settings(max_examples=60, deadline=None)
TOL = 1e-9


def matrices(min_rows=1, max_rows=9, max_dim=6):
    """Small float64 matrices [N, d] with no zero row, as nested lists."""
    entry = st.floats(min_value=-10, max_value=10, allow_nan=False).filter(lambda x: abs(x) > 1e-3)
    return st.integers(1, max_dim).flatmap(
        lambda d: st.lists(st.lists(entry, min_size=d, max_size=d), min_size=min_rows, max_size=max_rows))


def py_cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# ------------------------------------------------------------------------------------- W


def test_concentration_matches_explicit_pairwise_mean():
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))
    rows = x.tolist()
    n = len(rows)
    units = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows]
    mean_unit = [sum(u[c] for u in units) / n for c in range(5)]
    pair_mean = sum(py_cos(a, b) ** 2 for a in rows for b in rows) / n ** 2  # O(N²), self-pairs included
    r, axis = B.concentration(x)
    assert math.isclose(r, math.sqrt(sum(v * v for v in mean_unit)), rel_tol=1e-12)
    assert math.isclose(axis, math.sqrt(pair_mean), rel_tol=1e-12)


def test_concentration_of_one_axis_both_signs():
    v = torch.tensor([3.0, -4.0, 0.0])
    r, axis = B.concentration(torch.stack([v, -2 * v, 0.5 * v, -v]))
    assert abs(r) < TOL and math.isclose(axis, 1.0, rel_tol=1e-12)  # R signed: cancels; axis RMS: one axis


@SETTINGS
@given(matrices())
def test_concentration_bounds(rows):
    """1/√N (self-pairs), 1/√d (trace-1 PSD matrix of rank ≤ d) and R² (Jensen) bound axis RMS below."""
    x = torch.tensor(rows, dtype=torch.float64)
    n, d = x.shape
    r, axis = B.concentration(x)
    assert -TOL <= r <= 1 + TOL and axis <= 1 + TOL
    assert axis >= max(r * r, 1 / math.sqrt(d), 1 / math.sqrt(n)) - 1e-9
    flipped = x * torch.tensor([(-1.0) ** i for i in range(n)], dtype=torch.float64)[:, None]
    assert math.isclose(B.concentration(flipped)[1], axis, rel_tol=1e-9)  # signs do not move an axis


# ------------------------------------------------------------------------------------ A, X


def test_cos_stats_matches_python():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    cos = [py_cos(p, q) for p, q in zip(a.double().tolist(), b.double().tolist())]
    signed, absolute = B.cos_stats(a, b)
    assert math.isclose(signed, sum(cos) / 7, rel_tol=1e-5)
    assert math.isclose(absolute, sum(map(abs, cos)) / 7, rel_tol=1e-5)


def test_swap_floor_pairs_every_row_with_another():
    # Orthonormal rows: any pairing of distinct rows reads 0; a row met with itself would read 1.
    assert B.swap_floor(torch.eye(6), torch.Generator().manual_seed(0)) == 0.0
    assert math.isclose(B.swap_floor(torch.ones(5, 3), torch.Generator().manual_seed(0)), 1.0, rel_tol=1e-6)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(7)).tolist()
    rows = x.double().tolist()
    want = sum(abs(py_cos(rows[perm[i]], rows[perm[(i + 1) % 9]])) for i in range(9)) / 9
    assert math.isclose(B.swap_floor(x, torch.Generator().manual_seed(7)), want, rel_tol=1e-5)


# ------------------------------------------------------------------------------------- Q


@SETTINGS
@given(n=st.integers(2, 40), count=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_distinct_pairs_never_pair_a_token_with_itself(n, count, seed):
    i, j = B.distinct_pairs(n, count, torch.Generator().manual_seed(seed))
    assert i.shape == j.shape == (count,)
    assert bool((i != j).all()) and int(i.min()) >= 0 and int(max(i.max(), j.max())) < n


@SETTINGS
@given(st.data())
def test_jaccard_matches_python_sets(data):
    k = data.draw(st.integers(1, 6))
    row = st.lists(st.integers(0, 12), min_size=k, max_size=k, unique=True)
    a = data.draw(st.lists(row, min_size=1, max_size=8))
    b = data.draw(st.lists(row, min_size=len(a), max_size=len(a)))
    got = B.jaccard(torch.tensor(a), torch.tensor(b)).tolist()
    assert got == [len(set(p) & set(q)) / len(set(p) | set(q)) for p, q in zip(a, b)]


@SETTINGS
@given(st.lists(st.integers(0, 9), min_size=1, max_size=60))
def test_occupancy_cv_matches_statistics(indices):
    counts = list(Counter(indices).values())
    want = statistics.pstdev(counts) / statistics.mean(counts)
    assert math.isclose(B.occupancy_cv(torch.tensor(indices), 10), want, rel_tol=1e-12, abs_tol=1e-12)


# ------------------------------------------------------------------------------------- V


def test_effective_rank_matches_hand_formula():
    sigma = [3.0, 2.0, 0.5, 0.0]
    x = torch.zeros(6, 4, dtype=torch.float64)
    x[range(4), range(4)] = torch.tensor(sigma, dtype=torch.float64)
    total = sum(s * s for s in sigma)
    entropy = -sum(s * s / total * math.log(s * s / total) for s in sigma if s)
    hard, eff = B.spectrum(x)
    assert hard == 3 and math.isclose(eff, math.exp(entropy), rel_tol=1e-12)
    hard, eff = B.spectrum(2.5 * torch.eye(5, dtype=torch.float64)[:, :3])  # three equal singular values
    assert hard == 3 and math.isclose(eff, 3.0, rel_tol=1e-12)
    assert B.spectrum(torch.zeros(3, 2))[0] == 0


def test_hard_rank_matches_numpy_matrix_rank():
    g = torch.Generator().manual_seed(3)
    for r in (1, 2, 5):
        x = torch.randn(12, r, generator=g) @ torch.randn(r, 7, generator=g)  # float32, rank r
        assert B.spectrum(x)[0] == np.linalg.matrix_rank(x.numpy()) == r


@SETTINGS
@given(matrices(max_rows=7, max_dim=5))
def test_effective_rank_bounds(rows):
    x = torch.tensor(rows, dtype=torch.float64)
    hard, eff = B.spectrum(x)
    assert 1 <= hard <= min(x.shape)
    assert 1 - 1e-9 <= eff <= min(x.shape) + 1e-9


# ----------------------------------------------------------------------------- end to end


def test_battery_probe_matches_recomputation_from_traces():
    table = make_table(0)
    student = make_student(table)
    params = B.InjectionBattery.Params()
    out = B.InjectionBattery(params).run(view(student))
    gaussian = gaussian_twin(table, 42)
    want: dict[str, list[float]] = {}
    for res in outputs(student):
        for layer in LAYERS:
            tr = res.traces[layer]
            injection = student.engram_injections[str(layer)]
            inj = tr.inj.double().flatten(0, 1).tolist()
            h = tr.h_in.double().flatten(0, 1).tolist()
            n = len(inj)
            with torch.no_grad():
                swapped = injection(tr.h_in, gaussian)[0].double().flatten(0, 1).tolist()
            idx = tr.xattn.indices.flatten(0, 1).tolist()
            i, j = B.distinct_pairs(n, 500, torch.Generator().manual_seed(0))
            jac = [len(set(idx[a]) & set(idx[b])) / len(set(idx[a]) | set(idx[b])) for a, b in zip(i.tolist(), j.tolist())]
            counts = list(Counter(r for row in idx for r in row).values())
            unique = sorted({r for row in idx for r in row})
            with torch.no_grad():
                rows_ln = injection.xattn.row_norm(table[unique]).double()
                values = injection.xattn.W_v(injection.xattn.row_norm(table[unique])).double()
            sv_rows, sv_values = np.linalg.svd(rows_ln.numpy(), compute_uv=False), np.linalg.svd(values.numpy(), compute_uv=False)

            def eff(sv):
                p = sv ** 2 / (sv ** 2).sum()
                return math.exp(-sum(q * math.log(q) for q in p if q > 0))

            rows_hard = np.linalg.matrix_rank(rows_ln.float().numpy())
            values_hard = np.linalg.matrix_rank(values.float().numpy())
            units = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in inj]
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
            values_of = {
                "inj_concentration_R": math.sqrt(sum((sum(u[c] for u in units) / n) ** 2 for c in range(len(inj[0])))),
                "inj_axis_rms": math.sqrt(sum(py_cos(a, b) ** 2 for a in inj for b in inj) / n ** 2),
                "inj_hidden_cos": statistics.fmean(py_cos(a, b) for a, b in zip(inj, h)),
                "inj_hidden_abs_cos": statistics.fmean(abs(py_cos(a, b)) for a, b in zip(inj, h)),
                "content_swap_cos": statistics.fmean(py_cos(a, b) for a, b in zip(inj, swapped)),
                "content_swap_abs_cos": statistics.fmean(abs(py_cos(a, b)) for a, b in zip(inj, swapped)),
                "content_swap_floor": statistics.fmean(abs(py_cos(inj[perm[t]], inj[perm[(t + 1) % n]]))
                                                       for t in range(n)),
                "topk_jaccard_mean": statistics.fmean(jac),
                "topk_jaccard_median": statistics.median(jac),
                "row_usage_cv": statistics.pstdev(counts) / statistics.mean(counts),
                "v_rank_rows_eff": eff(sv_rows), "v_rank_values_eff": eff(sv_values),
                "v_rank_rows_hard": rows_hard, "v_rank_values_hard": values_hard,
                "v_rank_hard_ratio": values_hard / rows_hard,
            }
            for key, value in values_of.items():
                want.setdefault(f"{key}_L{layer}", []).append(value)
    assert out.keys() == want.keys()
    for key, values in want.items():
        assert math.isclose(out[key], sum(values) / len(values), rel_tol=1e-4, abs_tol=1e-7), key


def test_content_swap_recompute_on_the_own_table_gives_the_traced_injection():
    """Recomputing the injection inline on the captured h_in and the cell's own table reproduces the
    traced injection (gate included), so X differs from 1 only through the Gaussian table."""
    table = make_table(0)
    student = make_student(table)
    for layer in LAYERS:
        tr = outputs(student)[0].traces[layer]
        with torch.no_grad():
            again = student.engram_injections[str(layer)](tr.h_in, table)[0]
        assert torch.allclose(again, tr.inj, rtol=1e-6, atol=1e-7)
        signed, absolute = B.cos_stats(tr.inj.flatten(0, 1), again.flatten(0, 1))
        assert math.isclose(signed, 1.0, rel_tol=1e-6) and math.isclose(absolute, 1.0, rel_tol=1e-6)


def test_battery_probe_leaves_no_hooks_restores_mode_and_is_registered():
    student = make_student(make_table(0)).train()
    out = B.InjectionBattery(B.InjectionBattery.Params()).run(view(student))
    assert student.training and torch.is_grad_enabled()
    for module in student.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    registry = load_registry()
    assert registry.get("probe", "injection-battery") is B.InjectionBattery
    declared = {m for p in registry.components["probe"].values() for m in p.cls.metrics}
    assert rubric_metrics() <= declared  # every metric the rubric reads is produced by a registered probe
    assert len(out) == len(B.InjectionBattery.metrics) * len(LAYERS)


# -------------------------------------------------------------------------- report and run


def test_report_prints_strong_results_and_battery_readings(tmp_path):
    from ablate.report.markdown import render_report
    from ablate.verdicts.verdict import combine, rubric_text, strong_result
    from report_fixtures import make_results, untraceable_numbers
    from report_fixtures import ZEB136_L2_REAL

    r = make_results(tmp_path)
    r["conventions"]["battery_rubric"] = rubric_text()
    cell_part = {k: v for k, v in ZEB136_L2_REAL.items() if not k.startswith("cross_run")}
    r["cells"]["off_real"]["metrics"].update(cell_part)
    r["cells"]["off_shuf"]["metrics"].update({**cell_part, "row_usage_cv_L2": 1.25})
    r["pairs"][0]["metrics"].update({k: v for k, v in ZEB136_L2_REAL.items() if k.startswith("cross_run")})
    gain = r["cells"]["on_real"]["metrics"]["content_gain"]
    r["combination"]["on_real"] = combine([t for t in r["thresholds"] if t["cell"] == "on_real"], strong=[
        strong_result("content_gain", "on_real", gain, {"at_least": 0.005}, {})])
    text = render_report(r, tmp_path / "runs" / "zeb139", tmp_path / "reports" / "zeb139.md")
    assert "- **on_real**: not a strong result: content_gain 0.0000900 < 0.0050000 (strong if ≥ 0.0050000)" in text
    section = text.split("## η-B battery readings")[1].split("\n## ")[0]
    assert "### off_real vs off_shuf" in section and "on_real vs on_shuf" not in section  # no battery there
    assert "| alignment | distributional alignment (D*) |" in section
    assert "| occupancy | uneven / dominated |" in section  # the runs differ: real / control
    assert untraceable_numbers(text, r) == []


@pytest.mark.slow
def test_run_records_strong_results_and_battery_metrics(tmp_path, monkeypatch):
    """The demo at its test size: results.json records each strong bound per cell (the older
    threshold-name form too), the battery metrics land per layer, and the report reads them."""
    import json

    from cli_run import ablate_in

    spec = Path(__file__).resolve().parents[2] / "specs" / "demo.toml"
    strong = 'combine.strong=[{metric="content_gain",cells=["router_on_real"],strong_if={at_least=0.005}},"content_gain"]'
    assert ablate_in(tmp_path, monkeypatch, "run", str(spec), "--profile", "tiny", "--device", "cpu",
                     "--set", strong) == 0
    results = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    bounds = results["combination"]["router_on_real"]["strong_results"]
    gain = results["cells"]["router_on_real"]["metrics"]["content_gain"]
    assert [(b["rule"]["bounds"], b["strong"]) for b in bounds] == [([0.005], gain >= 0.005), ([0.001], gain >= 0.001)]
    assert results["combination"]["router_on_shuf"]["strong_results"] == []
    metrics = results["cells"]["router_off_real"]["metrics"]
    assert {m.format(l=l) for m in B.InjectionBattery.metrics for l in (2, 5)} <= metrics.keys()
    report = (tmp_path / "reports" / "demo.md").read_text()
    assert "## η-B battery readings" in report and bounds[0]["sentence"] in report
