"""Equations and inequalities read as what they state: a value, or a solution set.

``x = 3`` and ``AB = 4`` state a value (the left side only names it);
``1 < x <= 2``, ``3 < x`` and ``-x > -1`` (linear in one variable) are in solved
form and state an interval, built directly rather than with sympy's inequality
solver. Only a gold answer (trusted data) that is not in solved form, such as
``1 \\le |z| \\le 3/2``, is handed to ``solveset``: a prediction must state its
set, not an inequality the grader would have to solve.
"""

from __future__ import annotations

from typing import Any

import sympy as sp
from sympy.core.relational import Relational

_FLIP = {sp.Lt: sp.Gt, sp.Le: sp.Ge, sp.Gt: sp.Lt, sp.Ge: sp.Le, sp.Eq: sp.Eq}
_ORIENTED = {sp.Gt: sp.Lt, sp.Ge: sp.Le, sp.Lt: sp.Lt, sp.Le: sp.Le, sp.Eq: sp.Eq, sp.Ne: sp.Ne}


def is_name(expr: Any) -> bool:
    """A name for a quantity, not a formula: ``x``, ``AB``, ``f(x)`` (read ``f*x``), ``|AB|``, ``A:B``."""
    if isinstance(expr, sp.Symbol):
        return True
    if isinstance(expr, sp.Abs):
        return is_name(expr.args[0])
    if isinstance(expr, sp.Mul | sp.Pow):
        factors = expr.args if isinstance(expr, sp.Mul) else (expr,)
        for factor in factors:
            base, exponent = factor.as_base_exp()
            if not isinstance(base, sp.Symbol) or exponent not in (1, -1):
                return False
        return True
    return False


def value_of(p: Any) -> Any:
    """What an answer states as its value: ``x = 3`` states 3, ``AB = 4`` states 4.

    Only a name is assigned to: ``x^2 - 4 = 0`` does not state 0, and
    ``f(x) = x^2`` (the name appears on the other side) is a definition.
    """
    from verifiers.math.parse import Items

    if isinstance(p, Items) and len(p.elements) == 1:
        p = p.elements[0]
    if isinstance(p, sp.Eq):
        for name, value in ((p.lhs, p.rhs), (p.rhs, p.lhs)):
            if is_name(name) and not (name.free_symbols & value.free_symbols):
                return value
        if p.lhs.is_number and p.rhs.is_number:
            return p.rhs  # "\\frac{1}{2} \\cdot 3 = 1.5": a computation and its result
    return p


def same_target(g: sp.Eq, p: sp.Eq) -> bool:
    """Whether the prediction assigns to the name the gold assigns to."""
    target = g.lhs if is_name(g.lhs) else g.rhs
    return target in (p.lhs, p.rhs)


def _linear(expr: sp.Expr, kind: type, bound: sp.Expr) -> tuple[sp.Expr, type, sp.Expr]:
    """``a*x + b kind bound`` -> ``x kind' (bound - b)/a``, flipping for a < 0; else unchanged."""
    symbols = expr.free_symbols
    if len(symbols) != 1 or isinstance(expr, sp.Symbol):
        return expr, kind, bound
    (symbol,) = symbols
    poly = expr.as_poly(symbol)
    if poly is None or poly.degree() != 1:
        return expr, kind, bound
    a, b = poly.all_coeffs()
    if not (a.is_number and b.is_number) or a == 0 or a.is_real is not True:
        return expr, kind, bound
    return symbol, (_FLIP[kind] if a < 0 else kind), (bound - b) / a


