"""Thresholds → HOLD/BREAK verdicts, strong-result bounds, their combination per cell, the
real-vs-shuffled discriminator, and the η-B battery rubric. Thresholds and strong bounds arrive
as data (the spec); the rubric is the reference's fixed reading of its battery (§7.5), kept as
data in BATTERY_RUBRIC. Every comparison goes through `crosses`, and every sentence is generated
from the rule and the numbers, so a comparison word can never contradict the arithmetic and two
different numbers never print the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal
from typing import Any, Iterable, Sequence

from ablate import expr
from ablate.errors import InputError

MIN_DECIMALS = 4
_MAX_DECIMALS = 1100  # the exact decimal expansion of any double has at most 1074 fractional digits
_EXACT = Context(prec=2500)  # wide enough that differences and roundings of doubles are exact

SINGLE_BOUND = {"below": "<", "at_most": "≤", "above": ">", "at_least": "≥"}
RANGE_BOUND = ("outside", "inside")
RULE_KINDS = (*SINGLE_BOUND, *RANGE_BOUND)

HOLD, BREAK, MISSING = "HOLD", "BREAK", "MISSING"


# ------------------------------------------------------------------------------- formatting


def fmt(x: float | int, decimals: int | None = None, sign: bool = False) -> str:
    """The one number format of ablate's reports: fixed point, never scientific notation.

    Integers print as integers. Floats print with `decimals` decimals, by default at least
    MIN_DECIMALS and enough to show three significant digits of a small number.
    """
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:+d}" if sign else str(x)
    x = float(x) + 0.0  # -0.0 prints as 0
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if decimals is None:
        decimals = default_decimals(x)
    return f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"


def default_decimals(x: float) -> int:
    """MIN_DECIMALS, or more for |x| < 0.001 so that three significant digits show."""
    if x == 0 or not math.isfinite(x):
        return MIN_DECIMALS
    return min(_MAX_DECIMALS, max(MIN_DECIMALS, 2 - math.floor(math.log10(abs(x)))))


def distinguishing_digits(a: float, b: float, min_decimals: int = MIN_DECIMALS) -> int:
    """Fewest decimals (≥ min_decimals) at which two different floats print differently."""
    a, b = a + 0.0, b + 0.0  # -0.0 prints as 0 (fmt), so its sign tells nothing apart
    d = min_decimals
    if a == b or not (math.isfinite(a) and math.isfinite(b)):
        return d
    while d < _MAX_DECIMALS and f"{a:.{d}f}" == f"{b:.{d}f}":
        d += 1
    return d


def common_decimals(values: Iterable[float], min_decimals: int = MIN_DECIMALS) -> int:
    """Decimals at which every pair of different values in `values` prints differently."""
    vals = sorted({float(v) for v in values if v is not None and math.isfinite(float(v))})
    d = min_decimals
    # Neighbours in sorted order are the closest pairs, so checking them suffices.
    for lo, hi in zip(vals, vals[1:]):
        d = max(d, distinguishing_digits(lo, hi, min_decimals))
    return d


def row_decimals(values: Iterable[float | None]) -> int:
    """Decimals for numbers printed side by side: no two different values print the same, and
    each shows at least its default significant digits (so 9.5e-7 never prints as 0.0000)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return max([common_decimals(vals)] + [default_decimals(v) for v in vals])


