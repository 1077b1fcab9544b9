"""A small recursive-descent parser from answer LaTeX (or plain text) to sympy.

It covers what final answers are written in: numbers, fractions, roots,
powers, implicit products, functions, constants, absolute values, floors,
binomials, factorials, tuples, sets, intervals, unions, matrices, equations,
inequalities and chains of them. Decimal literals become exact rationals
(``0.1`` is ``1/10``); how many places they were written with is recorded so
that the comparison can round only where a decimal meets an irrational value.

Numbers are guarded (:mod:`verifiers.math.guards`): a power or factorial
whose result would be astronomically large is refused instead of computed, so
a hostile answer such as ``10^{10^{10}}`` cannot stall the grader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy as sp

from verifiers.math.guards import ParseError, checked_binomial, checked_factorial, checked_power


@dataclass(frozen=True)
class Items:
    """A comma-separated collection: a set, a tuple, or a bare list.

    Attributes:
        elements: the parsed elements.
        ordered: tuples and bracketed lists are ordered; sets and bare lists are not.
        brackets: the enclosing pair (``"()"``, ``"[]"``, ``"{}"``) or ``""`` when bare.
    """

    elements: tuple
    ordered: bool
    brackets: str


_TOKEN = re.compile(
    r"(?P<begin>\\begin\{(?P<env>[a-zA-Z]+\*?)\}(?:(?<=\{array\})\{[^{}]*\})?)"
    r"|(?P<end>\\end\{[a-zA-Z]+\*?\})"
    r"|(?P<rowsep>\\\\)"
    r"|(?P<cmd>\\[a-zA-Z]+|\\[{}|])"
    r"|(?P<num>\d+(?:\.\d+)?|\.\d+)"
    r"|(?P<word>[a-zA-Z]+)"
    r"|(?P<op><=|>=|!=|==|\*\*|[-+*/^_()\[\]{},=<>!|&':;])"
    r"|(?P<space>\s+)"
)
_FUNCTIONS = {
    "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "cot": sp.cot, "sec": sp.sec, "csc": sp.csc,
    "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan, "sinh": sp.sinh,
    "cosh": sp.cosh, "tanh": sp.tanh, "exp": sp.exp, "ln": sp.log, "log": sp.log,
    "gcd": sp.gcd, "lcm": sp.lcm, "det": None,
}  # fmt: skip
_CONSTANTS = {"pi": sp.pi, "infty": sp.oo, "emptyset": sp.S.EmptySet, "varnothing": sp.S.EmptySet}
_GREEK = set(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma "
    "Phi Psi Omega".split()
)
_RELATIONS = {
    "=": sp.Eq, "==": sp.Eq, "<": sp.Lt, ">": sp.Gt, "<=": sp.Le, ">=": sp.Ge, "!=": sp.Ne,
    "\\le": sp.Le, "\\ge": sp.Ge, "\\ne": sp.Ne, "\\approx": sp.Eq, "\\equiv": sp.Eq,
}  # fmt: skip
_SET_OPS = {"\\cup": sp.Union, "\\cap": sp.Intersection, "\\setminus": sp.Complement}
_MUL_OPS = {"*", "\\cdot", "\\times", "/", "\\div", ":"}
_ATOM_START = {"(", "[", "{", "\\{", "|"}
_STOP = {")", "]", "}", "\\}", ",", "&", "\\\\", ";"}


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def tokenize(s: str) -> list[_Tok]:
    """Split an answer into tokens; raises :class:`ParseError` on anything unknown."""
    tokens, pos = [], 0
    while pos < len(s):
        match = _TOKEN.match(s, pos)
        if not match:
            raise ParseError(f"unexpected character {s[pos]!r}")
        pos = match.end()
        kind = match.lastgroup if match.lastgroup != "env" else "begin"
        if kind == "space":
            continue
        if kind == "begin":
            tokens.append(_Tok("begin", match.group("env")))
        elif (
            kind == "word"
            and match.group() not in _FUNCTIONS
            and match.group()
            not in (
                "pi",
                "sqrt",
                "infty",
            )
        ):
            # Plain-text words split into letters: "xy" is x*y, as in LaTeX.
            tokens.extend(_Tok("word", ch) for ch in match.group())
        elif kind == "word":
            tokens.append(_Tok("cmd", "\\" + match.group()))
        else:
            tokens.append(_Tok(kind, match.group()))
    return tokens


class Parser:
    """Parses one normalised answer; :attr:`decimals` and :attr:`sig_digits` describe its decimals."""

    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.pos = 0
        self.abs_depth = 0
        self.decimals = 0
        self.sig_digits = 99

    # ------------------------------------------------------------ helpers

    def peek(self, offset: int = 0) -> _Tok | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def at(self, *texts: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.text in texts

    def take(self, *texts: str) -> _Tok:
        tok = self.peek()
        if tok is None or (texts and tok.text not in texts):
            raise ParseError(f"expected {' or '.join(texts) or 'a token'}, got {tok and tok.text}")
        self.pos += 1
        return tok

    def parse(self):
        """The whole answer: an expression, relation, set, tuple, interval or matrix."""
        if not self.tokens:
            raise ParseError("empty answer")
        value = self.sequence()
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek().text!r}")
        return value

    # ------------------------------------------------------------ grammar

    def sequence(self, ordered: bool = False, brackets: str = ""):
        items = [self.relation()]
        while self.at(",", ";"):
            self.take()
            if self.peek() is None or self.at(*_STOP):
                break  # a trailing comma
            items.append(self.relation())
        return items[0] if len(items) == 1 else Items(tuple(items), ordered, brackets)

    def relation(self):
        left = self.set_expression()
        relations = []
        while self.peek() is not None and (self.peek().text in _RELATIONS or self.at("\\in")):
            op = self.take().text
            right = self.set_expression()
            if op == "\\in":
                # "x \in [1, 2]": the set is the answer.
                return as_set(right) if isinstance(right, Items) else right
            if op == "=" and not relations and _names_components(left):
                # "(p, q) = (3, 2)" names the components of the answer (3, 2).
                left = right
                continue
            relations.append(_RELATIONS[op](left, right, evaluate=False))
            left = right
        if not relations:
            return left
        return relations[0] if len(relations) == 1 else sp.And(*relations, evaluate=False)

    def set_expression(self):
        left = self.additive()
        while self.peek() is not None and self.peek().text in _SET_OPS:
            op = _SET_OPS[self.take().text]
            left = op(as_set(left), as_set(self.additive()))
        return left

    def additive(self):
        value = self.unary()
        while self.at("+", "-"):
            sign = self.take().text
            term = self.term()
            value = value + term if sign == "+" else value - term
        return value

    def unary(self):
        if self.at("-"):
            self.take()
            return -self.unary()
        if self.at("+"):
            self.take()
            return self.unary()
        return self.term()

    def term(self):
        value = self.power()
        while True:
            if self.at(*_MUL_OPS):
                op = self.take().text
                right = self.unary() if self.at("-") else self.power()
                if op in ("/", "\\div", ":"):
                    value = _divide(value, right)
                else:
                    value = value * right
            elif self._starts_atom():
                value = value * self.power()
            else:
                return value

    def _starts_atom(self) -> bool:
        tok = self.peek()
        if tok is None or tok.text in _STOP or tok.text in _MUL_OPS:
            return False
        if tok.text == "|":
            return self.abs_depth == 0
        if tok.kind in ("num", "word", "begin") or tok.text in _ATOM_START:
            return True
        return (
            tok.kind == "cmd"
            and tok.text not in _RELATIONS
            and tok.text not in _SET_OPS
            and (tok.text not in ("\\in", "\\pm", "\\mp", "\\right", "\\rfloor", "\\rceil"))
        )

    def implicit_product(self):
        """An unparenthesised function argument: ``\\sin 2x`` is sin(2x), ``\\sin x \\cos x`` two factors."""
        value = self.power()
        while self._starts_atom() and not (self.peek().kind == "cmd" and self.peek().text[1:] in _FUNCTIONS):
            value = value * self.power()
        return value

    def power(self):
        base = self.postfix(self.atom())
        if self.at("^"):
            self.take()
            return checked_power(base, self.exponent())
        return base

    def exponent(self):
        if self.at("-", "+"):
            sign = self.take().text
            value = self.argument(whole_number=True)
            return -value if sign == "-" else value
        return self.argument(whole_number=True)

    def postfix(self, value):
        while self.at("!", "'"):
            if self.take().text == "!":
                value = checked_factorial(value)
        return value

    def argument(self, whole_number: bool = False):
        """A command argument: a braced group, one digit (``\\frac12``), one letter, or an atom."""
        tok = self.peek()
        if tok is None:
            raise ParseError("missing argument")
        if tok.text == "{":
            self.take()
            value = self.sequence(brackets="{}")
            self.take("}")
            return value
        if tok.kind == "num" and not whole_number and len(tok.text) > 1 and tok.text[0] != ".":
            # "\frac12": each argument is a single digit.
            self.tokens[self.pos] = _Tok("num", tok.text[1:])
            return sp.Integer(int(tok.text[0]))
        return self.postfix(self.atom())

    def atom(self):
        tok = self.take()
        if tok.kind == "num":
            return self.number(tok.text)
        if tok.kind == "word":
            return self.symbol(tok.text)
        if tok.kind == "begin":
            return self.matrix(tok.text)
        if tok.text in ("(", "["):
            return self.bracketed(tok.text)
        if tok.text == "{":
            # Bare braces only group: "{1, 3}" is displayed as the list "1, 3", not a set.
            value = self.sequence(brackets="")
            self.take("}")
            return value
        if tok.text == "\\{":
            if self.at("\\}"):
                self.take()
                return sp.S.EmptySet
            value = self.sequence(brackets="{}")
            self.take("\\}")
            elements = value.elements if isinstance(value, Items) else (value,)
            return Items(elements, ordered=False, brackets="{}")
        if tok.kind == "cmd":
            return self.command(tok.text)
        if tok.text == "|":
            self.abs_depth += 1
            value = self.additive()
            self.take("|")
            self.abs_depth -= 1
            return sp.Abs(value)
        raise ParseError(f"unexpected {tok.text!r}")

    def number(self, text: str):
        if "." in text:
            places = len(text.split(".")[1])
            self.decimals = max(self.decimals, places)
            self.sig_digits = min(self.sig_digits, len(text.replace(".", "").lstrip("0")) or 1)
        if self.at("_"):
            # A base subscript (1011_2) names the base; the digits are the answer.
            self.take()
            self.argument(whole_number=True)
        if len(text) > 1000:
            raise ParseError("number too long")
        value = sp.Rational(text)
        if "." not in text and self.at("\\frac"):
            # "2\frac{1}{4}" is the mixed number 9/4, not 2 * 1/4.
            self.take()
            fraction = _divide(self.argument(), self.argument())
            proper = isinstance(fraction, sp.Rational) and 0 < fraction < 1
            return value + fraction if proper else value * fraction
        return value

    def symbol(self, name: str):
        if name == "e":
            return sp.E
        if name == "i":
            return sp.I
        if self.at("_"):
            self.take()
            sub = self.argument(whole_number=True)
            return sp.Symbol(f"{name}_{sub}")
        return sp.Symbol(name)

    def bracketed(self, opener: str):
        inner = self.sequence(ordered=True, brackets=opener)
        closer = self.take(")", "]").text
        if not isinstance(inner, Items):
            if opener == "(" or closer == "]":
                return inner  # grouping brackets
            raise ParseError("interval needs two endpoints")
        elements = inner.elements
        if len(elements) == 2 and (opener, closer) != ("(", ")"):
            return _interval(elements, opener == "(", closer == ")")
        return Items(elements, ordered=True, brackets=opener + closer)

    def matrix(self, env: str):
        rows, row = [], []
        while True:
            tok = self.peek()
            if tok is None:
                raise ParseError("unterminated matrix")
            if tok.kind == "end":
                self.take()
                break
            if tok.text in ("&", "\\\\"):
                self.take()
                if tok.text != "&":
                    rows.append(row)
                    row = []
                continue
            row.append(self.additive())
        rows = [r for r in rows + [row] if r]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged matrix")
        value = sp.ImmutableMatrix(rows)
        return value.det() if env == "vmatrix" else value

    def command(self, name: str):
        bare = name[1:]
        if bare in _CONSTANTS:
            return _CONSTANTS[bare]
        if bare in _GREEK:
            return sp.Symbol(bare)
        if bare == "frac":
            return _divide(self.argument(), self.argument())
        if bare == "sqrt":
            return self.root()
        if bare == "binom":
            return checked_binomial(self.argument(), self.argument())
        if bare in ("sum", "prod"):
            return self.big_operator(sp.Sum if bare == "sum" else sp.Product)
        if bare in ("lfloor", "lceil"):
            value = self.additive()
            self.take("\\rfloor" if bare == "lfloor" else "\\rceil")
            return sp.floor(value) if bare == "lfloor" else sp.ceiling(value)
        if bare in _FUNCTIONS and _FUNCTIONS[bare] is not None:
            return self.function(bare)
        if bare == "mathbb":
            letter = self.argument()
            if letter == sp.Symbol("R"):
                return sp.Interval(-sp.oo, sp.oo)
            raise ParseError("only \\mathbb{R} is supported")
        if bare in ("pm", "mp"):
            raise ParseError("\\pm is expanded before parsing")
        raise ParseError(f"unsupported command {name}")

    def big_operator(self, kind):
        """``\\sum_{k=0}^{n-1} body``: the body is the implicit product that follows."""
        self.take("_")
        lower = self.argument()
        self.take("^")
        upper = self.argument(whole_number=True)
        if not (isinstance(lower, sp.Eq) and isinstance(lower.lhs, sp.Symbol)):
            raise ParseError("a sum or product needs a lower bound 'k = start'")
        return kind(self.implicit_product(), (lower.lhs, lower.rhs, upper))

    def root(self):
        degree = None
        if self.at("["):
            self.take()
            degree = self.additive()
            self.take("]")
        value = self.argument()
        return sp.sqrt(value) if degree is None else sp.root(value, degree)

    def function(self, name: str):
        fn = _FUNCTIONS[name]
        base = power = None
        if name == "log" and self.at("_"):
            self.take()
            base = self.argument(whole_number=True)
        if self.at("^"):
            self.take()
            power = self.exponent()
        if self.at("("):
            self.take()
            arg = self.sequence()
            self.take(")")
        else:
            arg = self.implicit_product()
        args = arg.elements if isinstance(arg, Items) else (arg,)
        value = fn(*args) if base is None else sp.log(args[0], base)
        return value if power is None else checked_power(value, power)


def _divide(numerator, denominator):
    if denominator == 0:
        raise ParseError("division by zero")
    return numerator / denominator


def _names_components(value) -> bool:
    return isinstance(value, Items) and all(isinstance(e, sp.Symbol) for e in value.elements)


def _interval(endpoints: tuple, left_open: bool, right_open: bool):
    start, end = endpoints
    if not all(isinstance(x, sp.Expr) for x in endpoints):
        raise ParseError("interval endpoints must be expressions")
    return sp.Interval(start, end, left_open or start == -sp.oo, right_open or end == sp.oo)


def as_set(value):
    """Read a parsed value as a sympy set (for unions and set comparisons)."""
    if isinstance(value, sp.Set):
        return value
    if isinstance(value, Items) and value.brackets in ("{}", ""):
        return sp.FiniteSet(*value.elements)
    if isinstance(value, Items) and value.brackets == "()" and len(value.elements) == 2:
        return _interval(value.elements, True, True)
    raise ParseError("not a set")


def parse(text: str):
    """Parse one normalised answer; returns ``(value, decimals, sig_digits)``."""
    parser = Parser(text)
    try:
        value = parser.parse()
    except ParseError:
        raise
    except (TypeError, ValueError, AttributeError, ArithmeticError, RecursionError) as exc:
        # sympy refuses combinations such as a tuple times a number.
        raise ParseError(f"{type(exc).__name__}: {exc}") from exc
    if isinstance(value, sp.Basic) and value.has(sp.zoo, sp.nan):
        raise ParseError("undefined value")
    return value, parser.decimals, parser.sig_digits
