"""Countdown verifier: reach a target with + - * / using each given number exactly once.

The game used by TinyZero-style RL experiments. An example holds ``nums`` (or
``numbers``) and ``target``; the completion gives an equation in
``<answer>...</answer>``, ``\\boxed{}``, or on its last line. Arithmetic is exact
(fractions), and only numbers, the four operators and parentheses are allowed,
so nothing in the completion is ever executed.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from verifiers import _pyast
from verifiers.base import Verdict
from verifiers.math.latex import last_boxed

__all__ = ["evaluate", "extract_equation", "verify"]

_MAX_CHARS = 500
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def extract_equation(completion: str) -> str | None:
    """The equation the completion commits to: last ``<answer>``, last ``\\boxed{}``, else last line."""
    tags = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    text = tags[-1] if tags else last_boxed(completion)
    if text is None:
        lines = [line for line in completion.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else None
    if text is None:
        return None
    text = text.strip().strip("$").replace("\\times", "*").replace("\\cdot", "*")
    text = text.replace("\\div", "/").replace("×", "*").replace("÷", "/").replace("−", "-")
    # "25 + 3 * 4 = 37": the left side is the expression.
    return text.split("=")[0].strip() or None


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the numbers it uses.

    Raises:
        ValueError: anything beyond integers, + - * / and parentheses, or division by zero.
    """
    if len(expression) > _MAX_CHARS:
        raise ValueError("expression too long")
    try:
        tree = _pyast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"only integers, + - * / and parentheses are allowed: {ast.unparse(node)}")

    return walk(tree.body), used


def verify(completion: str, example: Mapping[str, Any]) -> Verdict:
    """Score 1.0 when the equation uses each of ``nums`` once and equals ``target``."""
    numbers = example.get("nums", example.get("numbers"))
    if numbers is None or "target" not in example:
        raise KeyError("a countdown example needs 'nums' (or 'numbers') and 'target'")
    equation = extract_equation(completion)
    if equation is None:
        return Verdict.fail("no equation found")
    try:
        value, used = evaluate(equation)
    except ValueError as exc:
        return Verdict.fail(str(exc), extracted=equation)
    if Counter(used) != Counter(int(n) for n in numbers):
        return Verdict.fail(
            f"uses {sorted(used)} but must use each of {sorted(numbers)} exactly once",
            extracted=equation,
        )
    if value != Fraction(example["target"]):
        return Verdict.fail(f"equals {value}, not {example['target']}", extracted=equation)
    return Verdict(1.0, True, extracted=equation)