def bounds(value: Any, *, any_target: bool = False) -> tuple[sp.Expr, list[tuple[type, sp.Expr]]] | None:
    """A relation (or chain) in solved form as ``(target, [(kind, bound), ...])``, read ``target kind bound``.

    The target is a variable (after solving a linear side: ``-x > -1`` is
    ``x < 1``); with ``any_target`` any shared non-constant side (``0 < f(x) < 1``).
    """
    rels = value.args if isinstance(value, sp.And) else (value,)
    target, parts = None, []
    for rel in rels:
        if not isinstance(rel, Relational) or type(rel) not in _FLIP:
            return None
        if rel.lhs.free_symbols and not rel.rhs.free_symbols:
            side, kind, bound = rel.lhs, type(rel), rel.rhs
        elif rel.rhs.free_symbols and not rel.lhs.free_symbols:
            side, kind, bound = rel.rhs, _FLIP[type(rel)], rel.lhs  # "3 < x" reads as "x > 3"
        else:
            return None
        side, kind, bound = _linear(side, kind, bound)
        if target is None:
            target = side
        elif side != target:
            return None
        parts.append((kind, bound))
    if target is None or not (any_target or isinstance(target, sp.Symbol)):
        return None
    return target, parts


def solved_symbol(value: Any) -> sp.Symbol | None:
    """The variable a relation in solved form is about, else None."""
    found = bounds(value)
    return found[0] if found else None


def solved_set(value: Any, *, any_target: bool = False) -> sp.Set | None:
    """The solution set of a relation in solved form (``x > 3``, ``1 < x <= 2``, ``x = 4``)."""
    found = bounds(value, any_target=any_target)
    if found is None:
        return None
    result = sp.Interval(-sp.oo, sp.oo)
    for kind, bound in found[1]:
        if kind is sp.Eq:
            part = sp.FiniteSet(bound)
        elif kind in (sp.Lt, sp.Le):
            part = sp.Interval(-sp.oo, bound, True, kind is sp.Lt)
        else:
            part = sp.Interval(bound, sp.oo, kind is sp.Gt, True)
        result = sp.Intersection(result, part)
    return result


def gold_solution_set(value: Any) -> tuple[sp.Expr, sp.Set] | None:
    """``(target, set)`` a gold relation states: solved form first, else ``solveset`` over the reals.

    Only for gold answers: "1 \\le |z| \\le 3/2" is the set [-3/2, -1] U [1, 3/2] of z.
    """
    found = bounds(value, any_target=True)
    if found is None:
        return None
    target = found[0]
    direct = solved_set(value, any_target=True)
    symbols = target.free_symbols
    if isinstance(target, sp.Symbol):
        return target, direct
    if len(symbols) != 1:
        return (target, direct) if is_name(target) else None
    (symbol,) = symbols
    rels = value.args if isinstance(value, sp.And) else (value,)
    result = sp.Interval(-sp.oo, sp.oo)
    for rel in rels:
        result = sp.Intersection(result, sp.solveset(rel, symbol, sp.S.Reals))
    if isinstance(result, sp.ConditionSet):
        return target, direct
    return symbol, result


def oriented(rel: Relational) -> tuple[type, sp.Expr]:
    """``(kind, e)`` with the relation read as ``e kind 0`` and kind in (<, <=, =, !=)."""
    kind = _ORIENTED[type(rel)]
    if isinstance(rel, sp.Gt | sp.Ge):
        return kind, rel.rhs - rel.lhs
    return kind, rel.lhs - rel.rhs


def proportional(g: Relational, p: Relational, *, any_sign: bool) -> bool:
    """Whether both relations say the same thing up to a constant factor (positive for inequalities)."""
    (g_kind, g_expr), (p_kind, p_expr) = oriented(g), oriented(p)
    if g_kind is not p_kind or p_expr == 0:
        return False
    # cancel() settles polynomials a hundred times faster than simplify().
    ratio = sp.cancel(g_expr / p_expr)
    if ratio.free_symbols and not (g_expr.is_polynomial() and p_expr.is_polynomial()):
        ratio = sp.simplify(ratio)
    if ratio.free_symbols or ratio == 0 or not ratio.is_number:
        return False
    return any_sign or bool(ratio.is_positive)
