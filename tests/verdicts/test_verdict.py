"""Verdict sentences are checked by parsing their numbers back out and redoing the arithmetic
exactly (fractions), independently of ablate.verdicts.verdict."""

import math
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.errors import InputError
from report_fixtures import ZEB136_L2_REAL
from ablate.verdicts.verdict import (
    Bound, agreement, combine, common_decimals, crosses, discriminate, distinguishing_digits, evaluate, fmt,
)

SETTINGS = settings(max_examples=50, deadline=None)
NUM = r"-?\d+(?:\.\d+)?"
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)

SINGLE_RE = re.compile(
    rf"^(?P<label>\S+) (?P<v>{NUM}) vs bound (?P<b>{NUM})(?: \((?P<expr>.*)\))?: "
    rf"BREAK if value (?P<op>[<≤>≥]) (?P<b2>{NUM}); (?P<v2>{NUM}) is "
    rf"(?:(?P<gap>{NUM}) (?P<word>above|below) the bound|equal to the bound) → (?P<verdict>HOLD|BREAK)$")
RANGE_RE = re.compile(
    rf"^(?P<label>\S+) (?P<v>{NUM}) vs band \[(?P<lo>{NUM}), (?P<hi>{NUM})\]: (?P<cond>[^;]*); (?P<where>.*) "
    rf"→ (?P<verdict>HOLD|BREAK)$")
OFFSET_RE = re.compile(rf"(?:(?P<gap>{NUM}) (?P<word>above|below)|equal to) the (?P<which>lower|upper) bound")

OPS = {"below": "<", "at_most": "≤", "above": ">", "at_least": "≥"}


