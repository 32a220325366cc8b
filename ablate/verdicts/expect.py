"""`[expect]`: the outcomes a spec must produce (calibration). Each expectation becomes a row
{what, expected, got, met}; `ablate run` exits 1 when any is unmet. With a seed axis, cells are
named by their seed group and read over its seeds, like the thresholds."""

from __future__ import annotations

from ablate.config import expr
from ablate.verdicts.verdict import BREAK, evaluate_over_seeds


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
        # the cell itself, or every seed of a seed group: the rule must hold over the seeds' t-interval
        per_seed = [(c.get("config", {}).get("seed"), name, c.get("metrics", {}).get(metric))
                    for name, c in results["cells"].items() if cell in (name, c.get("config", {}).get("seed_group"))]
        r = evaluate_over_seeds(key, metric, cell, per_seed, rule, names)
        met = r["verdict"] == BREAK  # the BREAK side of the rule
        bounds = [expr.evaluate(b, names) for b in rule.bounds()]
        want = f"{rule.kind()} {', '.join(f'{b:.4g}' for b in bounds)}"
        if r["value"] is None:
            got = "MISSING"
        elif r["n_seeds"] < 2:
            got = f"{r['value']:.6g}"
        else:
            got = f"mean {r['mean']:.6g}, {r['n_seeds']} seeds, interval [{r['ci_low']:.6g}, {r['ci_high']:.6g}]"
        rows.append({"what": f"metric {key}", "expected": want, "got": got, "met": met})
    return rows