def fmt_gap(a: float, b: float, min_decimals: int = MIN_DECIMALS) -> str:
    """|a − b| computed exactly (Decimal) and rounded half-even, with at least min_decimals
    decimals and at least one significant digit, so a nonzero gap never prints as zero."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return "inf"
    gap = exact_gap(a, b)
    d = min_decimals
    if gap != 0:
        d = max(d, -gap.adjusted())
    return f"{gap.quantize(Decimal(1).scaleb(-d), rounding=ROUND_HALF_EVEN, context=_EXACT):f}"


def exact_gap(a: float, b: float) -> Decimal:
    """|a − b| without rounding error."""
    return _EXACT.abs(_EXACT.subtract(Decimal(a), Decimal(b)))


def ceil_at(x: float | Decimal, decimals: int) -> str:
    """x ≥ 0 rounded UP at `decimals` decimals (exact, via Decimal)."""
    return f"{Decimal(x).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_CEILING, context=_EXACT):f}"


# ------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Bound:
    """A threshold bound already evaluated to a float, with the spec expression it came from."""

    value: float
    expr: str


@dataclass
class ThresholdResult:
    name: str
    metric: str
    cell: str
    value: float | None
    rule: dict[str, Any]  # {"kind": str, "bounds": [float, ...], "exprs": [str, ...]}
    verdict: str  # HOLD | BREAK | MISSING
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_rule(rule: dict[str, Any], bound_exprs: Sequence[str] | None = None) -> tuple[str, list[Bound]]:
    """A spec rule {kind: bound} or {kind: [lo, hi]} → (kind, bounds). A bound is a Bound or a
    float; a float takes its expression text from `bound_exprs` (same order) when given."""
    if not isinstance(rule, dict) or len(rule) != 1:
        raise InputError(f"A threshold rule must be a table with exactly one key, one of "
                         f"{', '.join(RULE_KINDS)}; got {rule!r}. Write e.g. break_if = {{ below = 0.7 }}.")
    (kind, raw), = rule.items()
    if kind not in RULE_KINDS:
        raise InputError(f"Unknown threshold rule kind {kind!r}. Available: {', '.join(RULE_KINDS)}.")
    raws = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    want = 2 if kind in RANGE_BOUND else 1
    if len(raws) != want:
        raise InputError(f"Threshold rule {kind!r} takes {want} bound(s), got {len(raws)}: {raw!r}. "
                         f"Write {kind} = [lo, hi] for a range and {kind} = b otherwise.")
    exprs = list(bound_exprs) if bound_exprs else [None] * want
    bounds = []
    for item, text in zip(raws, exprs):
        if isinstance(item, Bound):
            bounds.append(item)
        else:
            value = float(item)
            bounds.append(Bound(value, text if text is not None else repr(value)))
    if kind in RANGE_BOUND and not bounds[0].value <= bounds[1].value:
        raise InputError(f"Threshold rule {kind} = [{bounds[0].expr}, {bounds[1].expr}] has its lower "
                         f"bound above its upper bound; swap them.")
    return kind, bounds


def crosses(kind: str, value: float, bounds: Sequence[float]) -> bool:
    """True when `value` is in the BREAK region of the rule."""
    if kind == "below":
        return value < bounds[0]
    if kind == "at_most":
        return value <= bounds[0]
    if kind == "above":
        return value > bounds[0]
    if kind == "at_least":
        return value >= bounds[0]
    outside = value < bounds[0] or value > bounds[1]
    return outside if kind == "outside" else not outside


def _bound_text(b: Bound, text: str) -> str:
    """The printed bound, followed by its spec expression unless that is just the number."""
    try:
        plain = float(b.expr) == b.value
    except ValueError:
        plain = False
    return text if plain else f"{text} ({b.expr})"


def _gap_decimals(value: float, bound: float) -> int:
    """Decimals that show at least one significant digit of |value − bound|."""
    if value == bound or not (math.isfinite(value) and math.isfinite(bound)):
        return MIN_DECIMALS
    return max(MIN_DECIMALS, -exact_gap(value, bound).adjusted())


def _offset(value: float, bound: float, what: str, d: int) -> str:
    """'GAP above|below WHAT' or 'equal to WHAT', read off the sign of value − bound."""
    if value == bound:
        return f"equal to {what}"
    word = "above" if value > bound else "below"
    return f"{fmt_gap(value, bound, d)} {word} {what}"


def _decimals(value: float | None, bounds: Sequence[float]) -> int:
    """One precision for a value and its bounds: no two different numbers print the same, the
    value shows its default significant digits and every nonzero gap shows a digit."""
    d = common_decimals(list(bounds) + ([] if value is None else [value]))
    if value is not None:
        d = max([d, default_decimals(value)] + [_gap_decimals(value, b) for b in bounds])
    return d


def evaluate(threshold_name: str, metric: str, cell: str, value: float | None, rule: dict[str, Any],
             bound_exprs: Sequence[str] | None = None, metric_label: str | None = None) -> ThresholdResult:
    """Apply one threshold rule to one value and generate its sentence.

    Value, bounds and gaps print at one precision: enough decimals that no two different
    numbers print the same and that every nonzero gap shows a significant digit."""
    kind, bounds = parse_rule(rule, bound_exprs)
    label = metric_label or metric
    nums = [b.value for b in bounds]
    rule_dict = {"kind": kind, "bounds": nums, "exprs": [b.expr for b in bounds]}
    missing = value is None or math.isnan(float(value))
    d = _decimals(None if missing else float(value), nums)
    bt = [fmt(b, d) for b in nums]

    if kind in SINGLE_BOUND:
        condition = f"BREAK if value {SINGLE_BOUND[kind]} {bt[0]}"
        head_bound = f"bound {_bound_text(bounds[0], bt[0])}"
    else:
        lo, hi = (_bound_text(b, t) for b, t in zip(bounds, bt))
        condition = (f"BREAK if value < {bt[0]} or value > {bt[1]}" if kind == "outside"
                     else f"BREAK if {bt[0]} ≤ value ≤ {bt[1]}")
        head_bound = f"band [{lo}, {hi}]"

    if missing:
        sentence = f"{label} has no value vs {head_bound}: {condition}; cannot be evaluated → MISSING"
        return ThresholdResult(threshold_name, metric, cell, None, rule_dict, MISSING, sentence)

    value = float(value)
    verdict = BREAK if crosses(kind, value, nums) else HOLD
    v = fmt(value, d)
    if kind in SINGLE_BOUND:
        where = f"{v} is {_offset(value, nums[0], 'the bound', d)}"
    elif value < nums[0]:
        where = f"{v} is {_offset(value, nums[0], 'the lower bound', d)}"
    elif value > nums[1]:
        where = f"{v} is {_offset(value, nums[1], 'the upper bound', d)}"
    else:
        where = (f"{v} lies in the band, {_offset(value, nums[0], 'the lower bound', d)} "
                 f"and {_offset(value, nums[1], 'the upper bound', d)}")
    sentence = f"{label} {v} vs {head_bound}: {condition}; {where} → {verdict}"
    return ThresholdResult(threshold_name, metric, cell, value, rule_dict, verdict, sentence)


def describe_rule(rule: dict[str, Any]) -> str:
    """A ThresholdResult's rule dict → 'BREAK if value < 10.2735 (log_vocab - 0.1)'."""
    kind, nums = rule["kind"], rule["bounds"]
    bounds = [Bound(v, e) for v, e in zip(nums, rule["exprs"])]
    d = common_decimals(nums)
    text = [_bound_text(b, fmt(b.value, d)) for b in bounds]
    if kind in SINGLE_BOUND:
        return f"BREAK if value {SINGLE_BOUND[kind]} {text[0]}"
    if kind == "outside":
        return f"BREAK if value < {text[0]} or value > {text[1]}"
    return f"BREAK if {text[0]} ≤ value ≤ {text[1]}"


