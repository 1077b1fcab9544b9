"""The Verdict protocol, registry, weighted combination and routing; format and countdown."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import verifiers
from verifiers import Verdict, combine, get, names, register, resolve, route, to_verdict
from verifiers import base as vbase
from verifiers.countdown import evaluate, extract_equation
from verifiers.format import RegexFormat, format_problems

REPO = Path(__file__).resolve().parents[1]


def exact(completion, example):
    return float(completion.strip() == example["answer"])


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(vbase, "_REGISTRY", {})


# ------------------------------------------------------------------ protocol


def test_to_verdict_reads_numbers_and_verdicts():
    assert to_verdict(1) == Verdict(1.0, True)
    assert to_verdict(0.5) == Verdict(0.5, False)
    assert to_verdict(True).correct and not to_verdict(False).correct
    assert to_verdict(-1.0).score == -1.0
    same = Verdict(0.2, True, reason="partial")
    assert to_verdict(same) is same
    with pytest.raises(ValueError, match="NaN"):
        to_verdict(math.nan)
    with pytest.raises(TypeError):
        to_verdict("1.0")


def test_verdict_fail_and_pickling():
    v = Verdict.fail("nope", timed_out=True, extracted="42")
    assert (v.score, v.correct, v.reason, v.timed_out, v.extracted) == (0.0, False, "nope", True, "42")
    assert pickle.loads(pickle.dumps(v)) == v


def test_verdict_error_flag():
    # Positional construction as before; error is the last field.
    v = Verdict(0.5, False, "x", "why", False, {"k": 1})
    assert v.error is None and v.info == {"k": 1}
    assert Verdict(0.0, False, None, "slow", True).error == "timeout"
    assert Verdict.fail("down", error="unavailable").error == "unavailable"
    assert Verdict.fail("wrong answer").error is None
    with pytest.raises(ValueError, match="Verdict.error"):
        Verdict(0.0, False, error="oops")
    crashed = Verdict.fail("boom", error="crashed")
    assert pickle.loads(pickle.dumps(crashed)) == crashed


def test_error_flags_reach_a_combination_and_the_metrics():
    def crashes(completion, example):
        return Verdict.fail("verifier raised RuntimeError", error="crashed")

    scorer = combine([("format", 1.0), (crashes, 1.0)])
    v = scorer("\\boxed{1}", {})
    assert v.error == "crashed" and v.score == 1.0
    verdicts = [v, Verdict(1.0, True), Verdict.fail("slow", timed_out=True), Verdict.fail("no")]
    assert verifiers.verdict_metrics(verdicts) == {
        "verifier/timeouts": 1.0,
        "verifier/errors": 1.0,
        "verifier/error_rate": 0.5,
    }
    empty = verifiers.verdict_metrics([], prefix="v/")
    assert empty == {"v/timeouts": 0.0, "v/errors": 0.0, "v/error_rate": 0.0}


def test_get_loads_a_function_by_module_path():
    assert get("verifiers.format:verify") is get("format")
    assert get("verifiers.format:RegexFormat.__call__") is verifiers.format.RegexFormat.__call__


def test_plain_function_is_a_verifier():
    assert isinstance(exact, verifiers.Verifier)
    assert vbase.run_verifier(exact, " 4 ", {"answer": "4"}) == Verdict(1.0, True)


# ------------------------------------------------------------------ registry


def test_builtin_names_resolve_lazily():
    assert {"math", "math_any", "math_verify", "code", "code_partial", "format", "countdown"} <= set(names())
    assert get("math")("\\boxed{2}", {"answer": "2"}).correct
    with pytest.raises(KeyError, match="no verifier named 'nope'"):
        get("nope")


def test_register_as_decorator_and_call(clean_registry):
    @register("exact_match")
    def exact_match(completion, example):
        return completion == example["answer"]

    register("exact2", exact)
    assert get("exact_match") is exact_match and get("exact2") is exact
    assert "exact_match" in names()
    with pytest.raises(ValueError, match="already registered"):
        register("exact2", exact)
    with pytest.raises(ValueError, match="already registered"):
        register("math", exact)
    register("exact2", exact_match, overwrite=True)
    assert get("exact2") is exact_match
    with pytest.raises(TypeError):
        register("bad", 3)


def test_resolve_specs():
    assert resolve(exact) is exact
    assert resolve("format") is get("format")
    weighted = resolve({"format": 1.0, exact: 2.0})
    assert isinstance(weighted, verifiers.Weighted)
    assert [label for label, _, _ in weighted] == ["format", "exact"]
    with pytest.raises(TypeError):
        resolve(3)


# ------------------------------------------------------------------ combination and routing


def test_weighted_sum_reasons_and_primary():
    scorer = combine([("math", 1.0), ("format", 0.25)])
    good = scorer("<think>ok</think>\\boxed{4}", {"answer": "4"})
    assert good.score == 1.25 and good.correct and good.extracted == "4"
    assert good.info["scores"] == {"math": 1.0, "format": 1.0}
    unformatted = scorer("\\boxed{4}", {"answer": "4", "require_think": True})
    assert unformatted.score == 1.0 and unformatted.correct
    assert "format: no <think>" in unformatted.reason
    wrong = scorer("<think>ok</think>\\boxed{5}", {"answer": "4"})
    assert wrong.score == 0.25 and not wrong.correct and wrong.reason.startswith("math:")
    assert pickle.loads(pickle.dumps(scorer))("\\boxed{4}", {"answer": "4"}).score == 1.25
    with pytest.raises(ValueError):
        combine({})


def test_route_dispatches_on_the_example():
    router = route("task", default="math")
    assert router("\\boxed{3}", {"answer": "3"}).correct
    assert router("<answer>1+2</answer>", {"task": "countdown", "nums": [1, 2], "target": 3}).correct
    assert not route()("x", {}).correct


# ------------------------------------------------------------------ format


@pytest.mark.parametrize(
    ("completion", "problems"),
    [
        ("<think>a</think> so \\boxed{4}", []),
        ("reasoning</think> \\boxed{4}", []),  # the template opened the block
        ("\\boxed{4}", []),
        ("<think>a</think><answer>4</answer>", []),
        ("<think>a</think>\n#### 4", []),
        ("<think>never closed \\boxed{4}", ["<think> block is never closed"]),
        ("<think>a</think>", ["nothing after the reasoning"]),
        ("<think>a</think> the answer is four", ["no final answer marked"]),
        ("<think>a</think><think>b</think>\\boxed{1}", ["more than one <think> block"]),
        ("hi <think>a</think>\\boxed{1}", ["text before <think>"]),
        ("<think>a</think>\\boxed{4", ["unbalanced braces"]),
        ("<think>a</think><answer> </answer>", ["empty <answer></answer>"]),
    ],
)
def test_format_rules(completion, problems):
    found = format_problems(completion)
    assert len(found) == len(problems)
    for got, want in zip(found, problems, strict=True):
        assert got.startswith(want)


def test_format_require_think_and_custom_pattern():
    fmt = get("format")
    assert not fmt("\\boxed{4}", {"require_think": True}).correct
    pattern = r"<think>.*?</think>\s*<answer>.*?</answer>"
    assert fmt("<think>x</think> <answer>4</answer>", {"format_pattern": pattern}).correct
    assert not fmt("<answer>4</answer>", {"format_pattern": pattern}).correct
    assert RegexFormat(r"\d+")("  42 ", {}).score == 1.0


# ------------------------------------------------------------------ countdown


def test_countdown_verdicts():
    countdown = get("countdown")
    example = {"nums": [25, 3, 4, 2], "target": 44}
    assert countdown("<answer>(25 - 3) * 4 / 2</answer>", example).correct
    assert countdown("so \\boxed{(25-3) \\times 4 \\div 2 = 44}", example).correct
    assert countdown("work...\n(25 - 3) * 4 / 2 = 44", example).correct
    assert "exactly once" in countdown("<answer>25 + 19</answer>", example).reason
    assert "not 44" in countdown("<answer>25 * 2 - 3 - 4</answer>", example).reason
    assert "allowed" in countdown("<answer>25 ** 3 + 4 + 2</answer>", example).reason
    assert countdown("", example).reason == "no equation found"
    assert countdown("<answer>12/(3-3)+4</answer>", {"nums": [12, 3, 3, 4], "target": 4}).reason == (
        "division by zero"
    )
    with pytest.raises(KeyError):
        countdown("<answer>1</answer>", {"target": 1})


def test_countdown_arithmetic_is_exact():
    value, used = evaluate("(1 / 3) * 3")
    assert value == 1 and used == [1, 3, 3]
    with pytest.raises(ValueError):
        evaluate("__import__('os').system('true')")
    with pytest.raises(ValueError):
        evaluate("1" * 600)
    assert extract_equation("<answer>1+2=3</answer>") == "1+2"


def test_verifiers_import_without_jax():
    code = (
        "import sys, verifiers, verifiers.math, verifiers.code, verifiers.pool\n"
        "import verifiers.format, verifiers.countdown, verifiers.sandbox\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', "
        "'ouroboros_jax')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
