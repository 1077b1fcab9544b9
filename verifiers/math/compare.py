"""Equivalence of two parsed answers, decided by the gold answer's form.

Order of tests, cheapest and strictest first: identical normalised text;
exact sympy equality (rationals stay exact: ``0.5`` equals ``1/2`` but
``0.333`` does not equal ``1/3``); rounding only where a decimal meets a value
with no finite decimal expansion, and only to the digits the decimal shows;
numeric evaluation at high precision, then ``simplify(a - b) == 0``.

The gold answer decides the form: gold ``x = 3`` accepts ``3``; a gold interval
accepts an inequality only in solved form (``-2 < x < 2``), never a restated
one (``x^2 < 4``); gold tuples are ordered, gold sets and bare lists are not.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Any

import sympy as sp
from sympy.core.relational import Relational

from verifiers.math import relations as rel
from verifiers.math.normalize import decimal_comma, join_thousands, normalize, reduce_chains
from verifiers.math.parse import Items, ParseError, as_set, parse

# A decimal matches an exact value with no finite expansion when it shows at
# least this many significant digits and is right to its last digit
# (rounded or truncated): 0.3333 and 3.142 pass for 1/3 and pi; 0.33 and 3.14 do not.
MIN_SIGNIFICANT_DIGITS = 4
_SAMPLE_POINTS = (0.7318, -1.2207, 2.3169, -0.4412, 1.5873)
_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")
_MATH_WORDS = {"sin", "cos", "tan", "log", "ln", "exp", "sqrt", "pi", "infty", "frac", "or"}
# Two-letter answers are products of variables ("ab") unless they are words.
_SHORT_WORDS = {"no", "ok", "on", "up", "is", "it", "in", "at", "to", "of", "an", "by", "do", "so"}


@dataclass(frozen=True)
class Answer:
    """A normalised, parsed answer.

    Attributes:
        text: normalised text.
        value: the parsed value (sympy object or :class:`Items`), None if unparsable.
        decimals: most decimal places of any decimal literal in it (0: none).
        sig_digits: fewest significant digits of any decimal literal in it.
        percent: it carried a percent sign.
        degrees: it carried a degree sign.
        textual: it is words (a name, a yes/no, a choice letter), compared as text.
        alternative: a second reading of an ambiguous gold ("1,22": the list 1, 22 or 1.22).
    """

    text: str
    value: Any
    decimals: int = 0
    sig_digits: int = 99
    percent: bool = False
    degrees: bool = False
    textual: bool = False
    alternative: Any = None


def _is_textual(text: str) -> bool:
    if _CHOICE.fullmatch(text):
        return True
    words = re.findall(r"[A-Za-z]+", text)
    if not re.fullmatch(r"[A-Za-z][A-Za-z\s'.\-()]*", text):
        return False
    return any((len(w) > 2 and w.lower() not in _MATH_WORDS) or w.lower() in _SHORT_WORDS for w in words)


def read_answer(raw: str, *, single_number: bool | None = None) -> Answer:
    """Normalise and parse ``raw``.

    ``single_number`` says what the gold answer is, and so how to read commas:
    True reads ``1,000`` and ``3,5`` as numbers, False as lists; None (for the
    gold itself) reads thousands separators as such, and a decimal comma
    (``1,22``, ``0,111``) as either a list or a decimal.
    """
    norm = normalize(raw)
    text = reduce_chains(norm.text)
    candidates = [text]
    if single_number:
        candidates = [c for c in (join_thousands(text), decimal_comma(text)) if c] + candidates
    elif single_number is None and join_thousands(text) and not _GOLD_DECIMAL_COMMA.fullmatch(text):
        candidates.insert(0, join_thousands(text))
    if _is_textual(text):
        return Answer(text, None, percent=norm.percent, degrees=norm.degrees, textual=True)
    alternative = None
    if single_number is None and _GOLD_DECIMAL_COMMA.fullmatch(text):
        alternative = sp.Rational(text.replace(",", "."))
    for candidate in candidates:
        try:
            value, decimals, sig = _parse_with_pm(candidate)
        except ParseError:
            continue
        return Answer(text, value, decimals, sig, norm.percent, norm.degrees, alternative=alternative)
    return Answer(text, None, percent=norm.percent, degrees=norm.degrees)


_GOLD_DECIMAL_COMMA = re.compile(r"-?(?:0,\d+|\d+,\d{2})")
def _parse_with_pm(text: str):
    """Parse, expanding up to two ``\\pm``/``\\mp`` into the set of their sign choices."""
    signs = re.findall(r"\\(pm|mp)(?![a-zA-Z])", text)
    if not signs:
        return parse(text)
    if len(signs) > 2:
        raise ParseError("too many \\pm")
    values, decimals, sig = [], 0, 99
    for choice in itertools.product("+-", repeat=len(signs)):
        variant = text
        for sign in choice:
            variant = re.sub(r"\\(pm|mp)(?![a-zA-Z])", sign, variant, count=1)
        value, d, s = parse(variant)
        values.append(value)
        decimals, sig = max(decimals, d), min(sig, s)
    unique = list(dict.fromkeys(values))
    value = unique[0] if len(unique) == 1 else Items(tuple(unique), False, "")
    return value, decimals, sig


def is_single_number(answer: Answer) -> bool:
    """Whether a (gold) answer is one number, which decides how to read ``1,000`` in the prediction."""
    value = answer.value
    return isinstance(value, sp.Expr) and value.is_number


def equivalent(gold: Answer, pred: Answer) -> bool:
    """Whether ``pred`` states the same answer as ``gold``."""
    if gold.text and _squash(gold.text) == _squash(pred.text):
        return True
    if gold.textual or gold.value is None:
        return _text_equal(gold.text, pred.text)
    if pred.value is None:
        return False
    context = _Context(gold, pred)
    readings = [gold] if gold.alternative is None else [gold, replace(gold, value=gold.alternative)]
    for reading in readings:
        for g in _scaled(reading):
            for p in _scaled(pred):
                if _equal(g, p, context):
                    return True
    return False


def _squash(text: str) -> str:
    """Drop spaces, except between digits ("1 2" is not "12")."""
    return re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", text)


def _text_equal(gold: str, pred: str) -> bool:
    choice_g, choice_p = _CHOICE.fullmatch(gold), _CHOICE.match(pred)
    if choice_g and choice_p and (pred[choice_p.end() :].strip() == "" or pred.startswith("(")):
        return choice_g.group(1).upper() == choice_p.group(1).upper()

    def key(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    return bool(key(gold)) and key(gold) == key(pred)


def _scaled(answer: Answer) -> list:
    """The readings of an answer's value: as written, and as a fraction when it had a % sign."""
    values = [answer.value]
    if answer.percent and isinstance(answer.value, sp.Expr):
        values.append(answer.value / 100)
    if answer.degrees and isinstance(answer.value, sp.Expr):
        values.append(answer.value * sp.pi / 180)
    return values