def decimals_of(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def is_rounding_of(text: str, x: float) -> bool:
    """text is x correctly rounded at text's own number of decimals (-0.0 prints as 0, as fmt prints it)."""
    return text == f"{x + 0.0:.{decimals_of(text)}f}"


def check_gap(gap_text: str, value: float, bound: float) -> None:
    """The printed gap is |value − bound| (exact) rounded at the printed precision."""
    exact = abs(Fraction(value) - Fraction(bound))
    unit = Fraction(1, 10 ** decimals_of(gap_text))
    assert abs(Fraction(gap_text) - exact) <= unit / 2
    assert Fraction(gap_text) > 0


def check_word(word: str, value: float, bound: float) -> None:
    assert word == ("above" if value > bound else "below")


def near(x: float):
    """Values on both sides of x and x itself."""
    return st.sampled_from([x, math.nextafter(x, math.inf), math.nextafter(x, -math.inf)]) | finite


@SETTINGS
@given(kind=st.sampled_from(list(OPS)), bound=finite, data=st.data())
def test_single_bound_sentences_match_arithmetic(kind, bound, data):
    value = data.draw(near(bound))
    r = evaluate("t", "m", "c", value, {kind: Bound(bound, "ref - 0.1")})
    expect_break = {"below": value < bound, "at_most": value <= bound,
                    "above": value > bound, "at_least": value >= bound}[kind]
    assert r.verdict == ("BREAK" if expect_break else "HOLD")
    m = SINGLE_RE.match(r.sentence)
    assert m, r.sentence
    assert m["verdict"] == r.verdict and m["op"] == OPS[kind] and m["expr"] == "ref - 0.1"
    assert is_rounding_of(m["v"], value) and is_rounding_of(m["b"], bound)
    assert m["v"] == m["v2"] and m["b"] == m["b2"]
    if value == bound:
        assert m["gap"] is None
    else:
        assert m["v"] != m["b"]  # two different numbers never print the same
        check_gap(m["gap"], value, bound)
        check_word(m["word"], value, bound)


@SETTINGS
@given(kind=st.sampled_from(["outside", "inside"]), a=finite, b=finite, data=st.data())
def test_range_sentences_match_arithmetic(kind, a, b, data):
    lo, hi = min(a, b), max(a, b)
    value = data.draw(near(lo) | near(hi))
    r = evaluate("t", "alpha", "c", value, {kind: [lo, hi]})
    outside = value < lo or value > hi
    assert r.verdict == ("BREAK" if outside == (kind == "outside") else "HOLD")
    m = RANGE_RE.match(r.sentence)
    assert m, r.sentence
    assert is_rounding_of(m["v"], value) and is_rounding_of(m["lo"], lo) and is_rounding_of(m["hi"], hi)
    for x, y in [(value, lo), (value, hi), (lo, hi)]:
        if x != y:
            texts = {value: m["v"], lo: m["lo"], hi: m["hi"]}
            assert texts[x] != texts[y]
    offsets = list(OFFSET_RE.finditer(m["where"]))
    assert [o["which"] for o in offsets] == (["lower"] if value < lo else ["upper"] if value > hi
                                             else ["lower", "upper"])
    for o in offsets:
        bound = lo if o["which"] == "lower" else hi
        if value == bound:
            assert o["gap"] is None
        else:
            check_gap(o["gap"], value, bound)
            check_word(o["word"], value, bound)


def test_reference_entropy_sentence():
    r = evaluate("entropy", "engram_logit_entropy", "on_real", 10.3467,
                 {"below": Bound(10.3735 - 0.1, "log_vocab - 0.1")})
    assert r.verdict == "HOLD"
    assert "0.0732 above the bound" in r.sentence and "(log_vocab - 0.1)" in r.sentence


def test_plain_bound_prints_no_expression_and_missing_values():
    r = evaluate("gain", "content_gain", "c", 0.002, {"at_least": 0.001})
    assert "(" not in r.sentence and r.verdict == "BREAK"
    for missing in (None, float("nan")):
        r = evaluate("gain", "content_gain", "c", missing, {"at_least": 0.001})
        assert r.verdict == "MISSING" and r.value is None and "MISSING" in r.sentence
    d = evaluate("a", "alpha", "c", 0.17, {"outside": [0.14, 0.2]}, bound_exprs=["lo", "hi"]).to_dict()
    assert d["rule"] == {"kind": "outside", "bounds": [0.14, 0.2], "exprs": ["lo", "hi"]}


@pytest.mark.parametrize("rule", [{"below": 1, "above": 2}, {"under": 1}, {"outside": 1},
                                  {"below": [1, 2]}, {"inside": [2, 1]}, "below"])
def test_bad_rules_are_input_errors(rule):
    with pytest.raises(InputError):
        evaluate("t", "m", "c", 0.0, rule)


@SETTINGS
@given(a=st.floats(allow_nan=False, allow_infinity=False), b=st.floats(allow_nan=False, allow_infinity=False))
def test_distinguishing_digits_never_print_two_floats_equal(a, b):
    d = distinguishing_digits(a, b)
    assert d >= 4
    if a != b:
        assert f"{a:.{d}f}" != f"{b:.{d}f}"
        assert d == 4 or f"{a:.{d - 1}f}" == f"{b:.{d - 1}f}"  # and no more decimals than needed


@SETTINGS
@given(st.lists(finite, min_size=2, max_size=8))
def test_common_decimals_separates_every_pair(values):
    d = common_decimals(values)
    printed = {fmt(v, d) for v in values}
    assert len(printed) == len(set(values))


@SETTINGS
@given(a=finite, b=finite)
def test_agreement_tolerance_is_gap_rounded_up(a, b):
    text = agreement("A", a, "B", b, "nats")
    if a == b:
        assert "agree exactly" in text
        return
    m = re.fullmatch(rf"A \((?P<a>{NUM})\) and B \((?P<b>{NUM})\) agree within (?P<tol>{NUM}) nats", text)
    assert m, text
    assert m["a"] != m["b"] and is_rounding_of(m["a"], a) and is_rounding_of(m["b"], b)
    tol, gap = Fraction(m["tol"]), abs(Fraction(a) - Fraction(b))
    unit = Fraction(1, 10 ** decimals_of(m["tol"]))
    assert decimals_of(m["tol"]) == decimals_of(m["a"])
    assert gap <= tol < gap + unit


def test_agreement_reference_numbers():
    # ZEB-136 router-off cells: 4.554601 vs 4.554377 differ by 0.000224 → 0.0003 at 4 decimals.
    assert agreement("c1", 4.554601, "c2", 4.554377, "nats").endswith("agree within 0.0003 nats")


def test_fmt_never_scientific():
    for x in (3e-7, 1e-20, 12345678.9, -2.5e-9):
        assert "e" not in fmt(x)
        assert Fraction(fmt(x)) != 0
    assert fmt(7) == "7" and fmt(0.5, sign=True) == "+0.5000" and fmt(float("inf")) == "inf"


def _rows(verdicts):
    return [{"name": n, "verdict": v} for n, v in verdicts.items()]


@pytest.mark.parametrize("verdicts, label, crossed", [
    ({"a": "HOLD", "b": "HOLD", "c": "HOLD"}, "holds", 0),
    ({"a": "BREAK", "b": "HOLD", "c": "HOLD"}, "soft signal", 1),
    ({"a": "BREAK", "b": "BREAK", "c": "HOLD"}, "broken", 2),
    ({"a": "BREAK", "b": "BREAK", "c": "BREAK"}, "broken", 3),
])
def test_combine_table(verdicts, label, crossed):
    out = combine(_rows(verdicts))
    assert (out["label"], out["crossed"], out["total"], out["strong"]) == (label, crossed, 3, False)


def test_combine_strong_missing_and_custom_cutoffs():
    rows = _rows({"a": "BREAK", "b": "MISSING", "gain": "HOLD"})
    out = combine(rows, strong=["gain"])
    assert (out["crossed"], out["total"], out["missing"], out["strong"]) == (1, 3, 1, False)
    assert out["crossed_names"] == ["a"] and out["missing_names"] == ["b"]
    rows = _rows({"a": "BREAK", "gain": "BREAK"})
    out = combine(rows, strong=["gain"])  # a strong threshold counts like any other, and flags strong
    assert (out["crossed"], out["label"], out["strong"]) == (2, "broken", True)
    assert combine(rows, soft_at=3, broken_at=4)["label"] == "holds"
    assert combine(rows, soft_at=2, broken_at=3)["label"] == "soft signal"


def test_evaluate_spec_rule_evaluates_expressions():
    from ablate.verdicts.verdict import evaluate_spec_rule

    r = evaluate_spec_rule("entropy", "engram_logit_entropy", "c", 10.3467, {"below": "log_vocab - 0.1"},
                           {"log_vocab": math.log(32000)}, "router entropy, nats")
    assert r["rule"] == {"kind": "below", "bounds": [math.log(32000) - 0.1], "exprs": ["log_vocab - 0.1"]}
    assert r["verdict"] == "HOLD" and r["meaning"] == "router entropy, nats"
    r = evaluate_spec_rule("alpha", "alpha", "c", 0.21, {"outside": [0.14, "0.1 * 2"]}, {})
    assert r["rule"]["bounds"] == [0.14, 0.2] and r["verdict"] == "BREAK"


@pytest.mark.parametrize("real, shuf, outcome", [
    (True, True, "cheap_win"), (True, False, "clean_positive"),
    (False, False, "holds"), (False, True, "anomaly"),
])
def test_discriminate_table(real, shuf, outcome):
    out = discriminate(real, shuf)
    assert out["outcome"] == outcome and out["meaning"]


# ------------------------------------------------------------------------------ strong results

STRONG_RE = re.compile(rf"^(?:strong result: (?P<m>\S+) (?P<v>{NUM}) (?P<op>[<≤>≥]) (?P<b>{NUM})|"
                       rf"not a strong result: (?P<m2>\S+) (?P<v2>{NUM}) (?P<nop>[<≤>≥]) (?P<b2>{NUM}) "
                       rf"\(strong if (?P<op2>[<≤>≥]) (?P<b3>{NUM})\))$")
HOLDS = {"<": lambda v, b: v < b, "≤": lambda v, b: v <= b, ">": lambda v, b: v > b, "≥": lambda v, b: v >= b}


def test_strong_result_sentences_and_combination():
    from ablate.verdicts.verdict import strong_result

    r = strong_result("content_gain", "on_real", 0.0071, {"at_least": 0.005}, {})
    assert r["strong"] is True and r["sentence"] == "strong result: content_gain 0.00710 ≥ 0.00500"
    r2 = strong_result("content_gain", "on_real", 0.0021, {"at_least": 0.005}, {})
    assert r2["strong"] is False
    assert r2["sentence"] == "not a strong result: content_gain 0.00210 < 0.00500 (strong if ≥ 0.00500)"
    r3 = strong_result("content_gain", "on_real", None, {"at_least": 0.005}, {})
    assert r3["strong"] is None and "no value" in r3["sentence"]
    r4 = strong_result("alpha", "c", 0.21, {"outside": [0.14, "0.1 * 2"]}, {})
    assert r4["strong"] is True and r4["sentence"] == "strong result: alpha 0.2100 outside [0.1400, 0.2000 (0.1 * 2)]"
    # A strong bound is never a crossing: one crossed threshold stays a soft signal, now marked strong.
    rows = _rows({"a": "BREAK", "content_gain": "HOLD"})
    out = combine(rows, strong=[r])
    assert (out["crossed"], out["label"], out["strong"], out["strong_results"]) == (1, "soft signal", True, [r])
    assert combine(rows, strong=[r2, r3])["strong"] is False


@SETTINGS
@given(kind=st.sampled_from(list(OPS)), bound=finite, data=st.data())
def test_strong_result_sentence_agrees_with_the_arithmetic(kind, bound, data):
    from ablate.verdicts.verdict import strong_result

    value = data.draw(near(bound))
    r = strong_result("m", "c", value, {kind: bound}, {})
    m = STRONG_RE.match(r["sentence"])
    assert m, r["sentence"]
    assert is_rounding_of(m["v"] or m["v2"], value) and is_rounding_of(m["b"] or m["b2"], bound)
    exact = HOLDS[OPS[kind]](Fraction(value), Fraction(bound))
    assert r["strong"] is exact and (m["op"] is not None) is exact
    if not exact:  # the printed negated comparison is true of the exact numbers
        assert m["op2"] == OPS[kind] and HOLDS[m["nop"]](Fraction(value), Fraction(bound))


def test_strong_bounds_of_the_reference_specs_and_the_older_form():
    from pathlib import Path

    from ablate.config.spec import load_spec, spec_from_dict

    for name in ("zeb136", "zeb138", "zeb139"):
        spec = load_spec(Path(__file__).resolve().parents[2] / "specs" / f"{name}.toml")
        (b,) = spec.combine.strong_bounds(spec.thresholds)
        assert (b.metric, b.cells, b.strong_if.kind(), b.strong_if.bounds()) == \
            ("content_gain", ["router_on_real"], "at_least", [0.005])
        gain = next(t for t in spec.thresholds if t.metric == "content_gain")
        assert gain.break_if.bounds() == [0.001]  # the crossing stays its own, weaker bound
    raw = {"name": "x", "corpus": {"plugin": "synthetic"}, "teacher": {"plugin": "llama-local"},
           "cells": [{"name": "a"}], "thresholds": [{"name": "g", "metric": "content_gain", "cells": ["a"],
                                                     "break_if": {"at_least": 0.001}}],
           "combine": {"strong": ["g"]}}
    (b,) = spec_from_dict(raw).combine.strong_bounds(spec_from_dict(raw).thresholds)
    assert (b.metric, b.cells, b.strong_if.kind(), b.strong_if.bounds()) == ("content_gain", ["a"], "at_least", [0.001])


# ------------------------------------------------------------------------------ battery rubric



def test_rubric_reads_the_published_battery_as_the_reference_did():
    from ablate.verdicts.verdict import read_battery

    assert read_battery(ZEB136_L2_REAL, 2) == {
        "retrieval": "healthy", "injection": "live", "residual": "non-residual",
        "alignment": "distributional alignment (D*)",  # the reference's verdict for this pair
        "V content": "in between", "per-token retrieval": "dispersive", "occupancy": "uneven",
        "V rank": "no compression"}
    assert read_battery({k: v for k, v in ZEB136_L2_REAL.items() if k != "row_usage_cv_L2"}, 2)["occupancy"] is None
    assert read_battery(ZEB136_L2_REAL, 5) == dict.fromkeys(read_battery(ZEB136_L2_REAL, 2), None)


@pytest.mark.parametrize("changes, topic, word", [
    ({"retrieval_unique_frac_L2": 0.05, "attn_entropy_L2": 0.9, "retrieval_gap_L2": 0.05}, "retrieval", "broken"),
    ({"retrieval_unique_frac_L2": 0.0501, "attn_entropy_L2": 0.9, "retrieval_gap_L2": 0.05}, "retrieval", "healthy"),
    ({"inj_ratio_L2": 0.01, "cross_run_inj_abs_cos_L2": 0.1}, "injection", "broken"),
    ({"inj_ratio_L2": 0.05, "cross_run_inj_abs_cos_L2": 0.1}, "injection", "I* (sizeable but not shared across runs)"),
    ({"inj_axis_rms_L2": 0.9, "inj_hidden_abs_cos_L2": 0.5}, "residual", "fixed residual amplifier"),
    ({"inj_axis_rms_L2": 0.9, "inj_hidden_abs_cos_L2": 0.3}, "residual", "in between"),
    ({"inj_axis_rms_L2": 0.51}, "alignment", "not D*"),
    ({"content_swap_abs_cos_L2": 0.8}, "V content", "content-blind"),
    ({"content_swap_abs_cos_L2": 0.2}, "V content", "content-sensitive"),
    ({"topk_jaccard_mean_L2": 0.8}, "per-token retrieval", "fixed"),
    ({"row_usage_cv_L2": 2.0}, "occupancy", "collapsed"),
    ({"row_usage_cv_L2": 1.0}, "occupancy", "dominated"),
    ({"row_usage_cv_L2": 0.3}, "occupancy", "near-uniform"),
    ({"v_rank_hard_ratio_L2": 0.8}, "V rank", "compresses"),
    ({"v_rank_hard_ratio_L2": 0.5}, "V rank", "compresses severely"),
])
def test_rubric_bounds_are_inclusive_and_ordered(changes, topic, word):
    from ablate.verdicts.verdict import read_battery

    assert read_battery({**ZEB136_L2_REAL, **changes}, 2)[topic] == word


def test_rubric_text_names_every_bound():
    from ablate.verdicts.verdict import BATTERY_RUBRIC, rubric_text

    text = rubric_text()
    for reading in BATTERY_RUBRIC:
        assert f"{reading.topic}: " in text and f"else {reading.otherwise}" in text
        for word, conds in reading.outcomes:
            assert f"{word} if " + " and ".join(
                f"{c.label} ({c.metric.removesuffix('_L{l}')}) {OPS[c.kind]} {c.bound:g}" for c in conds) in text


# ---------------------------------------------------------------------------------- over seeds

IV_RE = re.compile(rf"mean (?P<m>{NUM}) over (?P<n>\d+) seeds \(sd (?P<sd>{NUM}); 95% t-interval "
                   rf"\[(?P<lo>{NUM}), (?P<hi>{NUM})\]\)")


@pytest.mark.parametrize("df, t", [(2, 4.302653), (4, 2.776445), (19, 2.093024), (1, 12.706205), (30, 2.042272)])
def test_t_quantile_matches_the_tables(df, t):
    from ablate.verdicts.verdict import t_cdf, t_quantile

    assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)
    assert t_cdf(-t, df) == pytest.approx(0.025, abs=1e-6) and t_cdf(0.0, df) == 0.5


