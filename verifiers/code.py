"""Code verifier: a program and its tests in, per-test verdicts and a pass rate out.

Programs run in a pristine sandboxed interpreter, forked from a pre-started
one that never ran untrusted code (see :mod:`verifiers.sandbox`).
Tests come as assert statements (MBPP), a ``check(candidate)`` function
(HumanEval), stdin/stdout cases, or function-call cases; see
:func:`run_tests`.

Example:
    >>> result = run_tests("def add(a, b):\\n    return a + b", "assert add(1, 2) == 3")
    >>> result.passed, result.pass_fraction
    (True, 1.0)
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from verifiers.base import Verdict
from verifiers.sandbox import Sandbox, SandboxResult, _wire, default_sandbox
from verifiers.sandbox._testplan import CallCase, CasePlan, IOCase, plan_tests
from verifiers.sandbox._valuecases import ValueCheck
from verifiers.sandbox.remote import REMOTE, RemoteSandbox, ServiceUnavailable

__all__ = [
    "CallCase",
    "CaseVerdict",
    "CodeResult",
    "IOCase",
    "extract_code",
    "run_tests",
    "verify",
    "verify_partial",
]

# The reason of a row a code-execution service could not run (scored 0, not the program's fault).
SERVICE_DOWN = "code-execution service unavailable"
STATUSES = ("passed", "wrong_answer", "time_limit", "runtime_error", "memory", "not_run")
# Headroom for starting the sandbox and interpreter, on top of the tests' own time.
_START_SLACK_S = 3.0


@dataclass(frozen=True)
class CaseVerdict:
    """The verdict on one test.

    Attributes:
        status: one of ``passed``, ``wrong_answer``, ``time_limit``,
            ``runtime_error``, ``memory`` or ``not_run`` (the program died or
            the run was stopped before this test).
        test: a short label (the assert's first line, or ``case 3``).
        detail: the error message or what differed.
    """

    status: str
    test: str = ""
    detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether this test passed."""
        return self.status == "passed"


@dataclass(frozen=True)
class CodeResult:
    """The outcome of :func:`run_tests`.

    Attributes:
        verdicts: one :class:`CaseVerdict` per test, in order.
        timed_out: the wall-clock limit of the whole run expired.
        stdout: the tail of what the program printed (assert-style tests only).
        stderr: the tail of its standard error.
        layers: sandbox isolation layers that were active.
        wall_s: seconds the sandboxed run took.
        service_error: why a remote code-execution service did not run the job
            (every test is then ``not_run``); empty otherwise.
    """

    verdicts: tuple[CaseVerdict, ...]
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    layers: tuple[str, ...] = ()
    wall_s: float = 0.0
    service_error: str = ""

    @property
    def passed(self) -> bool:
        """All tests passed (and there was at least one)."""
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    @property
    def pass_fraction(self) -> float:
        """Fraction of tests that passed."""
        if not self.verdicts:
            return 0.0
        return sum(v.passed for v in self.verdicts) / len(self.verdicts)

    def summary(self) -> str:
        """Counts per status, e.g. ``"7/9 passed; 2 wrong_answer"``."""
        counts = {s: sum(v.status == s for v in self.verdicts) for s in STATUSES}
        rest = [f"{n} {s}" for s, n in counts.items() if n and s != "passed"]
        first = next((v for v in self.verdicts if not v.passed), None)
        why = f" (first: {first.test!r}: {first.detail})" if first and first.detail else ""
        head = f"{counts['passed']}/{len(self.verdicts)} passed"
        return "; ".join([head, *rest]) + why[:400]


def run_tests(
    program: str,
    tests: str | Mapping[str, Any] | Sequence[IOCase] | Sequence[CallCase],
    *,
    entry_point: str | None = None,
    timeout_s: float = 10.0,
    case_timeout_s: float | None = None,
    memory_mb: int | None = None,
    sandbox: Sandbox | RemoteSandbox | None = None,
) -> CodeResult:
    """Run ``tests`` against ``program`` in a sandbox.

    The program runs in a process of its own that never holds the tests nor the
    channel results are reported on; assert-style tests run in the harness's
    process, function-call and stdin/stdout outputs are compared here (see
    ``verifiers/sandbox/_harness.py``).

    Args:
        program: Python source of the solution.
        tests: assert statements, a HumanEval ``check(candidate)`` source (with
            ``entry_point``), a list of :class:`IOCase` / :class:`CallCase`, or an
            APPS-style ``{"inputs": [...], "outputs": [...], "fn_name"?: ...}``
            mapping or JSON string.
        entry_point: the function under test; when the tests define
            ``check(candidate)`` it is called as ``check(<entry_point>)``, and for
            :class:`CallCase` lists it names the function to call.
        timeout_s: wall-clock limit for the whole run (all tests together).
        case_timeout_s: limit per test or case; defaults to ``timeout_s``.
        memory_mb: address-space limit; defaults to the sandbox's.
        sandbox: a local :class:`Sandbox` or a :class:`RemoteSandbox` (a
            code-execution service); defaults to :func:`default_sandbox`.

    Returns:
        A :class:`CodeResult`. A program that exits (``sys.exit``, ``os._exit``)
        or crashes before its tests ran gets ``not_run`` or ``runtime_error``
        verdicts and does not pass. When a remote service cannot run the job,
        every test is ``not_run`` and ``CodeResult.service_error`` says why.
    """
    box = sandbox or default_sandbox()
    plan = plan_tests(program, tests, entry_point)
    limits = replace(
        box.limits,
        wall_s=timeout_s + _START_SLACK_S,
        cpu_s=math.ceil(case_timeout_s or timeout_s) + 1,
        memory_mb=memory_mb or box.limits.memory_mb,
    )
    job = dict(plan.job, per_test_s=float(case_timeout_s or timeout_s), output_bytes=limits.output_bytes)
    try:
        outcome = box.run_harness(job, dict(plan.tests, n_units=len(plan.names)), limits=limits)
    except ServiceUnavailable as err:
        return _unavailable(plan, str(err))
    records = _parse_report(outcome.report, plan)
    verdicts = tuple(_judge(plan, i, records, outcome) for i in range(len(plan.names)))
    return CodeResult(
        verdicts=verdicts,
        timed_out=outcome.timed_out,
        stdout=outcome.stdout[-4096:].decode("utf-8", "replace"),
        stderr=outcome.stderr[-4096:].decode("utf-8", "replace"),
        layers=outcome.layers,
        wall_s=outcome.wall_s,
    )


def _unavailable(plan: CasePlan, why: str) -> CodeResult:
    detail = f"{SERVICE_DOWN}: {why}"
    verdicts = tuple(CaseVerdict("not_run", name, detail[:500]) for name in plan.names)
    return CodeResult(verdicts=verdicts, service_error=detail, layers=(REMOTE,))


# Statuses a record may carry, by mode: only the harness writes records, and
# it never writes "passed" for a test whose output is judged here.
_JUDGED_HERE = {"ok", "time_limit", "runtime_error", "memory", "not_run"}
_RECORD_STATUSES = {"statements": set(STATUSES), "check": set(STATUSES)}
_RECORD_STATUSES.update(stdio=_JUDGED_HERE, values=_JUDGED_HERE)
_OUTSIDE = -1  # key of a failure that happened outside any single test


def _parse_report(report: bytes, plan: CasePlan) -> dict[int, tuple[str, bytes]]:
    """Records by test index (the first wins; incomplete lines are ignored).

    A harness-level failure (index -1, e.g. ``check()`` raising between tests) is
    kept under ``_OUTSIDE``.
    """
    records: dict[int, tuple[str, bytes]] = {}
    allowed = _RECORD_STATUSES[plan.mode]
    for line in report.split(b"\n")[:-1]:
        fields = line.split(b" ")
        if len(fields) != 3:
            continue
        try:
            index, status = int(fields[0]), fields[1].decode("ascii")
            data = bytes.fromhex(fields[2].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            continue
        if 0 <= index < len(plan.names) and status in allowed:
            records.setdefault(index, (status, data))
        elif index == -1 and status == "runtime_error":
            records.setdefault(_OUTSIDE, (status, data))
    return records


def _judge(
    plan: CasePlan, index: int, records: dict[int, tuple[str, bytes]], outcome: SandboxResult
) -> CaseVerdict:
    name = plan.names[index]
    record = records.get(index)
    if record is None and _OUTSIDE in records:
        return CaseVerdict("runtime_error", name, records[_OUTSIDE][1].decode("utf-8", "replace"))
    if record is None:
        status, detail = _missing(outcome)
        return CaseVerdict(status, name, detail)
    status, data = record
    detail = data.decode("utf-8", "replace")
    if status != "ok":
        return CaseVerdict(status, name, detail[:500])
    if plan.mode == "stdio":
        same, why = tokens_equal(detail, plan.expected[index])
    elif plan.mode == "values":
        same, why = _value_matches(detail, plan.expected[index])
    else:
        return CaseVerdict("runtime_error", name, "harness sent an output for an assert test")
    return CaseVerdict("passed" if same else "wrong_answer", name, why)


def _value_matches(returned: str, check: ValueCheck) -> tuple[bool, str]:
    """Judge a value case: ``==`` and the rest with Python's own semantics on rebuilt plain data."""
    if check.op == "call":
        return _call_matches(returned, check.expected)
    try:
        value = _wire.decode(returned)
    except _wire.WireError:
        return False, "return value could not be read"
    if check.op == "==":
        same = value == check.expected
    elif check.op == "!=":
        same = value != check.expected
    elif check.op == "is":
        same = value is check.expected
    elif check.op == "is not":
        same = value is not check.expected
    else:
        same = bool(value) is (check.op == "truthy")
    if same:
        return True, ""
    return False, "AssertionError" + (f": {check.message}" if check.message else "")


def _missing(outcome: SandboxResult) -> tuple[str, str]:
    """Status for a test that never reported, from how the run ended."""
    if outcome.timed_out:
        return "time_limit", "wall-clock limit reached before this test finished"
    if outcome.output_exceeded:
        return "runtime_error", "output limit exceeded"
    # Killed by the CPU limit: SIGXCPU, or SIGKILL at the hard limit (bubblewrap
    # reports a child's death by signal as 128 + signal).
    code = outcome.returncode
    if code is not None and abs(code) % 128 in (signal.SIGXCPU, signal.SIGKILL) and code not in (0, 128):
        return "time_limit", f"CPU time limit reached (exit status {code})"
    tail = outcome.stderr[-300:].decode("utf-8", "replace").strip()
    why = f"program exited (status {outcome.returncode}) before this test ran"
    return "not_run", f"{why}: {tail}" if tail else why


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def tokens_equal(actual: str, expected: str) -> tuple[bool, str]:
    """Compare outputs token by token, ignoring whitespace; numbers compare as exact decimals.

    ``1.50`` equals ``1.5`` and ``1e3`` equals ``1000``; ``0.333`` does not equal ``0.3333``.
    """
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False, f"expected {len(want)} tokens, got {len(got)}"
    for position, (a, b) in enumerate(zip(got, want, strict=True)):
        if a == b:
            continue
        if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
            try:
                if Decimal(a) == Decimal(b):
                    continue
            except InvalidOperation:
                pass
        return False, f"token {position}: expected {b[:60]!r}, got {a[:60]!r}"
    return True, ""


def _call_matches(returned: str, expected: Any) -> tuple[bool, str]:
    try:
        value = _wire.decode(returned)
    except _wire.WireError:
        return False, "return value could not be read"
    if values_equal(value, expected):
        return True, ""
    # APPS wraps call-based expected values in a one-element list.
    if isinstance(expected, list) and len(expected) == 1 and values_equal(value, expected[0]):
        return True, ""
    return False, f"expected {_show(expected)}, got {_show(value)}"


def _show(value: Any) -> str:
    try:
        return json.dumps(value)[:100]
    except (TypeError, ValueError):
        return repr(value)[:100]


def values_equal(a: Any, b: Any) -> bool:
    """Equality of JSON-like values; tuples equal lists, floats within 1e-9 relative."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (type(a) is type(b) and a == b)
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, int | float) and isinstance(b, int | float):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        return False
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return a == b


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The last fenced Python block of a completion; the whole text when there is no fence.

    Blocks tagged ``python``/``py``/``python3`` win over untagged ones; blocks
    tagged with another language are ignored.
    """
    blocks = _FENCE.findall(completion)
    tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    untagged = [body for lang, body in blocks if not lang]
    if tagged or untagged:
        return (tagged or untagged)[-1]
    if "```" in completion:
        # An unterminated fence: the model ran out of tokens mid-block.
        return completion.split("```", 1)[1].split("\n", 1)[-1]
    return completion


def _program_for(code: str, example: Mapping[str, Any], entry_point: str | None) -> str:
    """Join a HumanEval-style prompt and the extracted code into one program."""
    prompt = example.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return code
    defines = entry_point and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M)
    if defines:
        # The prompt's imports and helper functions stay available; the
        # completion's definition of the entry point replaces the stub.
        return prompt + "\n\n" + code
    return prompt + code


def _tests_of(example: Mapping[str, Any]) -> Any:
    for key in ("tests", "test", "input_output", "test_cases"):
        if key in example and example[key]:
            return example[key]
    raise KeyError("example has no tests (looked for 'tests', 'test', 'input_output')")


def verify(
    completion: str,
    example: Mapping[str, Any],
    *,
    partial_credit: bool = False,
    sandbox: Sandbox | None = None,
) -> Verdict:
    """Grade the last fenced Python block of ``completion`` against ``example``'s tests.

    ``example`` holds the tests under ``tests`` / ``test`` / ``input_output``,
    and optionally ``entry_point``, ``prompt`` (prepended, HumanEval style) and
    ``timeout_s``. The score is 1.0 when every test passes, else 0.0 (the pass
    fraction with ``partial_credit=True``).
    """
    code = extract_code(completion)
    if not code.strip():
        return Verdict.fail("no code found in the completion")
    entry_point = example.get("entry_point")
    result = run_tests(
        _program_for(code, example, entry_point),
        _tests_of(example),
        entry_point=entry_point,
        timeout_s=float(example.get("timeout_s", 10.0)),
        sandbox=sandbox,
    )
    if result.service_error:
        # Not the program's fault: scored 0, with the reason, so that the run can count such rows.
        return Verdict(0.0, False, extracted=code, reason=result.service_error, error="unavailable",
                       info={"service_error": result.service_error, "layers": list(result.layers)})
    score = result.pass_fraction if partial_credit else float(result.passed)
    return Verdict(
        score=score,
        correct=result.passed,
        extracted=code,
        reason="" if result.passed else result.summary(),
        timed_out=result.timed_out,
        info={
            "pass_fraction": result.pass_fraction,
            "statuses": [v.status for v in result.verdicts],
            "layers": list(result.layers),
        },
    )


def verify_partial(completion: str, example: Mapping[str, Any]) -> Verdict:
    """:func:`verify` scoring the fraction of tests passed."""
    return verify(completion, example, partial_credit=True)