def evaluate_spec_rule(threshold_name: str, metric: str, cell: str, value: float | None, rule: Any,
                       names: dict[str, float], meaning: str = "") -> dict[str, Any]:
    """A spec rule whose bounds may be expressions ("log_vocab - 0.1") → the result as a dict.

    `rule` is a spec RuleSpec (`.kind()`, `.bounds()`) or a plain {kind: bound(s)} dict; bounds
    are evaluated with ablate.expr against `names` and keep their source text."""
    result = evaluate(threshold_name, metric, cell, value, _spec_rule(rule, names))
    return {**result.to_dict(), "meaning": meaning}


def _spec_rule(rule: Any, names: dict[str, float]) -> dict[str, Any]:
    """A spec RuleSpec or {kind: bound(s)} dict → {kind: Bound | [Bound, Bound]}, each bound
    evaluated with ablate.expr and keeping its source text."""
    if isinstance(rule, dict):
        (kind, raw), = rule.items()
        raws = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    else:
        kind, raws = rule.kind(), rule.bounds()
    bounds = [Bound(expr.evaluate(b, names), b if isinstance(b, str) else repr(float(b))) for b in raws]
    return {kind: bounds if kind in RANGE_BOUND else bounds[0]}


# --------------------------------------------------------------------------- strong results

NEGATED = {"<": "≥", "≤": ">", ">": "≤", "≥": "<"}


def strong_result(metric: str, cell: str, value: float | None, rule: Any,
                  names: dict[str, float]) -> dict[str, Any]:
    """A strong-result bound (reference §7.3: content_gain ≥ 0.005 → strong result), evaluated
    like a threshold rule but separate from the crossing thresholds: `rule`'s BREAK side is the
    strong side. → {metric, cell, value, rule, strong: True | False | None (no value), sentence},
    e.g. "strong result: content_gain 0.0071 ≥ 0.0050"."""
    kind, bounds = parse_rule(_spec_rule(rule, names))
    nums = [b.value for b in bounds]
    rule_dict = {"kind": kind, "bounds": nums, "exprs": [b.expr for b in bounds]}
    missing = value is None or math.isnan(float(value))
    d = _decimals(None if missing else float(value), nums)
    bt = [_bound_text(b, fmt(b.value, d)) for b in bounds]
    if kind in SINGLE_BOUND:
        op = SINGLE_BOUND[kind]
        yes, no, cond = f"{op} {bt[0]}", f"{NEGATED[op]} {bt[0]}", f"{op} {bt[0]}"
    else:
        band = f"[{bt[0]}, {bt[1]}]"
        yes, no = (f"outside {band}", f"inside {band}") if kind == "outside" else (f"inside {band}", f"outside {band}")
        cond = yes
    if missing:
        return {"metric": metric, "cell": cell, "value": None, "rule": rule_dict, "strong": None,
                "sentence": f"{metric} has no value: cannot tell a strong result (strong if {cond})"}
    value = float(value)
    strong = crosses(kind, value, nums)
    v = fmt(value, d)
    sentence = f"strong result: {metric} {v} {yes}" if strong else f"not a strong result: {metric} {v} {no} (strong if {cond})"
    return {"metric": metric, "cell": cell, "value": value, "rule": rule_dict, "strong": strong, "sentence": sentence}


