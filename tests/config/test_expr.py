"""Threshold bound expressions are parsed, never executed, and compute what they say."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ablate.config import expr

NAMES = {"log_vocab": math.log(32000), "vocab_size": 32000.0, "rows": 10000.0, "log_rows": math.log(10000)}


def test_reference_bound():
    assert expr.evaluate("log_vocab - 0.1", NAMES) == pytest.approx(10.2735, abs=5e-5)  # §7.3: ln 32000 − 0.1
    assert expr.evaluate(0.7, NAMES) == 0.7
    assert expr.evaluate("ln(rows) / 2", NAMES) == pytest.approx(math.log(10000) / 2)


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "open('x')", "log_vocab.real", "[1][0]",
                                  "lambda: 1", "1 if 1 else 2", "'a'", "log_vocab ** 2", "max(1, 2)"])
def test_anything_beyond_arithmetic_is_refused(text):
    with pytest.raises(expr.ExprError):
        expr.evaluate(text, NAMES)


def test_unknown_name_lists_known():
    with pytest.raises(expr.ExprError, match="log_vocab"):
        expr.evaluate("log_vocabulary - 1", NAMES)


@st.composite
def expressions(draw, depth=3):
    """(text, float64 value computed independently of the parser)."""
    if depth == 0 or draw(st.booleans()):
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(NAMES)))
            return name, NAMES[name]
        x = draw(st.floats(0.001, 1000, allow_nan=False))
        return repr(x), x
    (a, va), (b, vb) = draw(expressions(depth - 1)), draw(expressions(depth - 1))
    op = draw(st.sampled_from("+-*/"))
    if op == "/" and vb == 0:
        op = "+"
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else 0}[op]
    return f"({a} {op} {b})", value


@settings(max_examples=100, deadline=None)
@given(expressions())
def test_arithmetic_matches_direct_computation(case):
    text, value = case
    assert expr.evaluate(text, NAMES) == pytest.approx(value, rel=1e-12, abs=1e-12)
