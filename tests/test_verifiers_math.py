"""Math verifier: a table of gold/prediction pairs, extraction, GSM8K golds, limits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from verifiers import math as vm
from verifiers.math import extract_answer, gold_answer, is_equivalent, verify

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"

# (gold, prediction, equivalent?) -- grouped by what each block exercises.
PAIRS = [
    # integers and number formats
    ("18", "18", True),
    ("18", "18.0", True),
    ("18", "18.00", True),
    ("18", "+18", True),
    ("18", "\\$18", True),
    ("18", "18 dollars", True),
    ("18", "$18$", True),
    ("18", "18.", True),
    ("18", "19", False),
    ("18", "-18", False),
    ("18", "180", False),
    ("18", "1.8", False),
    ("1000", "1,000", True),
    ("1,000", "1000", True),
    ("1000", "1{,}000", True),
    ("1000", "1\\,000", True),
    ("1000000", "1,000,000", True),
    ("1000000", "1 000 000", True),
    ("100200", "100,200", True),
    ("100, 200", "100,200", True),
    ("\\{100, 200\\}", "200,100", True),
    ("\\{100, 200\\}", "100200", False),
    ("1000", "1,0000", False),
    ("-5", "-5", True),
    ("-5", "−5", True),
    ("0", "0", True),
    ("0", "-0", True),
    # decimals, fractions, rounding
    ("0.5", "\\frac{1}{2}", True),
    ("0.5", ".5", True),
    ("0.5", "1/2", True),
    ("\\frac{1}{2}", "0.50", True),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "\\tfrac12", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\frac{1}{2}", "0.51", False),
    ("\\frac{1}{3}", "0.3333", True),
    ("\\frac{1}{3}", "0.333333", True),
    ("\\frac{1}{3}", "0.333", False),
    ("\\frac{1}{3}", "0.33", False),
    ("\\frac{2}{3}", "0.6667", True),
    ("\\frac{2}{3}", "0.6666", True),
    ("\\frac{2}{3}", "0.6665", False),
    ("\\frac{1}{8}", "0.125", True),
    ("\\frac{1}{8}", "0.13", False),
    ("0.67", "\\frac{2}{3}", False),
    ("3.5", "3,5", True),
    ("3.5", "7/2", True),
    ("3.5", "3\\frac{1}{2}", True),  # a mixed number
    ("\\frac{5}{3}", "1\\frac{2}{3}", True),
    ("-\\frac{5}{3}", "-1\\frac{2}{3}", True),
    ("\\frac{2x}{3}", "2\\frac{x}{3}", True),  # not a mixed number: a product
    ("1.5", "1.5\\text{ m}^2", True),
    ("\\frac{7}{2}", "\\frac{14}{4}", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{1}{2}", "-\\frac{1}{2}", False),
    ("0.\\overline{3}", "\\frac{1}{3}", True),
    ("0.1\\overline{6}", "\\frac{1}{6}", True),
    ("\\frac{3}{4}", "75\\%", True),
    # percent, degrees, units
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("0.5", "50\\%", True),
    ("50", "50\\%", True),
    ("50\\%", "5", False),
    ("30^\\circ", "30", True),
    ("30", "30^{\\circ}", True),
    ("30^\\circ", "\\frac{\\pi}{6}", True),
    ("30^\\circ", "60", False),
    ("10", "10 cm", True),
    ("10", "10\\text{ cm}", True),
    ("10\\text{ inches}", "10", True),
    ("5", "5 \\text{ square meters}", True),
    ("60", "60 miles per hour", True),
    # radicals, constants, symbolic values
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("2\\sqrt{2}", "2 \\sqrt 2", True),
    ("\\sqrt{2}", "2^{1/2}", True),
    ("\\sqrt{2}", "sqrt(2)", True),
    ("\\sqrt{2}", "1.4142", True),
    ("\\sqrt{2}", "1.41", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", False),
    ("\\sqrt[3]{8}", "2", True),
    ("3\\sqrt{5}", "\\sqrt{45}", True),
    ("\\frac{1+\\sqrt{5}}{2}", "(1+\\sqrt5)/2", True),
    ("\\frac{\\sqrt{6}+\\sqrt{2}}{4}", "\\cos(\\pi/12)", True),
    ("\\pi", "\\pi", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("\\pi", "3.1416", True),
    ("\\pi", "3.14", False),
    ("\\pi r^2", "r^2\\pi", True),
    ("e", "\\mathrm{e}", True),
    ("e^{i\\pi}", "-1", True),
    ("\\infty", "\\infty", True),
    ("\\infty", "infinity", True),
    ("-\\infty", "\\infty", False),
    ("\\log_2 8", "3", True),
    ("\\ln(e^2)", "2", True),
    ("\\binom{5}{2}", "10", True),
    ("\\binom{5}{2}", "\\dbinom{5}{3}", True),
    ("5!", "120", True),
    ("|{-3}|", "3", True),
    ("\\lfloor 2.7 \\rfloor", "2", True),
    # complex numbers
    ("3 - 2i", "3-2i", True),
    ("3 - 2i", "-2i + 3", True),
    ("3 - 2i", "3 + 2i", False),
    ("i", "\\sqrt{-1}", True),
    # expressions with variables
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("2x", "x + x", True),
    ("2x", "2y", False),
    ("\\frac{x}{2}", "0.5x", True),
    ("\\frac{n(n+1)}{2}", "\\frac{n^2+n}{2}", True),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\sin 2x", "2\\sin x \\cos x", True),
    ("\\sqrt{x^2}", "x", False),
    ("x^2", "x^3", False),
    ("a+b", "b+a", True),
    ("ab", "ba", True),
    ("x", "X", False),
    ("x_1 + x_2", "x_{2} + x_{1}", True),
    ("x_1", "x_2", False),
    ("\\alpha + \\beta", "\\beta + \\alpha", True),
    ("2^{10}", "1024", True),
    ("2^{-1}", "\\frac{1}{2}", True),
    ("10^{6}", "1000000", True),
    ("\\frac{a}{b}", "a/b", True),
    ("\\frac{a}{b}", "b/a", False),
    # equations and assignments (the gold decides)
    ("x = 3", "3", True),
    ("3", "x = 3", True),
    ("3", "x=3", True),
    ("x = 3", "x = 3", True),
    ("x = 3", "3 = x", True),
    ("x = 3", "y = 3", False),
    ("x = 3", "x = 4", False),
    ("y = 2x + 3", "2x + 3", True),
    ("y = 2x + 3", "y = 3 + 2x", True),
    ("y = 2x + 3", "2x - y + 3 = 0", True),
    ("y = 2x + 3", "y = 2x + 4", False),
    ("x^2 + y^2 = 1", "2x^2 + 2y^2 = 2", True),
    ("x^2 + y^2 = 1", "x^2 + y^2 = 2", False),
    ("0", "x^2 - 4 = 0", False),
    ("k = \\frac{1}{2}", "0.5", True),
    # inequalities and intervals
    ("x > 3", "x > 3", True),
    ("x > 3", "3 < x", True),
    ("x > 3", "(3, \\infty)", True),
    ("x > 3", "x \\ge 3", False),
    ("x > 3", "y > 3", False),
    ("x \\le 5", "(-\\infty, 5]", True),
    ("(-2, 2)", "-2 < x < 2", True),
    ("(-2, 2)", "x^2 < 4", False),
    ("[2, 5)", "[2, 5)", True),
    ("[2, 5)", "[2,5)", True),
    ("[2, 5)", "(2, 5]", False),
    ("[2, 5)", "2 \\le x < 5", True),
    ("[2, 5)", "[2, 5]", False),
    ("(-\\infty, 1) \\cup (3, \\infty)", "x < 1 \\text{ or } x > 3", True),
    ("(-\\infty, 1) \\cup (3, \\infty)", "(3, \\infty) \\cup (-\\infty, 1)", True),
    ("(-\\infty, 1) \\cup (3, \\infty)", "(-\\infty, 1] \\cup (3, \\infty)", False),
    ("x \\in [1, 2]", "[1, 2]", True),
    ("(-\\infty, \\infty)", "\\mathbb{R}", True),
    # sets, lists and tuples
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "2, 1", True),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}", False),
    ("1, 2", "2, 1", True),
    ("1, 2", "x = 1 \\text{ or } x = 2", True),
    ("1, 2", "x = 1, x = 2", True),
    ("1, 2", "1", False),
    ("\\pm 3", "3, -3", True),
    ("\\pm 3", "-3, 3", True),
    ("\\pm 3", "3", False),
    ("\\frac{-1 \\pm \\sqrt{5}}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", True),
    ("(1, 2)", "(1, 2)", True),
    ("(1, 2)", "(2, 1)", False),
    ("(1, 2)", "(1, 2, 3)", False),
    ("(1, 2)", "\\{1, 2\\}", False),
    ("(\\frac{1}{2}, -3)", "(0.5, -3)", True),
    ("(1, 2, 3)", "(1,2,3)", True),
    ("\\emptyset", "\\{\\}", True),
    ("\\emptyset", "\\varnothing", True),
    # matrices and vectors
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 2)", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(2, 1)", False),
    (
        "\\begin{pmatrix} \\frac{1}{2} \\\\ 0 \\end{pmatrix}",
        "\\begin{pmatrix} 0.5 \\\\ 0 \\end{pmatrix}",
        True,
    ),
    # text answers and multiple choice
    ("\\text{(B)}", "B", True),
    ("\\text{(B)}", "(B)", True),
    ("\\text{(B)}", "\\textbf{(B)}", True),
    ("B", "(b)", True),
    ("\\text{(B)}", "C", False),
    ("\\text{Monday}", "monday", True),
    ("\\text{Monday}", "Tuesday", False),
    ("\\text{yes}", "Yes", True),
    ("\\text{no}", "on", False),
    ("\\text{even}", "odd", False),
    # hostile or malformed predictions are simply wrong, and fast
    ("10", "10^{10^{10}}", False),
    ("10", "2^{2^{2^{2^{2}}}}", False),
    ("10", "100000!", False),
    ("1", "\\frac{1}{0}", False),
    ("1", "", False),
    ("1", "\\frac{", False),
    ("1", "((((((((((1", False),
    ("1", "{" * 30 + "1" + "}" * 30, True),
    ("12", "1 2", False),
    ("6", "2 \\times 3", True),
    ("6", "2 \\cdot 3", True),
    ("2", "6 \\div 3", True),
    ("\\frac{3}{2}", "3:2", True),
]


@pytest.mark.parametrize(("gold", "pred", "expected"), PAIRS)
def test_pair(gold, pred, expected):
    assert is_equivalent(gold, pred) is expected


def test_table_is_large_and_balanced():
    assert len(PAIRS) >= 200
    falses = sum(not e for _, _, e in PAIRS)
    assert 50 <= falses <= len(PAIRS) - 50


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "mode", "answer"),
    [
        ("so we get \\boxed{\\frac{1}{2}}.", "anchored", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{1, \\{2\\}\\}}", "anchored", "\\{1, \\{2\\}\\}"),
        ("\\fbox{7}", "anchored", "7"),
        ("the result is \\boxed 5 today", "anchored", "5"),
        ("Janet makes 9 * 2 = $18.\n#### 18", "anchored", "18"),
        ("Final answer: 42", "anchored", "42"),
        ("The final answer is $\\frac{3}{4}$. I hope", "anchored", "\\frac{3}{4}"),
        ("So the answer is 12 apples.", "anchored", "12"),
        ("The answer is x = 5 or x = 6.", "anchored", "x = 5 or x = 6"),
        ("answer: Monday.", "anchored", "Monday"),
        ("I think it is 42.", "anchored", None),
        ("I think it is 42.", "any", "42"),
        ("first $x = 1$ and then $y = 2$", "any", "y = 2"),
        ("We get 3 and then 1,234.", "any", "1,234"),
        ("nothing here", "any", None),
        # boxes joined by "and" / commas / \text{and} are one list answer
        ("roots \\boxed{1} and \\boxed{2}.", "anchored", "1, 2"),
        ("$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$", "anchored", "(2, 2), (6, 2)"),
        ("\\boxed{2}. Then we check, so \\boxed{4}", "anchored", "4"),
        # a final answer stated after the last box wins
        ("we get \\boxed{255}. Final Answer: The final answer is $10,455$. I hope it is correct.",
         "anchored", "10,455"),
        # a sentence around one number gives the number; a hedge stays a sentence (and fails)
        ("Final Answer: The largest $n$ is 34.", "anchored", "34"),
        ("Final Answer: Jane started growing Sphere 3 hours ago.", "anchored", "3"),
        ("Final Answer: it is either 3 or 5.", "anchored", "it is either 3 or 5"),
        # the model writing the next chat turn itself is not graded
        ("so \\boxed{12}<|im_end|><|im_start|>user \\boxed{7}", "anchored", "12"),
        ("there are 12 of them. I hope it is correct. <|im_start|>user What is 5?", "any", "12"),
        ("AZYUK2A", "any", None),
    ],
)
def test_extract_answer(text, mode, answer):
    assert extract_answer(text, mode) == answer


def test_hedged_final_answer_earns_nothing():
    assert not verify("Final Answer: it is either 3 or 5.", {"answer": "5"}).correct
    assert not verify("\\boxed{3} or \\boxed{5}", {"answer": "5"}).correct


def test_gold_answer_forms():
    assert gold_answer({"answer": "3/4"}) == "3/4"
    assert gold_answer({"answer": "So $x = \\boxed{\\dfrac{1}{2}}$."}) == "\\dfrac{1}{2}"
    assert gold_answer({"answer": "9 * 2 = 18\n#### 18"}) == "18"
    assert gold_answer({"solution": "thus \\boxed{5}"}) == "5"
    assert gold_answer({"answer": 7}) == "7"
    worked = "Final Answer: The final answer is $28 \\%$. I hope it is correct."
    assert gold_answer({"answer": worked}) == "28 \\%"
    assert gold_answer({"answer": "\\boxed{1} papers and \\boxed{2} bins"}) == "1, 2"


def test_verify_verdicts():
    example = {"answer": "The area is $\\boxed{2\\pi}$."}
    good = verify("Area is \\(2\\pi\\), i.e. \\boxed{\\pi \\cdot 2}", example)
    assert good.correct and good.score == 1.0 and good.extracted == "\\pi \\cdot 2"
    bad = verify("\\boxed{3\\pi}", example)
    assert bad.score == 0.0 and "3\\pi" in bad.reason
    unmarked = verify("2\\pi", example)
    assert unmarked.score == 0.0 and "no marked answer" in unmarked.reason
    assert verify("2\\pi", example, mode="any").correct
    assert vm.verify_any("it is 2\\pi", example).correct


def test_deeply_nested_prediction_is_rejected_quickly():
    start = time.monotonic()
    assert not is_equivalent("1", "{" * 5000 + "1" + "}" * 5000)
    assert not is_equivalent("1", "\\sqrt{" * 3000 + "1" + "}" * 3000)
    assert time.monotonic() - start < 5


def test_hostile_prediction_stays_within_the_time_limit():
    start = time.monotonic()
    assert not is_equivalent("x", "(x+1)^{2000} - (x+2)^{2000}", timeout_s=1.0)
    assert time.monotonic() - start < 5


# Equal, but proving it means expanding 2000th powers (seconds of sympy).
SLOW_GOLD = "(x+1)^{2000} - (x+2)^{2000}"
SLOW_PRED = "\\frac{(2x+2)^{2000}}{2^{2000}} - (x+2)^{2000}"


def test_time_limit_reports_timeout():
    verdict = verify(f"\\boxed{{{SLOW_PRED}}}", {"answer": SLOW_GOLD}, timeout_s=0.3)
    assert verdict.timed_out and verdict.score == 0.0 and verdict.extracted == SLOW_PRED
    assert verdict.error == "timeout"
    assert is_equivalent(SLOW_GOLD, SLOW_PRED, timeout_s=0.3) is False


def test_time_limit_holds_off_the_main_thread():
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault(
            "v", verify(f"\\boxed{{{SLOW_PRED}}}", {"answer": SLOW_GOLD}, timeout_s=0.3)
        )
    )
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and out["v"].timed_out


def test_works_from_threads():
    results = []

    def grade():
        results.append(is_equivalent("\\frac{1}{2}", "0.5") and not is_equivalent("1", "2"))

    threads = [threading.Thread(target=grade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


# ------------------------------------------------------------------ GSM8K golds


def _gsm8k_rows():
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} not present")
    return [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]


def test_gsm8k_gold_answers_in_many_formats():
    rows = _gsm8k_rows()
    assert len(rows) == 1319
    wrong = []
    for row in rows:
        gold = gold_answer(row)
        value = int(gold.replace(",", ""))
        cases = [
            (f"So the answer is \\boxed{{{gold}}}.", True),
            (f"{row['answer']}", True),
            (f"#### {value:,}", True),
            (f"The final answer is ${value}.00$", True),
            (f"Answer: \\${value:,}", True),
            (f"Answer: {value + 1}", False),
            (f"\\boxed{{{value * 10}}}", False),
        ]
        for completion, expected in cases:
            if verify(completion, row).correct is not expected:
                wrong.append((gold, completion))
    assert wrong == []