# Seeds 0, 1, 2 read 1.0, 2.0, 4.0, worked by hand: mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to
# 42/9, so s² = 42/18 = 7/3 and s = 1.527525; half-width t(0.975, 2)·s/√3 = 4.302653 × 0.881917 = 3.794583;
# interval [-1.461250, 6.127916].
HAND = {"mean": 7 / 3, "sd": math.sqrt(7 / 3), "low": 7 / 3 - 3.794583, "high": 7 / 3 + 3.794583}
VALUES = [(0, "c@seed=0", 1.0), (1, "c@seed=1", 2.0), (2, "c@seed=2", 4.0)]


@pytest.mark.parametrize("rule, verdict", [
    ({"below": 6.1}, "UNDECIDED"), ({"below": 6.13}, "BREAK"), ({"below": -1.47}, "HOLD"), ({"below": -1.45}, "UNDECIDED"),
    ({"at_least": -1.47}, "BREAK"), ({"at_least": 6.13}, "HOLD"), ({"above": 0.0}, "UNDECIDED"),
    ({"at_most": 7.0}, "BREAK"),
    ({"outside": [7.0, 8.0]}, "BREAK"), ({"outside": [-2.0, 7.0]}, "HOLD"), ({"outside": [0.0, 1.0]}, "UNDECIDED"),
    ({"outside": [-1.0, 6.0]}, "UNDECIDED"),  # the interval spans the whole band: either side is possible
    ({"inside": [-2.0, 7.0]}, "BREAK"), ({"inside": [7.0, 8.0]}, "HOLD"), ({"inside": [-1.0, 6.0]}, "UNDECIDED"),
    ({"inside": [6.0, 7.0]}, "UNDECIDED"),
])
def test_over_seeds_against_a_hand_computed_interval(rule, verdict):
    from ablate.verdicts.verdict import evaluate_over_seeds

    r = evaluate_over_seeds("th", "m", "c", VALUES, rule, {})
    assert r["n_seeds"] == 3 and r["verdict"] == verdict and r["cell"] == "c"
    assert r["mean"] == pytest.approx(HAND["mean"], abs=1e-12) and r["value"] == r["mean"]
    assert r["sd"] == pytest.approx(HAND["sd"], abs=1e-12)
    assert r["ci_low"] == pytest.approx(HAND["low"], abs=1e-6) and r["ci_high"] == pytest.approx(HAND["high"], abs=1e-6)
    assert [s["verdict"] for s in r["seeds"]] == [evaluate("th", "m", "c", v, rule).verdict for _, _, v in VALUES]
    m = IV_RE.search(r["sentence"])
    assert m and r["sentence"].endswith(f"→ {verdict}")
    assert is_rounding_of(m["lo"], r["ci_low"]) and is_rounding_of(m["hi"], r["ci_high"]) and m["n"] == "3"
    assert ("straddles" in r["sentence"] or "overlaps" in r["sentence"]) == (verdict == "UNDECIDED")


