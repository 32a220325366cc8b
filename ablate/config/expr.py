"""Threshold bound expressions such as "log_vocab - 0.1": parsed with `ast`, never run as Python.

Allowed: numbers, the names given by the caller, + − × ÷, unary minus, parentheses, and the
functions ln/log (natural), sqrt, exp.
"""

from __future__ import annotations

import ast
import math

FUNCTIONS = {"ln": math.log, "log": math.log, "sqrt": math.sqrt, "exp": math.exp}
BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

# Names a threshold bound may use; values are filled in from the run (vocab, oracle rows).
KNOWN_NAMES = ("log_vocab", "vocab_size", "rows", "log_rows", "unigram_entropy")


class ExprError(ValueError):
    pass


def names_in(text: str) -> set[str]:
    """The free names of an expression (raises ExprError on syntax outside the grammar)."""
    tree = _parse(text)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in FUNCTIONS}


def evaluate(value: float | int | str, names: dict[str, float]) -> float:
    """A number stays a number; a string is parsed and evaluated against `names`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float(_eval(_parse(str(value)).body, names))


def _parse(text: str) -> ast.Expression:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"cannot parse expression {text!r}: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call,
                                 ast.Load, ast.USub, ast.UAdd, *BINARY)):
            raise ExprError(f"expression {text!r} uses {type(node).__name__}; allowed: numbers, names "
                            f"({', '.join(KNOWN_NAMES)}), + - * /, parentheses, {', '.join(FUNCTIONS)}()")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise ExprError(f"expression {text!r}: only numeric constants are allowed")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
                                               and len(node.args) == 1 and not node.keywords):
            raise ExprError(f"expression {text!r}: only one-argument calls of {', '.join(FUNCTIONS)} are allowed")
    return tree


def _eval(node: ast.AST, names: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ExprError(f"unknown name {node.id!r}; known: {', '.join(sorted(names))}")
        return names[node.id]
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        return BINARY[type(node.op)](_eval(node.left, names), _eval(node.right, names))
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](_eval(node.args[0], names))
    raise ExprError(f"unsupported expression node {type(node).__name__}")
