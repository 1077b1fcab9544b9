"""Math verifier: answer extraction and sympy equivalence under a hard time and memory limit.

Extraction (:mod:`verifiers.math.extract`) takes a "final answer" stated after
the last boxed answer, else the last group of ``\\boxed{}`` answers, else the
last GSM8K ``####`` line, else the last anchored "the answer is" / "answer:".
Unmarked text is not graded unless ``mode="any"``, which then takes the last
LaTeX expression or number. Normalisation (:mod:`verifiers.math.normalize`)
removes presentation (number formats, ``\\dfrac``, ``\\left``, ``\\text{}``,
units, percent, degrees, currency); comparison (:mod:`verifiers.math.compare`)
is on sympy objects: exact rationals first, rounding only where a decimal
meets an irrational value, symbolic simplification last.

Extraction and comparison both run in a grading process
(:mod:`verifiers.math.limits`) that is killed at the time limit, whatever the
input does and from whichever thread the call comes, and whose address space
is capped. This module itself does not import sympy.

Example:
    >>> is_equivalent("\\\\frac{1}{2}", "0.5")
    True
    >>> verify("... so the answer is \\\\boxed{x = 3}", {"answer": "3"}).score
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verifiers.base import Verdict
from verifiers.math import limits
from verifiers.math.extract import Mode, extract_answer, gold_answer
from verifiers.math.latex import last_boxed

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Mode",
    "extract_answer",
    "gold_answer",
    "is_equivalent",
    "last_boxed",
    "verify",
    "verify_any",
]

DEFAULT_TIMEOUT_S = 5.0


def is_equivalent(gold: str, pred: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether ``pred`` is the same answer as ``gold`` (both bare answers, LaTeX or plain).

    Not symmetric: the gold answer decides the form (gold ``x = 3`` accepts
    ``3``; gold ``3`` also accepts ``x = 3``, but a gold interval does not accept
    a restated inequality). Returns False when the comparison exceeds
    ``timeout_s`` or the memory limit; see :func:`verify` for a verdict that says so.
    """
    try:
        outcome = limits.run(("equivalent", str(gold), str(pred)), timeout_s)
    except limits.GradingUnavailable:
        return False
    return outcome.status == "ok" and bool(outcome.result[1])


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
    answer (MATH) or a stated final answer, or a GSM8K solution ending in
    ``#### 18``. Score 1.0 when the extracted answer is equivalent, else 0.0
    with the reason. ``timeout_s`` bounds extraction and comparison together;
    past it the verdict is ``timed_out`` (with ``extracted`` when extraction
    had finished).
    """
    if mode not in ("anchored", "any"):
        raise ValueError(f"mode must be 'anchored' or 'any', got {mode!r}")
    gold_field = _gold_field(example, answer_key)
    try:
        outcome = limits.run(("verify", str(completion), gold_field, mode), timeout_s)
    except limits.GradingUnavailable as exc:
        return Verdict.fail(f"math grading unavailable: {exc}", error="unavailable")
    extracted = outcome.progress[2] if outcome.progress else None
    if outcome.status == "timeout":
        return Verdict.fail(f"grading exceeded {timeout_s:g} s", timed_out=True, extracted=extracted)
    if outcome.status == "memory":
        return Verdict.fail(
            f"grading exceeded the {limits.MEMORY_MB} MB memory limit", error="crashed", extracted=extracted
        )
    if outcome.status != "ok":
        return Verdict.fail(f"math grading failed: {outcome.message}", error="crashed", extracted=extracted)
    _, gold, pred, same = outcome.result
    if pred is None:
        return Verdict.fail(
            "no marked answer (\\boxed{}, '####', 'answer:'); mode='any' grades unmarked text"
        )
    if same:
        return Verdict(1.0, True, extracted=pred)
    return Verdict(0.0, False, extracted=pred, reason=f"{pred[:200]} is not {gold[:200]}")


def _gold_field(example: Mapping[str, Any] | str, key: str) -> str:
    """The raw gold text (its answer is extracted in the grading process, under the limit)."""
    if not isinstance(example, Mapping):
        return str(example)
    for name in (key, "solution", "gold", "target"):
        if example.get(name) is not None:
            return str(example[name])
    raise KeyError(f"example has no {key!r} (or 'solution') field")


def verify_any(completion: str, example: Mapping[str, Any]) -> Verdict:
    """:func:`verify` with ``mode="any"``: unmarked answers are graded too."""
    return verify(completion, example, mode="any")
