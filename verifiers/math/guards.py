"""Limits on what an answer may ask sympy to compute: powers, factorials, binomials.

A hostile answer such as ``10^{10^{10}}`` or ``\\sqrt{2}^{20000000000}`` would
make sympy build an integer of gigabytes in one C-level call; each is sized
here first and refused when its result would pass ``MAX_RESULT_BITS``.
"""

from __future__ import annotations

import math

import sympy as sp

MAX_RESULT_BITS = 100_000
MAX_FACTORIAL = 2_000
MAX_SYMBOLIC_EXPONENT = 10_000


class ParseError(ValueError):
    """The answer is not in the supported grammar (or asks for too much)."""


def checked_power(base, exponent):
    if isinstance(exponent, sp.Number) and isinstance(base, sp.Expr):
        if isinstance(base, sp.Rational):
            size = max(abs(base.p), abs(base.q))
            bits = abs(exponent) * math.log2(size) if size > 1 else 0.0
        elif base.is_number:
            # Irrational bases may collapse to integers (sqrt(2)^2n = 2^n): count a bit per unit at least.
            bits = abs(exponent) * max(1.0, _log2_magnitude(base))
        else:
            bits = 0.0
        if bits > MAX_RESULT_BITS:
            # sqrt(2)^(2*10^10) would be evaluated to 2^(10^10), gigabytes of digits.
            raise ParseError("power too large to evaluate")
        if not base.is_number and abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise ParseError("power too large to expand")
    return sp.Pow(base, exponent)


def _log2_magnitude(value: sp.Expr) -> float:
    """|log2 |value||, the bits one unit of exponent adds; 0 for 0 and 1, large when unknown."""
    try:
        magnitude = abs(complex(sp.N(value, 15)))
    except (TypeError, ValueError, ArithmeticError):
        return float(MAX_RESULT_BITS)
    if magnitude == 0 or magnitude == 1:
        return 0.0
    if not math.isfinite(magnitude):
        return float(MAX_RESULT_BITS)
    return abs(math.log2(magnitude))


def checked_factorial(value):
    if isinstance(value, sp.Integer) and value > MAX_FACTORIAL:
        raise ParseError("factorial too large to evaluate")
    return sp.factorial(value)


def checked_binomial(n, k):
    if isinstance(n, sp.Integer) and n > 100 * MAX_FACTORIAL:
        raise ParseError("binomial too large to evaluate")
    return sp.binomial(n, k)
