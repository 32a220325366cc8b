"""`[expect]`: the outcomes a spec must produce (calibration). Each expectation becomes a row
{what, expected, got, met}; `ablate run` exits 1 when any is unmet."""

from __future__ import annotations

from ablate import expr
from ablate.verdict import crosses


def check_expectations(expect, results: dict, names: dict[str, float]) -> list[dict]:
    rows = []
    verdicts = {f"{t['name']}@{t['cell']}": t["verdict"] for t in results["thresholds"]}
    for key, want in expect.thresholds.items():
        got = verdicts.get(key, "MISSING")
        rows.append({"what": f"threshold {key}", "expected": want, "got": got, "met": got == want})
    for cell, want in expect.combination.items():
        got = results["combination"].get(cell, {}).get("label", "MISSING")
        rows.append({"what": f"combination {cell}", "expected": want, "got": got, "met": got == want})
    outcomes = {d["real"]: d["outcome"] for d in results["discriminator"]}
    for cell, want in expect.discriminator.items():
        got = outcomes.get(cell, "MISSING")
        rows.append({"what": f"discriminator {cell}", "expected": want, "got": got, "met": got == want})
    for key, rule in expect.metrics.items():
        metric, _, cell = key.partition("@")
        value = results["cells"].get(cell, {}).get("metrics", {}).get(metric)
        kind, bounds = rule.kind(), [expr.evaluate(b, names) for b in rule.bounds()]
        met = value is not None and crosses(kind, value, bounds)  # the BREAK side of the rule
        want = f"{kind} {', '.join(f'{b:.4g}' for b in bounds)}"
        rows.append({"what": f"metric {key}", "expected": want, "got": "MISSING" if value is None else f"{value:.6g}", "met": met})
    return rows

