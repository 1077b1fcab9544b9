"""The ``math-verify`` package's grader as a verifier (registered as ``"math_verify"``).

For grading both ways, or comparing against the grader much of the field
reports with. It runs in a grading process under the same hard time and
memory limits as :func:`verifiers.math.verify` (math-verify's own limit is a
``SIGALRM`` timer, which only works in a main thread, so it is switched off).
Needs the optional extra: ``pip install 'ouroboros-jax[math-verify]'``.

Example:
    >>> from verifiers import get
    >>> get("math_verify")("so \\\\boxed{\\\\frac{1}{2}}", {"answer": "0.5"}).correct
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import math_verify as _math_verify
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the 'math_verify' verifier needs the math-verify package: "
        "pip install 'ouroboros-jax[math-verify]' (or pip install math-verify)"
    ) from exc

from verifiers.base import Verdict
from verifiers.math import DEFAULT_TIMEOUT_S, limits

__all__ = ["grade", "verify"]


def grade(completion: str, gold: str) -> tuple[bool, str | None]:
    """math-verify's verdict and what it extracted; runs inside a grading process."""
    if "$" not in gold and "\\boxed" not in gold:
        gold = f"${gold}$"  # a bare answer, read as LaTeX
    gold_parsed = _math_verify.parse(gold, parsing_timeout=None)
    pred_parsed = _math_verify.parse(completion, parsing_timeout=None)
    same = bool(_math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))
    extracted = str(pred_parsed[-1]) if pred_parsed else None
    return same, extracted


def verify(
    completion: str,
    example: Mapping[str, Any],
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    answer_key: str = "answer",
) -> Verdict:
    """Grade ``completion`` against ``example[answer_key]`` with math-verify's ``parse`` and ``verify``."""
    if answer_key not in example:
        raise KeyError(f"example has no {answer_key!r} field")
    gold = str(example[answer_key])
    try:
        same, extracted = limits.call(f"{__name__}:grade", str(completion), gold, timeout_s=timeout_s)
    except TimeoutError:
        return Verdict.fail(f"math-verify exceeded {timeout_s:g} s", timed_out=True)
    except MemoryError as exc:
        return Verdict.fail(str(exc), error="crashed")
    except RuntimeError as exc:
        return Verdict.fail(f"math-verify failed: {exc}", error="crashed")
    except limits.GradingUnavailable as exc:
        return Verdict.fail(f"math grading unavailable: {exc}", error="unavailable")
    if same:
        return Verdict(1.0, True, extracted=extracted)
    return Verdict(0.0, False, extracted=extracted, reason=f"math-verify: {extracted} is not {gold[:200]}")