def test_one_seed_keeps_todays_verdict_labelled_single_seed():
    from ablate.verdicts.verdict import evaluate_over_seeds, evaluate_spec_rule

    rule, names = {"below": "log_vocab - 0.1"}, {"log_vocab": math.log(512)}
    r = evaluate_over_seeds("entropy", "engram_logit_entropy", "c", [(None, "c", 6.1)], rule, names)
    today = evaluate_spec_rule("entropy", "engram_logit_entropy", "c", 6.1, rule, names)
    assert {k: r[k] for k in today} == today and r["basis"] == "single seed"
    assert (r["n_seeds"], r["mean"], r["ci_low"], r["ci_high"]) == (1, 6.1, None, None)
    # a seed group whose other seeds have no value reads the one value it has
    r = evaluate_over_seeds("entropy", "engram_logit_entropy", "c", [(0, "c@seed=0", 6.1), (1, "c@seed=1", None)],
                            rule, names)
    assert r["verdict"] == today["verdict"] and r["missing_seeds"] == [1] and r["n_seeds"] == 1
    none = evaluate_over_seeds("entropy", "engram_logit_entropy", "c", [(0, "c@seed=0", None)], rule, names)
    assert none["verdict"] == "MISSING" and none["n_seeds"] == 0


@SETTINGS
@given(values=st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=2, max_size=8))
def test_the_interval_contains_the_mean_and_shrinks_with_more_identical_values(values):
    from ablate.verdicts.verdict import seed_interval

    one, two, three = (seed_interval(values * k) for k in (1, 2, 3))
    assert one["ci_low"] <= one["mean"] <= one["ci_high"]
    if one["sd"] > 1e-9 * max(1.0, max(abs(v) for v in values)):
        assert one["half_width"] > two["half_width"] > three["half_width"]
    assert seed_interval([values[0]] * 5)["half_width"] == 0.0