# ------------------------------------------------------------------------------ combining


def combine(results_for_cell: Iterable[ThresholdResult | dict], soft_at: int = 1, broken_at: int = 2,
            strong: Iterable[dict | str] = ()) -> dict[str, Any]:
    """Count crossed thresholds of one cell → label 'holds' | 'soft signal' | 'broken'.

    `strong`: the cell's evaluated strong-result bounds (`strong_result` dicts), recorded under
    `strong_results`; `strong` is True when one of them is satisfied. They are not thresholds and
    are never counted. (A plain string is the older form: a threshold name whose BREAK marks a
    strong result.)"""
    rows = [r.to_dict() if isinstance(r, ThresholdResult) else r for r in results_for_cell]
    bounds = [s for s in strong if not isinstance(s, str)]
    strong_names = {s for s in strong if isinstance(s, str)}
    crossed = [r["name"] for r in rows if r["verdict"] == BREAK]
    missing = [r["name"] for r in rows if r["verdict"] == MISSING]
    n = len(crossed)
    label = "broken" if n >= broken_at else "soft signal" if n >= soft_at else "holds"
    return {
        "crossed": n,
        "total": len(rows),
        "missing": len(missing),
        "label": label,
        "strong": any(b["strong"] is True for b in bounds) or any(name in strong_names for name in crossed),
        "strong_results": bounds,
        "crossed_names": crossed,
        "missing_names": missing,
    }


DISCRIMINATOR = {
    (True, True): ("cheap_win", "the objective forces sharpness regardless of content — a cheap win, not routing"),
    (True, False): ("clean_positive", "content-dependent signal — the clean positive result"),
    (False, False): ("holds", "the objective did not break it; the attractor resists the objective at this scale"),
    (False, True): ("anomaly", "anomaly: only the shuffled cell broke; suspect an indexing bug in the target lookup"),
}


def discriminate(real_broken: bool, shuffled_broken: bool) -> dict[str, str]:
    """The real-vs-shuffled verdict matrix: which of the four outcomes, and what it means."""
    outcome, meaning = DISCRIMINATOR[(bool(real_broken), bool(shuffled_broken))]
    return {"outcome": outcome, "meaning": meaning}


