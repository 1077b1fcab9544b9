"""Math verifier: answer extraction and sympy equivalence with a hard time limit.

Extraction takes the last ``\\boxed{}``/``\\fbox{}`` (nested braces), else the
last GSM8K ``####`` line, else the last anchored "final answer is" / "answer:"
phrase. Unmarked text is not graded unless ``mode="any"``, which then takes the
last LaTeX expression or number. Comparison normalises presentation (number
formats, ``\\dfrac``, ``\\left``, ``\\text{}``, units, percent, degrees,
currency) and compares sympy objects: exact rationals first, rounding only
where a decimal meets an irrational value, symbolic simplification last. See
:mod:`verifiers._mathcmp` for the rules on sets, tuples, intervals, matrices,
equations and inequalities.

Example:
    >>> is_equivalent("\\\\frac{1}{2}", "0.5")
    True
    >>> verify("... so the answer is \\\\boxed{x = 3}", {"answer": "3"}).score
    1.0
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Literal

from verifiers._deadline import TimeLimitExceeded, time_limit
from verifiers._mathcmp import Answer, equivalent, is_single_number, read_answer
from verifiers._mathnorm import last_boxed
from verifiers.base import Verdict

__all__ = [
    "extract_answer",
    "gold_answer",
    "is_equivalent",
    "last_boxed",
    "verify",
    "verify_any",
]

Mode = Literal["anchored", "any"]
DEFAULT_TIMEOUT_S = 5.0

_GSM8K = re.compile(r"####\s*([^\n]*)")
_ANCHOR = re.compile(
    r"(?:final\s+answer|the\s+answer|\banswer)\s*(?:is\s*:?|:|=)\s*(?:is\s*)?", re.IGNORECASE
)
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_KEEP_WORDS = {"or", "and", "pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "infty"}


def _trim_tail(tail: str) -> str:
    """The answer at the start of the text after an anchor: math only, no trailing prose."""
    line = tail.strip().split("\n", 1)[0].strip()
    boxed = last_boxed(line)
    if boxed is not None:
        return boxed
    segment = _MATH_SEGMENT.search(line)
    if segment and segment.start() < 3:
        return next(g for g in segment.groups() if g is not None).strip()
    line = re.split(r"\.\s", line, maxsplit=1)[0]
    kept = []
    for word in line.split():
        letters = re.sub(r"[^A-Za-z]", "", word)
        if len(letters) >= 2 and "\\" not in word and letters.lower() not in _KEEP_WORDS:
            if re.fullmatch(r"[A-Za-z]+[.,;:!]?", word):
                break
        kept.append(word)
    # A textual answer ("Monday.") has no math prefix: keep the sentence.
    return (" ".join(kept) if kept else line).rstrip(" .,;:")


def extract_answer(text: str, mode: Mode = "anchored") -> str | None:
    """The answer a completion commits to, or None when it marks none.

    Args:
        text: the model's completion.
        mode: ``"anchored"`` grades only marked answers (boxed, ``####``,
            "final answer is", "answer:"); ``"any"`` falls back to the last LaTeX
            expression or number, for data whose answers are unmarked.
    """
    if mode not in ("anchored", "any"):
        raise ValueError(f"mode must be 'anchored' or 'any', got {mode!r}")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    gsm = list(_GSM8K.finditer(text))
    if gsm and gsm[-1].group(1).strip():
        return _trim_tail(gsm[-1].group(1))
    anchors = list(_ANCHOR.finditer(text))
    if anchors:
        answer = _trim_tail(text[anchors[-1].end() :])
        if answer:
            return answer
    if mode == "any":
        return _last_expression(text)
    return None


def _mathy(chunk: str) -> bool:
    letters = re.sub(r"[^A-Za-z]", "", chunk)
    plain_word = len(letters) >= 2 and "\\" not in chunk and letters.lower() not in _KEEP_WORDS
    return bool(chunk) and not plain_word


def _last_expression(text: str) -> str | None:
    """The last LaTeX expression or number, for ``mode="any"``."""
    text = text.rstrip()
    segments = list(_MATH_SEGMENT.finditer(text))
    if segments and segments[-1].end() >= len(text) - 2:
        return next(g for g in segments[-1].groups() if g is not None).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        chunks = lines[-1].rstrip(" .,;:").split()
        tail = []
        while chunks and _mathy(chunks[-1]):
            tail.insert(0, chunks.pop())
        if tail and re.search(r"[\d\\]", " ".join(tail)):
            return " ".join(tail)
    if segments:
        return next(g for g in segments[-1].groups() if g is not None).strip()
    numbers = list(_NUMBER.finditer(text))
    return numbers[-1].group().strip() if numbers else None


def gold_answer(example: Mapping[str, Any] | str, key: str = "answer") -> str:
    """The bare gold answer of an example: a bare answer, a boxed one, or after ``####``."""
    if isinstance(example, Mapping):
        for name in (key, "solution", "gold", "target"):
            if example.get(name) is not None:
                example = example[name]
                break
        else:
            raise KeyError(f"example has no {key!r} (or 'solution') field")
    raw = str(example)
    boxed = last_boxed(raw)
    if boxed is not None:
        return boxed
    gsm = list(_GSM8K.finditer(raw))
    if gsm:
        return gsm[-1].group(1).strip()
    return raw.strip()