def test_undecided_thresholds_make_a_label_uncertain():
    out = combine(_rows({"a": "BREAK", "b": "UNDECIDED", "c": "HOLD"}))
    assert (out["label"], out["possible_labels"], out["broken"]) == ("undecided", ["soft signal", "broken"], None)
    assert out["undecided"] == 1 and out["undecided_names"] == ["b"] and out["crossed"] == 1
    out = combine(_rows({"a": "UNDECIDED", "b": "HOLD"}))
    assert (out["label"], out["possible_labels"], out["broken"]) == ("undecided", ["holds", "soft signal"], False)
    out = combine(_rows({"a": "BREAK", "b": "BREAK", "c": "UNDECIDED"}))  # broken either way
    assert (out["label"], out["broken"]) == ("broken", True)
    out = combine(_rows({"a": "UNDECIDED", "b": "UNDECIDED"}), soft_at=3, broken_at=4)  # holds either way
    assert (out["label"], out["broken"]) == ("holds", False)


@pytest.mark.parametrize("real, shuf, outcome, possible", [
    (None, False, "undecided", ["cheap_win", "clean_positive"][1:] + ["holds"]),
    (True, None, "undecided", ["cheap_win", "clean_positive"]),
    (None, None, "undecided", ["cheap_win", "clean_positive", "anomaly", "holds"]),
    (False, False, "holds", ["holds"]),
])
def test_discriminate_with_undecided_cells(real, shuf, outcome, possible):
    out = discriminate(real, shuf)
    assert out["outcome"] == outcome and sorted(out["possible"]) == sorted(possible)
    if outcome == "undecided":
        assert all(p in out["meaning"] for p in possible)


