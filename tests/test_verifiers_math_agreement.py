"""Agreement with math-verify on the cases of its own test suite.

``tests/data/math_verify_cases.jsonl`` holds the (gold, prediction, expected)
rows of the parametrized tests in math-verify's ``tests/`` directory
(huggingface/Math-Verify at 5d148cfaaf99214c2e4ffb4bc497ab042c592a7a) that run
with its default comparison settings: every extraction target, precision 6,
``strict=True``, ``allow_set_relation_comp=False`` (264 rows; the few with
another precision, ``strict=False`` or set/relation comparison switched on
are left out). Each row names the test it comes from.

We grade each with ``verifiers.math.verify(prediction, {"answer": gold},
mode="any")``. Where we disagree on purpose, math-verify's expected value is
wrong by our reading; those rows are listed here and in docs/verifiers.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verifiers.math import verify

CASES = Path(__file__).resolve().parent / "data" / "math_verify_cases.jsonl"

# (gold, prediction): where math-verify's expected verdict is wrong and ours is right.
DELIBERATE = {
    # Inline math broken over lines: math-verify refuses it; the completion's answer is still 9.
    ("$9$", "Answer $ \n 9 \n $"),
    ("$9$", "Answer \\( \n 9 \n \\)"),
    # A solved inequality states its interval (our rule for every gold interval).
    ("$x \\in [-2,7]$", "$-2 \\\\le x \\\\le 7$"),
    # 1 - 1/e and 1 + 1/e are different numbers; math-verify's test expects them equal.
    ("$1 - \\frac{1}{\\mathrm{e}}$", "$1 + \\frac{1}{\\mathrm{e}}$"),
}


def _rows() -> list[dict]:
    return [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]


def test_case_file_is_what_the_docstring_says():
    rows = _rows()
    assert len(rows) == 264
    assert all(set(r) == {"source", "gold", "prediction", "expected"} for r in rows)
    assert all(r["source"].startswith("huggingface/Math-Verify@5d148cf:tests/test_") for r in rows)
    assert {(r["gold"], r["prediction"]) for r in rows} >= DELIBERATE


@pytest.fixture(scope="module")
def graded() -> list[tuple[dict, bool]]:
    return [(r, verify(r["prediction"], {"answer": r["gold"]}, mode="any").correct) for r in _rows()]


def test_agreement_with_math_verify_on_its_own_cases(graded):
    disagree = [(r["gold"], r["prediction"]) for r, ours in graded if ours != r["expected"]]
    agreement = 1 - len(disagree) / len(graded)
    assert agreement >= 0.95, f"agreement {agreement:.3f}; disagreements: {disagree}"


def test_deliberate_disagreements_stay_deliberate(graded):
    ours = {(r["gold"], r["prediction"]): (got, r["expected"]) for r, got in graded}
    for pair in DELIBERATE:
        got, expected = ours[pair]
        assert got != expected, pair


def test_math_verify_verifier_is_registered_and_limited():
    pytest.importorskip("math_verify")
    from verifiers import get

    grade = get("math_verify")
    good = grade("so the answer is $\\boxed{\\frac{1}{2}}$", {"answer": "0.5"})
    assert good.correct and good.score == 1.0 and good.extracted == "\\frac{1}{2}"
    bad = grade("\\boxed{3}", {"answer": "0.5"})
    assert not bad.correct and bad.error is None and "is not 0.5" in bad.reason
    from verifiers.math import mathverify

    start = time.monotonic()
    # math-verify spends minutes on this pair.
    slow = mathverify.verify("\\boxed{(x+y+z+1)^{60}}", {"answer": "(x+y+z+2)^{60}"}, timeout_s=0.5)
    assert time.monotonic() - start < 1.0
    assert slow.timed_out and slow.error == "timeout" and not slow.correct


def test_math_verify_without_the_package_is_a_clear_error():
    code = (
        "import sys; sys.modules['math_verify'] = None\n"
        "import verifiers\n"
        "try:\n    verifiers.get('math_verify')\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "needs the math-verify package" in out.stdout and "ouroboros-jax[math-verify]" in out.stdout