def agreement(name_a: str, a: float, name_b: str, b: float, unit: str = "") -> str:
    """'A (a) and B (b) agree within TOL unit', TOL = |a − b| rounded up at the printed
    precision, so the claim is always true and never looser than one printed unit."""
    unit = f" {unit}" if unit else ""
    if a == b:
        return f"{name_a} and {name_b} agree exactly (both {fmt(a)}{unit})"
    d = distinguishing_digits(a, b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return f"{name_a} ({fmt(a, d)}) and {name_b} ({fmt(b, d)}) do not agree"
    tol = ceil_at(exact_gap(a, b), d)
    return f"{name_a} ({fmt(a, d)}) and {name_b} ({fmt(b, d)}) agree within {tol}{unit}"


# ------------------------------------------------------------------------- η-B battery rubric


@dataclass(frozen=True)
class Condition:
    """One bound of the rubric: `metric` (a per-layer name with {l}) on side `kind` of `bound`."""

    label: str  # the reference's short name, e.g. "D"
    metric: str
    kind: str  # a SINGLE_BOUND kind
    bound: float


@dataclass(frozen=True)
class Reading:
    """A topic's outcomes in order: the first whose conditions all hold names the reading."""

    topic: str
    outcomes: tuple[tuple[str, tuple[Condition, ...]], ...]
    otherwise: str


_D = Condition("D", "retrieval_unique_frac_L{l}", "at_most", 0.05)
_E = Condition("E", "attn_entropy_L{l}", "at_least", 0.9)
_GAP = Condition("P-gap", "retrieval_gap_L{l}", "at_most", 0.05)
_C_ABS = Condition("C |abs|", "cross_run_inj_abs_cos_L{l}", "at_most", 0.1)
_AXIS = "inj_axis_rms_L{l}"
_A_ABS = "inj_hidden_abs_cos_L{l}"
_X_ABS = "content_swap_abs_cos_L{l}"
_JACCARD = "topk_jaccard_mean_L{l}"
_CV = "row_usage_cv_L{l}"
_RATIO = "v_rank_hard_ratio_L{l}"

# Reference §7.5 "Rubric thresholds", its ≲ / ≳ read as ≤ / ≥. Each reading is made per run (the
# real and the control cell of a pair, each with the pair's cross-run metrics); the reference's
# "retrieval broken on both runs" is the two runs' readings agreeing.
BATTERY_RUBRIC: tuple[Reading, ...] = (
    Reading("retrieval", (("broken", (_D, _E, _GAP)),), "healthy"),
    Reading("injection", (
        ("broken", (Condition("M", "inj_ratio_L{l}", "at_most", 0.01), _C_ABS)),
        ("I* (sizeable but not shared across runs)", (Condition("M", "inj_ratio_L{l}", "at_least", 0.05), _C_ABS)),
    ), "live"),
    Reading("residual", (
        ("fixed residual amplifier", (Condition("W axis RMS", _AXIS, "at_least", 0.9),
                                      Condition("A |abs|", _A_ABS, "at_least", 0.5))),
        ("non-residual", (Condition("A |abs|", _A_ABS, "at_most", 0.2),)),
    ), "in between"),
    Reading("alignment", (
        ("distributional alignment (D*)", (Condition("W axis RMS", _AXIS, "at_most", 0.5),
                                           Condition("C", "cross_run_inj_cos_L{l}", "at_least", 0.3))),
    ), "not D*"),
    Reading("V content", (
        ("content-blind", (Condition("X |abs|", _X_ABS, "at_least", 0.8),)),
        ("content-sensitive", (Condition("X |abs|", _X_ABS, "at_most", 0.2),)),
    ), "in between"),
    Reading("per-token retrieval", (
        ("fixed", (Condition("Jaccard", _JACCARD, "at_least", 0.8),)),
        ("dispersive", (Condition("Jaccard", _JACCARD, "at_most", 0.2),)),
    ), "in between"),
    Reading("occupancy", (
        ("collapsed", (Condition("CV", _CV, "at_least", 2.0),)),
        ("dominated", (Condition("CV", _CV, "at_least", 1.0),)),
        ("near-uniform", (Condition("CV", _CV, "at_most", 0.3),)),
    ), "uneven"),
    Reading("V rank", (
        ("compresses severely", (Condition("v/e", _RATIO, "at_most", 0.5),)),
        ("compresses", (Condition("v/e", _RATIO, "at_most", 0.8),)),
    ), "no compression"),
)


def rubric_metrics() -> set[str]:
    """Every metric template the rubric reads."""
    return {c.metric for r in BATTERY_RUBRIC for _, conds in r.outcomes for c in conds}


def read_battery(metrics: dict[str, float], layer: int) -> dict[str, str | None]:
    """One run's rubric readings at one injection layer: topic → words, or None when a metric the
    topic needs is missing. `metrics`: the cell's metrics with its pair's cross-run metrics."""
    out: dict[str, str | None] = {}
    for reading in BATTERY_RUBRIC:
        names = {c.metric.format(l=layer) for _, conds in reading.outcomes for c in conds}
        if not names <= metrics.keys():
            out[reading.topic] = None
            continue
        out[reading.topic] = next(
            (word for word, conds in reading.outcomes
             if all(crosses(c.kind, float(metrics[c.metric.format(l=layer)]), [c.bound]) for c in conds)),
            reading.otherwise)
    return out


def rubric_text() -> str:
    """The rubric in words, e.g. 'retrieval: broken if D (retrieval_unique_frac) ≤ 0.05 and …'."""
    def cond(c: Condition) -> str:
        return f"{c.label} ({c.metric.removesuffix('_L{l}')}) {SINGLE_BOUND[c.kind]} {c.bound:g}"

    parts = []
    for r in BATTERY_RUBRIC:
        cases = "; ".join(f"{word} if {' and '.join(cond(c) for c in conds)}" for word, conds in r.outcomes)
        parts.append(f"{r.topic}: {cases}; else {r.otherwise}")
    return ("η-B battery rubric (reference §7.5, ≲/≳ read as ≤/≥), per injection layer and per run, the "
            "cross-run metrics C taken from the run's pair; the first matching case names the reading. "
            + ". ".join(parts) + ".")
