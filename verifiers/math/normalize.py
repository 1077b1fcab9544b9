"""String-level normalisation of math answers, before parsing.

Each layer removes one kind of presentation noise: math delimiters, spacing
commands, ``\\left``/``\\right``, ``\\dfrac``, text wrappers, units, degrees,
percent and currency signs, trailing punctuation. Facts that matter for the
comparison (a percent sign, a degree sign) are kept as flags rather than thrown
away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from verifiers.math.latex import matching_brace

# Words dropped when they trail a quantity ("18 dollars", "5\text{ cm}").
UNIT_WORDS = (
    "dollars?|cents?|euros?|pounds?|yuan|rupees?|usd|"
    "mm|cm|km|m|meters?|metres?|centimeters?|millimeters?|kilometers?|inch(es)?|in|"
    "feet|foot|ft|yards?|yd|miles?|mi|mph|kph|km/h|m/s|"
    "seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h|days?|weeks?|months?|years?|yrs?|"
    "grams?|g|kilograms?|kg|mg|lbs?|ounces?|oz|tons?|liters?|litres?|l|ml|gallons?|gal|"
    "square|sq|cubic|units?|degrees?|deg|radians?|rad|points?|pts|percent|people|persons?|"
    "students?|items?|pieces?|times|ways|cookies|apples|boxes|books|marbles|eggs|cups|pages"
)
# Each unit word must end at a word boundary, or "mmmm" could split many ways (exponential backtracking).
_UNIT_TAIL = re.compile(
    rf"(?<=[\d)}}])\s*((({UNIT_WORDS})(?![A-Za-z])(\^?\{{?[23]\}}?)?|per\b)\.?\s*)+$", re.IGNORECASE
)
_TEXT_UNIT = re.compile(
    rf"\\(text|mbox|mathrm)\{{\s*({UNIT_WORDS})(\^?[23])?\s*\}}(\^\{{?[23]\}}?)?", re.IGNORECASE
)
_TEXT_CMD = re.compile(
    r"\\(text|textbf|textit|textrm|texttt|textnormal|mathrm|mathbf|mathit|mathsf|mathtt|"
    r"mbox|operatorname\*?|boldsymbol|bm|emph|hbox)\s*\{"
)
_SIZING = re.compile(
    r"\\(left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])"
)
_SPACING = re.compile(r"(?<!\\)\\[,:;! ]|\\quad|\\qquad|\\enspace|\\thinspace|\\displaystyle|\\limits|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree|\^\{\\text\{o\}\}")
_PERCENT = re.compile(r"\\%|%|\\text\{\s*(?:percent|percentage|pct)\s*\}|\b(?:percent|percentage|pct)\b")
_CURRENCY = re.compile(r"\\\$|\$|€|£|¥|\\euro|\\pounds")
_REPEATING = re.compile(r"(?<!\d)(\d*)\.(\d*)\\overline\{(\d+)\}")
_UNICODE = {
    "−": "-", "–": "-", "—": "-", "×": r"\times ", "÷": r"\div ", "·": r"\cdot ",
    "⋅": r"\cdot ", "√": r"\sqrt ", "π": r"\pi ", "∞": r"\infty ", "≤": r"\le ",
    "≥": r"\ge ", "≠": r"\ne ", "∪": r"\cup ", "∩": r"\cap ", "∈": r"\in ", "∅": r"\emptyset ",
    "½": "(1/2)", "¼": "(1/4)", "¾": "(3/4)", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    "²": "^2", "³": "^3", "θ": r"\theta ", "α": r"\alpha ", "β": r"\beta ",
}  # fmt: skip
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
_SPACE_THOUSANDS = re.compile(r"-?\d{1,3}( \d{3})+(\.\d+)?")
# Thousands marks between digit groups: "14{,}916", "14 {, }916", "16,\\!386", "1\\,000".
_THOUSANDS_MARK = re.compile(r"(?<=\d)(?:\s*\{\s*,\s*\}\s*|,\\!\s*|\\,)(?=\d{3}(?!\d))")
_ESCAPED_COMMAND = re.compile(r"\\\\(?=[a-zA-Z])")
_DECIMAL_COMMA = re.compile(r"-?\d+,(\d{1,2}|\d{4,})")


@dataclass(frozen=True)
class Normalized:
    """A normalised answer string and the flags its noise carried.

    Attributes:
        text: the cleaned LaTeX / plain-text answer.
        percent: a percent sign (or "percent") was present.
        degrees: a degree sign was present.
    """

    text: str
    percent: bool = False
    degrees: bool = False


def unwrap_command(text: str, pattern: re.Pattern) -> str:
    """Replace ``\\cmd{body}`` by ``body`` for every command ``pattern`` matches (nested braces)."""
    while True:
        match = pattern.search(text)
        if not match:
            return text
        close = matching_brace(text, match.end() - 1)
        if close is None:
            return text[: match.start()] + text[match.end() :]
        text = text[: match.start()] + text[match.end() : close] + text[close + 1 :]


def _strip_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    boxed = re.fullmatch(r"\\(boxed|fbox)\s*\{(.*)\}", s, re.DOTALL)
    if boxed and matching_brace(s, s.index("{")) == len(s) - 1:
        s = boxed.group(2).strip()
    return s


def _repeating_decimal(match: re.Match) -> str:
    whole, fixed, repeat = match.group(1) or "0", match.group(2), match.group(3)
    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(repeat), (10 ** len(repeat) - 1) * 10 ** len(fixed))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def normalize(answer: str) -> Normalized:
    """Apply every normalisation layer to one bare answer."""
    s = answer.strip()
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    if "\\begin" not in s:
        # "\\frac{1}{2}": backslashes escaped once too often (JSON or a raw string).
        s = _ESCAPED_COMMAND.sub(r"\\", s)
    s = _strip_delimiters(s)
    s = re.sub(r"\\(dfrac|tfrac|cfrac)", r"\\frac", s)
    s = re.sub(r"\\(dbinom|tbinom)", r"\\binom", s)
    s = _SIZING.sub("", s).replace("\\left.", "").replace("\\right.", "")
    s = _THOUSANDS_MARK.sub("", s)
    s = _SPACING.sub(" ", s)
    degrees = bool(_DEGREES.search(s))
    s = _DEGREES.sub("", s)
    percent = bool(_PERCENT.search(s))
    s = _PERCENT.sub("", s)
    s = _CURRENCY.sub("", s)
    s = _TEXT_UNIT.sub(" ", s)
    s = unwrap_command(s, _TEXT_CMD)
    if "\\overline" in s:
        s = _REPEATING.sub(_repeating_decimal, s)
    s = re.sub(r"\\(?:inf|infinity)(?![a-zA-Z])|\binfinity\b|\binf\b", r"\\infty", s)
    s = re.sub(r"\\(leqslant|leq)(?![a-zA-Z])", r"\\le", s)
    s = re.sub(r"\\(geqslant|geq)(?![a-zA-Z])", r"\\ge", s)
    s = re.sub(r"\\(neq)(?![a-zA-Z])", r"\\ne", s)
    s = re.sub(r"\\(lvert|rvert|vert|mid)(?![a-zA-Z])", "|", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = re.sub(r"\\(lt)(?![a-zA-Z])", "<", s)
    s = re.sub(r"\\(gt)(?![a-zA-Z])", ">", s)
    s = re.sub(r"\s+(or|and)\s+|(?<=[)\]}])\s*(?:or|and)\s*(?=[(\[{])", ", ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _strip_units(s)
    s = _strip_trailing(s)
    s = re.sub(r"^[=:]\s*", "", s)
    return Normalized(s, percent, degrees)


def _strip_trailing(s: str) -> str:
    """Drop trailing punctuation and row breaks (a loop, not a regex anchored at $: linear)."""
    while s:
        if s.endswith("\\\\"):
            s = s[:-2]
        elif s[-1] in ".,;:? ":
            s = s[:-1]
        else:
            break
    return s.strip()


def _strip_units(s: str) -> str:
    stripped = _UNIT_TAIL.sub("", s).strip()
    # A lone word ("m", "in") is an answer, not a unit.
    return stripped if stripped and re.search(r"[\d}]", stripped) else s


def join_thousands(s: str) -> str | None:
    """``"1,234,567.5"`` -> ``"1234567.5"`` when the whole string is one such number."""
    if _THOUSANDS.fullmatch(s) or _SPACE_THOUSANDS.fullmatch(s):
        return s.replace(",", "").replace(" ", "")
    return None


def decimal_comma(s: str) -> str | None:
    """``"3,14"`` -> ``"3.14"`` when the whole string is one number written with a decimal comma."""
    if _DECIMAL_COMMA.fullmatch(s):
        return s.replace(",", ".")
    return None


_LONE_NAME = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?|\\[a-zA-Z]+(?:_\{?\w+\}?)?")


def reduce_chains(text: str) -> str:
    """A chain of equalities states its last side: ``x = 5+5+1 = 7 = 11`` -> ``x = 11``.

    ``x = 1/3 \\approx 0.33`` states ``x = 1/3`` (the exact value before the
    approximation). Works element by element on a list; inequalities are left alone.
    """
    if text.count("=") < 2 and "\\approx" not in text:
        return text
    parts = _split_top(text, ",;")
    if parts is None:
        return text
    if len(parts) == 1:
        return _reduce_one(text)
    reduced = [_reduce_one(p.strip()) for p in parts]
    return ", ".join(reduced) if reduced != [p.strip() for p in parts] else text


def _reduce_one(text: str) -> str:
    approx = re.search(r"\\approx(?![a-zA-Z])", text)
    if approx and "=" in text[: approx.start()]:
        text = text[: approx.start()].strip()
    sides = _split_top(text, "=")
    if sides is None or len(sides) < 3 or any(s.strip() == "" for s in sides):
        return text
    sides = [s.strip() for s in sides]
    for name in (sides[0], sides[-2]):
        if _LONE_NAME.fullmatch(name):
            return f"{name} = {sides[-1]}"
    return sides[-1]


def _split_top(text: str, separators: str) -> list[str] | None:
    """Split at separators outside brackets, in one pass; None when brackets do not balance."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0 and char in separators:
            if not _is_equals(text, i, char):
                continue
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        return None
    parts.append(text[start:])
    return parts


def _is_equals(text: str, i: int, char: str) -> bool:
    if char != "=":
        return True
    before = text[i - 1] if i else ""
    after = text[i + 1] if i + 1 < len(text) else ""
    return before not in "<>!=\\" and after != "="