@functools.lru_cache(maxsize=4096)
def _read_gold(gold: str) -> Answer:
    # Gold answers repeat across the G completions of a group; parse once.
    return read_answer(gold)


@functools.lru_cache(maxsize=4096)
def _read_pred(pred: str, single_number: bool) -> Answer:
    return read_answer(pred, single_number=single_number)


def _compare(gold: str, pred: str) -> bool:
    g = _read_gold(gold)
    p = _read_pred(pred, is_single_number(g))
    return equivalent(g, p)


def is_equivalent(gold: str, pred: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``pred`` is the same answer as ``gold`` (both bare answers, LaTeX or plain).

    Not symmetric: the gold answer decides the form (gold ``x = 3`` accepts
    ``3``; gold ``3`` also accepts ``x = 3``, but a gold interval does not accept
    a restated inequality). Returns False when the comparison exceeds
    ``timeout_s``; see :func:`verify` for a verdict that says so.
    """
    try:
        return _timed_compare(gold, pred, timeout_s)
    except TimeLimitExceeded:
        return False


def _timed_compare(gold: str, pred: str, timeout_s: float | None) -> bool:
    with time_limit(timeout_s):
        try:
            return _compare(gold, pred)
        except TimeLimitExceeded:
            raise
        except Exception:
            # sympy raises many types (RecursionError too) on odd input; odd
            # input is simply not equal.
            return False


def verify(
    completion: str,
    example: Mapping[str, Any],
    *,
    mode: Mode = "anchored",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    answer_key: str = "answer",
) -> Verdict:
    """Grade a model completion against ``example[answer_key]``.

    The gold may be a bare answer (``"3/4"``), a worked solution with a boxed
    answer (MATH), or a GSM8K solution ending in ``#### 18``. Score 1.0 when the
    extracted answer is equivalent, else 0.0 with the reason.
    """
    gold = gold_answer(example, answer_key)
    pred = extract_answer(completion, mode)
    if pred is None:
        return Verdict.fail(
            "no marked answer (\\boxed{}, '####', 'answer:'); mode='any' grades unmarked text"
        )
    try:
        same = _timed_compare(gold, pred, timeout_s)
    except TimeLimitExceeded:
        return Verdict.fail(f"comparison exceeded {timeout_s:g} s", timed_out=True, extracted=pred)
    if same:
        return Verdict(1.0, True, extracted=pred)
    return Verdict(0.0, False, extracted=pred, reason=f"{pred[:200]} is not {gold[:200]}")


def verify_any(completion: str, example: Mapping[str, Any]) -> Verdict:
    """:func:`verify` with ``mode="any"``: unmarked answers are graded too."""
    return verify(completion, example, mode="any")