def test_per_seed_labels_and_the_discriminator_sentence():
    from ablate.verdicts.verdict import discriminator_sentence, evaluate_over_seeds, per_seed_labels

    own = [evaluate_over_seeds("a", "m", "c", VALUES, {"below": 1.5}, {}),  # BREAK at seed 0 only
           evaluate_over_seeds("b", "m", "c", VALUES, {"below": 3.0}, {})]  # BREAK at seeds 0 and 1
    labels = per_seed_labels(own)
    assert [(p["seed"], p["label"]) for p in labels] == [(0, "broken"), (1, "soft signal"), (2, "holds")]
    real = combine(own)
    assert real["label"] == "undecided" and real["possible_labels"] == ["holds", "soft signal", "broken"]
    shuf = combine(_rows({"a": "HOLD"}))
    d = {"real": "c", "shuffled": "s", **discriminate(real["broken"], shuf["broken"]),
         "per_seed": [{"seed": 0, "outcome": "clean_positive"}]}
    text = discriminator_sentence(d, real, shuf, 3)
    assert text.startswith("undecided between clean_positive and holds (over 3 seeds, 95% t-intervals)")
    assert "real holds or soft signal or broken (0 of 2 thresholds BREAK, 2 UNDECIDED: a, b)" in text
    assert text.endswith("per seed: clean_positive (seed 0)")
    d["per_seed"] = [{"seed": 0, "outcome": "holds"}, {"seed": 1, "outcome": "clean_positive"}, {"seed": 2, "outcome": "holds"}]
    assert discriminator_sentence(d, real, shuf, 3).endswith("per seed: holds (seeds 0, 2), clean_positive (seed 1)")
    assert discriminator_sentence({**d, **discriminate(False, False), "per_seed": []}, shuf, shuf, 1).startswith(
        "holds (single seed: no interval)")


