"""Thresholds → HOLD/BREAK verdicts (over seeds: on a Student-t interval of the mean, UNDECIDED when
it straddles a bound), strong-result bounds, their combination per cell, the real-vs-shuffled
discriminator, the outer objective × teacher 2×2, and the η-B battery rubric. Thresholds and
strong bounds arrive as data (the spec); the rubric is the reference's fixed reading of its
battery (§7.5), kept as data in BATTERY_RUBRIC. Every comparison goes through `crosses`, and
every sentence is generated from the rule and the numbers, so a comparison word can never
contradict the arithmetic and two different numbers never print the same.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal
from typing import Any, Iterable, Sequence

from ablate.config import expr
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


def fmt_rate(x: float | None, digits: int = 3) -> str:
    """A measured rate (tokens/s) at `digits` significant digits with a k/M/G suffix: 461102.7 →
    '461k', 1234.5 → '1.23k', 87.21 → '87.2'. A single timing supports no more digits."""
    if x is None:
        return "—"
    x = float(x)
    if not math.isfinite(x) or x == 0:
        return fmt(x)
    e = math.floor(math.log10(abs(x)))
    r = round(x, digits - 1 - e)  # rounded at its significant digits first: 999.96 → 1000
    e = math.floor(math.log10(abs(r)))
    scale, suffix = next((k, s) for k, s in ((9, "G"), (6, "M"), (3, "k"), (0, "")) if e >= k or k == 0)
    return f"{r / 10 ** scale:.{max(0, digits - 1 - (e - scale))}f}{suffix}"


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


def break_region(kind: str, bounds: Sequence[float]) -> list[tuple[float, float, bool, bool]]:
    """The BREAK region of a rule ([threshold.break_if], [combine] strong, the battery's
    conditions) as intervals (low, high, low_closed, high_closed), ±inf at open ends: the one
    definition the verdicts, expectations and plots read."""
    inf, b = math.inf, bounds
    return {"below": [(-inf, b[0], False, False)], "at_most": [(-inf, b[0], False, True)],
            "above": [(b[0], inf, False, False)], "at_least": [(b[0], inf, True, False)],
            "outside": [(-inf, b[0], False, False), (b[-1], inf, False, False)],
            "inside": [(b[0], b[-1], True, True)]}[kind]


def crosses(kind: str, value: float, bounds: Sequence[float]) -> bool:
    """True when `value` is in the BREAK region of the rule."""
    return any((lo < value or (lo_closed and value == lo)) and (value < hi or (hi_closed and value == hi))
               for lo, hi, lo_closed, hi_closed in break_region(kind, bounds))


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
    are evaluated with ablate.config.expr against `names` and keep their source text."""
    result = evaluate(threshold_name, metric, cell, value, _spec_rule(rule, names))
    return {**result.to_dict(), "meaning": meaning}


def _spec_rule(rule: Any, names: dict[str, float]) -> dict[str, Any]:
    """A spec RuleSpec or {kind: bound(s)} dict → {kind: Bound | [Bound, Bound]}, each bound
    evaluated with ablate.config.expr and keeping its source text."""
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


# ------------------------------------------------------------------------------ over seeds

UNDECIDED = "UNDECIDED"
SINGLE_SEED = "single seed"
CONFIDENCE = 0.95
INTERVAL_METHOD = ("Student-t 95% confidence interval of the mean over seeds: mean ± t(0.975, n − 1) · s / √n, "
                   "s the sample standard deviation (n − 1 in its denominator). BREAK when the whole interval "
                   "lies on the BREAK side of the rule, HOLD when none of it does, UNDECIDED when it straddles a "
                   "bound. One seed has no interval: its verdict is the value's own, labelled single seed.")