@dataclass(frozen=True)
class _Context:
    gold: Answer
    pred: Answer


def _equal(g: Any, p: Any, ctx: _Context) -> bool:
    g, p = _canonical(g), _canonical(p)
    if isinstance(g, Items):
        return _items_equal(g, p, ctx)
    if isinstance(g, sp.MatrixBase):
        return _matrix_equal(g, p, ctx)
    if isinstance(g, sp.Set):
        return _sets_equal(g, _to_set(p), ctx)
    if isinstance(g, Relational | sp.And):
        return _relation_equal(g, p, ctx)
    p = rel.value_of(p)
    return isinstance(g, sp.Expr) and isinstance(p, sp.Expr) and _expr_equal(g, p, ctx)


def _canonical(value: Any) -> Any:
    """Lists of solved relations in one variable ("x = 1, x = 2") become their solution set."""
    if isinstance(value, Items) and not value.ordered and value.elements:
        sets = [rel.solved_set(e) for e in value.elements]
        symbols = {rel.solved_symbol(e) for e in value.elements}
        if all(s is not None for s in sets) and len(symbols) == 1:
            return sp.Union(*sets)
    if isinstance(value, Items) and len(value.elements) == 1 and not value.ordered:
        return value.elements[0]
    return value


def _expr_equal(a: sp.Expr, b: sp.Expr, ctx: _Context) -> bool:
    if a == b:
        return True
    diff = sp.expand(a - b) if (a.free_symbols or b.free_symbols) else a - b
    if diff == 0:
        return True
    if a.is_number and b.is_number:
        return _numbers_equal(a, b, ctx)
    if a.has(sp.Sum, sp.Product) or b.has(sp.Sum, sp.Product):
        return False  # symbolic sums: equal as written (above) or not at all; simplify takes seconds
    verdict = _sampled_equal(a, b)
    if verdict is not None:
        return verdict
    return sp.simplify(diff) == 0