def test_outer_two_by_two_of_reference_7_4():
    from ablate.verdicts.verdict import OUTER_SOFT, outer_reading, run_reading

    def run(label, objective="kl_ce", possible=None):
        comb = {"r": {"label": label, **({"possible_labels": possible} if possible else {})}}
        return run_reading({"combination": comb, "discriminator": [{"real": "r"}], "axes": {"objective": objective}})

    assert outer_reading(run("holds"), run("broken", "ce"))["reading"].startswith("teacher architecture dominates")
    assert outer_reading(run("holds"), run("holds", "ce"))["reading"].startswith("structural ceiling")
    assert outer_reading(run("broken"), run("broken", "ce"))["reading"].startswith("objective alone suffices")
    assert outer_reading(run("broken"), run("holds", "ce"))["reading"].startswith("objective dominates")
    assert outer_reading(run("soft signal"), run("holds", "ce"))["reading"] == OUTER_SOFT
    a = run("undecided", possible=["holds", "soft signal"])
    assert (a["reading"], a["possible"], a["role"]) == ("undecided", ["soft", "holds"], "objective")
    out = outer_reading(a, run("broken", "ce"))
    assert out["reading"] == "undecided" and len(out["options"]) == 2 and "more seeds" in out["sentence"]
    assert run("holds", "ce")["role"] == "teacher"