def t_cdf(x: float, df: int) -> float:
    """P(T ≤ x) for Student's t with an integer number of degrees of freedom df ≥ 1, in closed form
    (Abramowitz & Stegun 26.7.3–4: finite sums in θ = atan(x / √df))."""
    theta = math.atan(x / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    total = term = 1.0
    if df % 2:  # odd: A = 2/π (θ + sin θ cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + …)), A = 2θ/π at df = 1
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: A = sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + a / 2  # A = P(|T| < |x|), signed with x


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with df degrees of freedom, by bisection of t_cdf."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """n, mean, sample sd, half-width and interval of the mean over seeds (INTERVAL_METHOD);
    sd, half_width and the interval are None for one value."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"n_seeds": n, "mean": mean, "sd": None, "half_width": None, "ci_low": None, "ci_high": None}
    if min(values) == max(values):  # identical values: no spread (fsum / n may round off the value)
        mean, sd = float(values[0]), 0.0
    else:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return {"n_seeds": n, "mean": mean, "sd": sd, "half_width": half, "ci_low": mean - half, "ci_high": mean + half}


def interval_verdict(kind: str, low: float, high: float, bounds: Sequence[float]) -> str:
    """BREAK when every value of [low, high] crosses the rule, HOLD when none does, else UNDECIDED."""
    at_low, at_high = crosses(kind, low, bounds), crosses(kind, high, bounds)
    spans_band = kind in RANGE_BOUND and low < bounds[0] and high > bounds[1]
    every = at_low and at_high and not (kind == "outside" and spans_band)
    none = not (at_low or at_high) and not (kind == "inside" and spans_band)
    return BREAK if every else HOLD if none else UNDECIDED


def uncertainty_decimals(half_width: float | None) -> int:
    """Decimals that show two significant digits of an interval's half-width."""
    if not half_width or not math.isfinite(half_width):
        return MIN_DECIMALS
    return max(0, 1 - math.floor(math.log10(half_width)))


def _interval_text(stats: dict, nums: Sequence[float]) -> tuple[int, str]:
    """(decimals, 'mean M over N seeds (sd S; 95% t-interval [L, H])'): two significant digits of
    the half-width, more where the interval's ends and the bounds would otherwise print alike."""
    lo, hi = stats["ci_low"], stats["ci_high"]
    d = common_decimals([lo, hi, stats["mean"], *nums], min_decimals=uncertainty_decimals(stats["half_width"]))
    sd = fmt(stats["sd"], max(d, uncertainty_decimals(stats["sd"])))
    return d, (f"mean {fmt(stats['mean'], d)} over {stats['n_seeds']} seeds (sd {sd}; "
               f"{round(CONFIDENCE * 100)}% t-interval [{fmt(lo, d)}, {fmt(hi, d)}])")


def _interval_bounds(bounds: Sequence[Bound], d: int) -> list[str]:
    """Bounds beside an interval printed at `d` decimals: at their own precision when that shows
    them exactly (0.14 → 0.1400), else at d or more, so no end of the interval seems to lie on
    the wrong side of a bound."""
    own = max([common_decimals([b.value for b in bounds])] + [default_decimals(b.value) for b in bounds])
    exact = all(float(fmt(b.value, own)) == b.value for b in bounds)
    return [_bound_text(b, fmt(b.value, own if exact else max(own, d))) for b in bounds]


def _where_interval(kind: str, verdict: str, sides: tuple[str, str] = ("BREAK side", "HOLD side")) -> str:
    if kind in SINGLE_BOUND:
        return {BREAK: f"the whole interval lies on the {sides[0]} of the bound",
                HOLD: f"the whole interval lies on the {sides[1]} of the bound",
                UNDECIDED: "the interval straddles the bound"}[verdict]
    band_side = {BREAK: "outside" if kind == "outside" else "inside", HOLD: "inside" if kind == "outside" else "outside"}
    if verdict == UNDECIDED:
        return "the interval overlaps an edge of the band"
    return f"the whole interval lies {band_side[verdict]} the band"


def evaluate_over_seeds(threshold_name: str, metric: str, cell: str, per_seed: Sequence[tuple[int | None, str, float | None]],
                        rule: Any, names: dict[str, float], meaning: str = "") -> dict[str, Any]:
    """One threshold over a seed group: `per_seed` is (seed, cell name, value or None) per seed.
    → evaluate_spec_rule's dict for the group (`cell` = the group, `value` = the mean) plus n_seeds,
    mean, sd, ci_low, ci_high, basis ("single seed" or the interval), and `seeds`: each seed's own
    value and verdict. One value: the verdict is that value's (today's verdicts)."""
    seeds = [{"seed": s, "cell": c, "value": v,
              "verdict": evaluate_spec_rule(threshold_name, metric, c, v, rule, names)["verdict"]}
             for s, c, v in per_seed]
    values = [float(v) for _, _, v in per_seed if v is not None and not math.isnan(float(v))]
    missing = [s["seed"] for s in seeds if s["verdict"] == MISSING]
    extra = {"seeds": seeds, "missing_seeds": missing}
    if len(values) < 2:
        out = evaluate_spec_rule(threshold_name, metric, cell, values[0] if values else None, rule, names, meaning)
        stats = seed_interval(values) if values else {"n_seeds": 0, "mean": None, "sd": None, "half_width": None,
                                                      "ci_low": None, "ci_high": None}
        return {**out, **stats, "basis": SINGLE_SEED if values else "no value", **extra}
    spec_rule = _spec_rule(rule, names)
    kind, bounds = parse_rule(spec_rule)
    nums = [b.value for b in bounds]
    stats = seed_interval(values)
    verdict = interval_verdict(kind, stats["ci_low"], stats["ci_high"], nums)
    d, head = _interval_text(stats, nums)
    bt = _interval_bounds(bounds, d)
    plain = [t.split(" (")[0] for t in bt]
    if kind in SINGLE_BOUND:
        against, condition = f"bound {bt[0]}", f"BREAK if mean {SINGLE_BOUND[kind]} {plain[0]}, read on its interval"
    else:
        against = f"band [{bt[0]}, {bt[1]}]"
        condition = (f"BREAK if mean < {plain[0]} or mean > {plain[1]}" if kind == "outside"
                     else f"BREAK if {plain[0]} ≤ mean ≤ {plain[1]}") + ", read on its interval"
    gone = f" ({len(missing)} seed(s) without a value)" if missing else ""
    sentence = f"{metric} {head}{gone} vs {against}: {condition}; {_where_interval(kind, verdict)} → {verdict}"
    rule_dict = {"kind": kind, "bounds": nums, "exprs": [b.expr for b in bounds]}
    # how far the interval stays from the nearest bound (0 when it straddles one)
    margin = 0.0 if verdict == UNDECIDED else min(abs(e - b) for e in (stats["ci_low"], stats["ci_high"]) for b in nums)
    return {"name": threshold_name, "metric": metric, "cell": cell, "value": stats["mean"], "rule": rule_dict,
            "verdict": verdict, "sentence": sentence, "meaning": meaning, **stats, "margin": margin,
            "basis": f"{round(CONFIDENCE * 100)}% t-interval over {stats['n_seeds']} seeds", **extra}


def strong_over_seeds(metric: str, cell: str, per_seed: Sequence[tuple[int | None, str, float | None]], rule: Any,
                      names: dict[str, float]) -> dict[str, Any]:
    """A strong-result bound over a seed group, like evaluate_over_seeds: strong True when the
    whole interval is on the strong side, False when none of it is, None when it straddles (or
    there is no value). One value: strong_result's reading of it."""
    values = [float(v) for _, _, v in per_seed if v is not None and not math.isnan(float(v))]
    if len(values) < 2:
        return {**strong_result(metric, cell, values[0] if values else None, rule, names), "n_seeds": len(values)}
    kind, bounds = parse_rule(_spec_rule(rule, names))
    nums = [b.value for b in bounds]
    stats = seed_interval(values)
    reading = interval_verdict(kind, stats["ci_low"], stats["ci_high"], nums)
    strong = {BREAK: True, HOLD: False, UNDECIDED: None}[reading]
    d, head = _interval_text(stats, nums)
    bt = _interval_bounds(bounds, d)
    cond = (f"{SINGLE_BOUND[kind]} {bt[0]}" if kind in SINGLE_BOUND else f"{kind} [{bt[0]}, {bt[1]}]")
    word = {True: "strong result", False: "not a strong result", None: "strong result undecided"}[strong]
    sentence = f"{word}: {metric} {head}; strong if {cond}: {_where_interval(kind, reading, ('strong side', 'other side'))}"
    rule_dict = {"kind": kind, "bounds": nums, "exprs": [b.expr for b in bounds]}
    return {"metric": metric, "cell": cell, "value": stats["mean"], "rule": rule_dict, "strong": strong,
            "sentence": sentence, **stats}


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
    undecided = [r["name"] for r in rows if r["verdict"] == UNDECIDED]
    missing = [r["name"] for r in rows if r["verdict"] == MISSING]
    n = len(crossed)

    def label_of(k: int) -> str:
        return "broken" if k >= broken_at else "soft signal" if k >= soft_at else "holds"

    # An UNDECIDED threshold may read either way: the label is certain only when every count of
    # crossings from n (none of them BREAK) to n + len(undecided) (all of them) gives the same label.
    possible = list(dict.fromkeys(label_of(k) for k in range(n, n + len(undecided) + 1)))
    return {
        "crossed": n,
        "total": len(rows),
        "missing": len(missing),
        "undecided": len(undecided),
        "label": possible[0] if len(possible) == 1 else UNDECIDED_LABEL,
        "possible_labels": possible,
        "broken": True if n >= broken_at else False if n + len(undecided) < broken_at else None,
        "strong": any(b["strong"] is True for b in bounds) or any(name in strong_names for name in crossed),
        "strong_results": bounds,
        "crossed_names": crossed,
        "undecided_names": undecided,
        "missing_names": missing,
    }


UNDECIDED_LABEL = "undecided"


DISCRIMINATOR = {
    (True, True): ("cheap_win", "the objective forces sharpness regardless of content — a cheap win, not routing"),
    (True, False): ("clean_positive", "content-dependent signal — the clean positive result"),
    (False, False): ("holds", "the objective did not break it; the attractor resists the objective at this scale"),
    (False, True): ("anomaly", "anomaly: only the shuffled cell broke; suspect an indexing bug in the target lookup"),
}


def discriminate(real_broken: bool | None, shuffled_broken: bool | None) -> dict[str, Any]:
    """The real-vs-shuffled verdict matrix: which of the four outcomes, and what it means. None
    (whether the cell is broken is undecided over its seeds) admits both: the outcome is
    "undecided" when the possible outcomes differ, and `possible` lists them."""
    sides = [(True, False) if b is None else (bool(b),) for b in (real_broken, shuffled_broken)]
    possible = list(dict.fromkeys(DISCRIMINATOR[(r, s)][0] for r in sides[0] for s in sides[1]))
    if len(possible) == 1:
        outcome, meaning = DISCRIMINATOR[(sides[0][0], sides[1][0])]
        return {"outcome": outcome, "meaning": meaning, "possible": possible}
    return {"outcome": UNDECIDED_LABEL, "possible": possible,
            "meaning": f"undecided between {' and '.join(possible)}: a threshold's interval straddles its bound; "
                       "more seeds narrow the intervals"}


def per_seed_labels(own: Sequence[dict], soft_at: int = 1, broken_at: int = 2) -> list[dict[str, Any]]:
    """Each seed's own combination of a seed group's thresholds (evaluate_over_seeds dicts), from
    the per-seed verdicts: [{seed, label, broken}] in seed order; [] for a single seed."""
    seeds = list(dict.fromkeys(s["seed"] for t in own for s in t.get("seeds", [])))
    if len(seeds) < 2:
        return []
    out = []
    for seed in seeds:
        rows = [{"name": t["name"], "verdict": next((s["verdict"] for s in t["seeds"] if s["seed"] == seed), MISSING)}
                for t in own]
        c = combine(rows, soft_at, broken_at)
        out.append({"seed": seed, "label": c["label"], "broken": c["broken"]})
    return out


def per_seed_text(readings: Sequence[tuple[Any, str]]) -> str:
    """(seed, reading) pairs in words, grouped by reading: 'holds at all 3 seeds', or
    'holds (seeds 0, 1), clean_positive (seed 2)'."""
    groups: dict[str, list[str]] = {}
    for seed, word in readings:
        groups.setdefault(word, []).append(str(seed))
    if len(groups) == 1 and len(readings) > 1:
        return f"{next(iter(groups))} at all {len(readings)} seeds"
    return ", ".join(f"{w} (seed{'s' if len(ss) > 1 else ''} {', '.join(ss)})" for w, ss in groups.items())


def label_text(comb: dict) -> str:
    """A combination's label, 'holds or soft signal' when undecided."""
    return " or ".join(comb.get("possible_labels") or [comb["label"]]) if comb["label"] == UNDECIDED_LABEL \
        else comb["label"]


def discriminator_sentence(d: dict, real: dict, shuffled: dict, n_seeds: int) -> str:
    """One discriminator's reading with its uncertainty, e.g. 'holds over 3 seeds (95% t-intervals):
    real holds (0 of 5 thresholds BREAK, 1 UNDECIDED: alpha); shuffled holds (0 of 3 …); per seed: …'."""
    def side(role: str, c: dict) -> str:
        parts = f"{c['crossed']} of {c['total']} thresholds BREAK"
        if c.get("undecided"):
            parts += f", {c['undecided']} UNDECIDED: {', '.join(c['undecided_names'])}"
        if c.get("missing"):
            parts += f", {c['missing']} MISSING"
        return f"{role} {label_text(c)} ({parts})"

    head = d["outcome"] if d["outcome"] != UNDECIDED_LABEL else f"undecided between {' and '.join(d['possible'])}"
    basis = (f"over {n_seeds} seeds, {round(CONFIDENCE * 100)}% t-intervals" if n_seeds > 1
             else f"{SINGLE_SEED}: no interval")
    out = f"{head} ({basis}): {side('real', real)}; {side('shuffled', shuffled)}"
    if d.get("per_seed"):
        out += "; per seed: " + per_seed_text([(p["seed"], p["outcome"]) for p in d["per_seed"]])
    return out


# ------------------------------------------------------------------ the outer 2×2 (reference §7.4)

# (objective-axis run, teacher-axis run) → interpretation → next step, for each run's reading:
# breaks (its discriminated real cell is broken), holds, soft (a soft signal).
OUTER = {
    ("breaks", "breaks"): "objective alone suffices → lead with KL+CE; teacher match is a multiplier",
    ("breaks", "holds"): "objective dominates → KL+CE primary, teacher choice secondary",
    ("holds", "breaks"): "teacher architecture dominates → same-arch teacher as substrate, drop KL focus",
    ("holds", "holds"): "structural ceiling at 40M → non-linear W_align or unfreeze the backbone",
}
OUTER_SOFT = "soft signal → longer training, λ sweep, find which broke first"
OUTER_SOFT_TEACHER = ("soft signal in the teacher-axis run (not a row of §7.4; read like its soft row) → longer "
                      "training, find which broke first")
READINGS = {"broken": "breaks", "holds": "holds", "soft signal": "soft"}


def outer_cell(objective_run: str, teacher_run: str) -> str:
    """The §7.4 outer-matrix interpretation of two readings (breaks | holds | soft)."""
    if objective_run == "soft":
        return OUTER_SOFT
    if teacher_run == "soft":
        return OUTER_SOFT_TEACHER
    return OUTER[(objective_run, teacher_run)]


def run_reading(results: dict) -> dict[str, Any]:
    """A run's place on the outer 2×2: from the combination of each discriminated real cell,
    breaks if one breaks, else soft if one is a soft signal, else holds; undecided (with the
    `possible` readings) when an undecided label could change that. {reading, possible, cells, role}."""
    comb = results.get("combination") or {}
    reals = [d["real"] for d in results.get("discriminator") or [] if d["real"] in comb]
    axes = results.get("axes") or {}
    role = "objective" if axes.get("objective") not in (None, "ce", "unspecified") else "teacher"
    if not reals:
        return {"reading": None, "possible": [], "cells": {}, "role": role}
    options = [[READINGS[label] for label in (comb[r].get("possible_labels") if comb[r]["label"] == UNDECIDED_LABEL
                                              else [comb[r]["label"]])] for r in reals]

    def overall(readings: Sequence[str]) -> str:
        return "breaks" if "breaks" in readings else "soft" if "soft" in readings else "holds"

    possible = sorted({overall(combo) for combo in itertools.product(*options)}, key=["breaks", "soft", "holds"].index)
    return {"reading": possible[0] if len(possible) == 1 else UNDECIDED_LABEL, "possible": possible,
            "cells": {r: label_text(comb[r]) for r in reals}, "role": role}


def outer_reading(objective_run: dict, teacher_run: dict) -> dict[str, Any]:
    """Two runs' run_reading → the outer 2×2 reading: the interpretation, or every interpretation
    the undecided readings leave open."""
    options = list(dict.fromkeys(outer_cell(a, b) for a in objective_run["possible"] for b in teacher_run["possible"]))
    if not options:
        return {"reading": None, "options": [], "sentence": "no reading: a run has no discriminated pair with a combination"}
    if len(options) == 1:
        return {"reading": options[0], "options": options, "sentence": options[0]}
    return {"reading": UNDECIDED_LABEL, "options": options,
            "sentence": "undecided between: " + "; ".join(options) + " (more seeds narrow the intervals)"}


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