def _numbers_equal(a: sp.Expr, b: sp.Expr, ctx: _Context) -> bool:
    if isinstance(a, sp.Rational) and isinstance(b, sp.Rational):
        # Exact values differ; only a decimal that rounds the other may still match.
        return _rounds_to(a, b, ctx.gold) or _rounds_to(b, a, ctx.pred)
    if not (a.is_finite and b.is_finite):
        return False
    x, y = sp.N(a, 50), sp.N(b, 50)
    if not (x.is_number and y.is_number):
        return False
    if abs(x - y) <= sp.Float(10) ** -40 * max(1, abs(x), abs(y)):
        return True
    return _rounds_to(a, b, ctx.gold) or _rounds_to(b, a, ctx.pred)


def _rounds_to(decimal: sp.Expr, exact: sp.Expr, written: Answer) -> bool:
    """Whether ``decimal``, written with ``written.decimals`` places, is ``exact`` to those places."""
    places = written.decimals
    if places == 0 or written.sig_digits < MIN_SIGNIFICANT_DIGITS:
        return False
    if not isinstance(decimal, sp.Rational) or not (decimal * 10**places).is_integer:
        return False
    if isinstance(exact, sp.Rational) and (exact * 10**places).is_integer:
        return False  # both exact at this precision, and they differ
    gap = abs(sp.N(decimal - exact, 30))
    return bool(gap < sp.Rational(1, 10**places))


def _sampled_equal(a: sp.Expr, b: sp.Expr) -> bool | None:
    """Compare at fixed sample points: False on a clear difference, True when all agree.

    Points mix signs so that ``sqrt(x^2)`` and ``x`` differ; None when too few
    points lie in both domains to say.
    """
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    agreed = 0
    for shift in range(len(_SAMPLE_POINTS)):
        values = {
            s: _SAMPLE_POINTS[(shift + i) % len(_SAMPLE_POINTS)] * (1 + 0.1 * i)
            for i, s in enumerate(symbols)
        }
        try:
            x = complex(sp.N(a, 30, subs=values))
            y = complex(sp.N(b, 30, subs=values))
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if x != x or y != y:  # NaN: outside the domain at this point
            continue
        if abs(x - y) > 1e-12 * max(1.0, abs(x), abs(y)):
            return False
        agreed += 1
    return True if agreed >= 3 else None


def _items_equal(g: Items, p: Any, ctx: _Context) -> bool:
    if isinstance(p, sp.MatrixBase) and 1 in p.shape:
        p = Items(tuple(p), True, "()")
    if isinstance(p, sp.FiniteSet):
        p = Items(tuple(p.args), False, "{}")
    interval_like = isinstance(p, sp.Set | Relational | sp.And)
    if g.ordered and g.brackets == "()" and len(g.elements) == 2 and interval_like:
        # Gold "(a, b)" may be an open interval; the prediction says which.
        return _sets_equal(as_set(g), _to_set(p), ctx)
    if not isinstance(p, Items):
        return False
    if g.ordered:
        if p.brackets == "{}" or len(p.elements) != len(g.elements):
            return False
        return all(_equal(x, y, ctx) for x, y in zip(g.elements, p.elements, strict=True))
    return _matching(list(g.elements), list(p.elements), ctx)