def test_rates_print_three_significant_digits():
    from ablate.verdicts.verdict import fmt_rate

    assert [fmt_rate(x) for x in (461102.7103, 1234.5, 87.21, 999.96, 12345678, 0.01234)] == \
        ["461k", "1.23k", "87.2", "1.00k", "12.3M", "0.0123"]
    assert fmt_rate(None) == "—"


# ------------------------------------------------------------------ one definition of the rules

RULE_MEANING = {  # the spec's words (docs): BREAK when the value is ...
    "below": lambda v, b: v < b[0], "at_most": lambda v, b: v <= b[0],
    "above": lambda v, b: v > b[0], "at_least": lambda v, b: v >= b[0],
    "outside": lambda v, b: v < b[0] or v > b[1], "inside": lambda v, b: b[0] <= v <= b[1]}


@SETTINGS
@given(kind=st.sampled_from(sorted(RULE_MEANING)), value=st.floats(-4, 4) | st.sampled_from([-1.0, 0.0, 1.5]),
       bounds=st.lists(st.sampled_from([-1.0, 0.0, 1.5]) | st.floats(-3, 3), min_size=2, max_size=2).map(sorted))
def test_crosses_and_the_plotted_break_region_follow_the_rule_words(kind, value, bounds):
    from ablate.report.plots import _break_spans

    assert crosses(kind, value, bounds) == RULE_MEANING[kind](value, bounds)
    spans = _break_spans(kind, bounds, -5.0, 5.0)  # what the report shades
    if value not in bounds:
        assert any(a < value < b for a, b in spans) == RULE_MEANING[kind](value, bounds)