def _matching(gold: list, pred: list, ctx: _Context) -> bool:
    """Whether both lists hold the same elements, as sets: each element of one equals one of the other.

    Repeats do not count ("(3,17,3,7)" written twice is one solution), extra or missing ones do.
    """
    if not gold or not pred:
        return not gold and not pred
    return all(any(_equal(g, p, ctx) for p in pred) for g in gold) and all(
        any(_equal(g, p, ctx) for g in gold) for p in pred
    )


def _matrix_equal(g: sp.MatrixBase, p: Any, ctx: _Context) -> bool:
    if isinstance(p, Items) and p.ordered and 1 in g.shape:
        return len(p.elements) == len(g) and all(
            _equal(x, y, ctx) for x, y in zip(g, p.elements, strict=True)
        )
    if not isinstance(p, sp.MatrixBase) or p.shape != g.shape:
        return False
    return all(_equal(x, y, ctx) for x, y in zip(g, p, strict=True))


def _to_set(value: Any) -> sp.Set | None:
    if isinstance(value, sp.Set):
        return value
    if isinstance(value, Relational | sp.And):
        return rel.solved_set(value)
    try:
        return as_set(value)
    except ParseError:
        return sp.FiniteSet(value) if isinstance(value, sp.Expr) else None


def _components(s: sp.Set) -> list:
    return list(s.args) if isinstance(s, sp.Union) else [s]


def _sets_equal(g: sp.Set, p: sp.Set | None, ctx: _Context) -> bool:
    if p is None:
        return False
    if g == p:
        return True
    gc, pc = _components(g), _components(p)
    if all(isinstance(c, sp.FiniteSet) for c in gc + pc):
        elements = [list(itertools.chain(*(c.args for c in parts))) for parts in (gc, pc)]
        return _matching(elements[0], elements[1], ctx)
    if len(gc) != len(pc):
        return False
    return all(any(_set_part_equal(a, b, ctx) for b in pc) for a in gc)


def _set_part_equal(a: sp.Set, b: sp.Set, ctx: _Context) -> bool:
    if isinstance(a, sp.Interval) and isinstance(b, sp.Interval):
        return (
            a.left_open == b.left_open
            and a.right_open == b.right_open
            and _equal(a.start, b.start, ctx)
            and _equal(a.end, b.end, ctx)
        )
    if isinstance(a, sp.FiniteSet) and isinstance(b, sp.FiniteSet):
        return _matching(list(a.args), list(b.args), ctx)
    return a == b


def _relation_equal(g: Relational | sp.And, p: Any, ctx: _Context) -> bool:
    if isinstance(g, sp.Eq):
        return _equation_equal(g, p, ctx)
    if isinstance(p, Relational | sp.And) and g == p:
        return True
    stated = rel.gold_solution_set(g)
    if stated is not None and stated[1] is not None:
        # An inequality: its solution set in any notation, about the same variable if stated.
        target, solution = stated
        if isinstance(p, Relational | sp.And) and rel.solved_symbol(p) != target:
            return False
        return _sets_equal(solution, _to_set(p), ctx)
    if isinstance(g, sp.And) or not isinstance(p, Relational) or isinstance(p, sp.And):
        return False
    return rel.proportional(g, p, any_sign=isinstance(g, sp.Ne))


def _equation_equal(g: sp.Eq, p: Any, ctx: _Context) -> bool:
    """Gold ``x = 3`` (or ``2x = 6``, ``AB = 4``) states a value; other equations match multiples."""
    solved = rel.bounds(g)
    value = solved[1][0][1] if solved else rel.value_of(g)
    if value is not g:
        if not isinstance(p, Relational | sp.And):
            return _equal(value, p, ctx)
        stated = rel.value_of(p)
        if isinstance(p, sp.Eq) and stated is not p and rel.same_target(g, p):
            return _equal(value, stated, ctx)
        p_solved = rel.bounds(p)
        if solved and p_solved and p_solved[0] == solved[0] and p_solved[1][0][0] is sp.Eq:
            return _equal(value, p_solved[1][0][1], ctx)
    return isinstance(p, sp.Eq) and rel.proportional(g, p, any_sign=True)
