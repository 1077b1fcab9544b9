"""Turns the ``tests`` argument of ``run_tests`` into a harness job.

Four formats are recognised:

* Python statements (MBPP style): every top-level statement holding an
  ``assert`` is one test, the others (imports, helpers) are set-up.
* A ``check(candidate)`` function (HumanEval style) when ``entry_point`` is
  given: every top-level statement of its body holding an ``assert`` becomes one
  test, so a solution that gets 7 of 9 cases right scores 7/9.
* stdin/stdout cases: ``IOCase`` objects, ``{"input", "output"}`` dicts, or the
  APPS / CodeContests objects ``{"inputs": [...], "outputs": [...]}`` and
  ``{"input": [...], "output": [...]}`` (as mappings or JSON strings).
* Function-call cases: ``CallCase`` objects, or the same JSON object with
  ``"fn_name"``.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verifiers import _pyast
from verifiers.sandbox import _wire
from verifiers.sandbox._valuecases import ValueCase, ValueCheck, check_cases, statement_cases

UNIT_HOOK = "__ouroboros_unit__"

# What runs inside the sandbox: the wire, the program's process, the harness,
# one source in this order (each file imports the earlier ones' names only on the host).
HARNESS_MODULE = "_ouroboros_harness"
HARNESS_SOURCE = "_IN_SANDBOX = True\n" + "\n".join(
    (Path(__file__).parent / name).read_text() for name in ("_wire.py", "_program.py", "_harness.py")
)
# A local run: the whole harness, or (in a fork server that preloaded it) a call into it.
LOCAL_SOURCE = HARNESS_SOURCE + "\nrun_local(SANDBOX_PAYLOAD, SANDBOX_REPORT_FD)\n"
PRELOADED_SOURCE = (
    f"from {HARNESS_MODULE} import run_local\n"
    "run_local(SANDBOX_PAYLOAD, SANDBOX_REPORT_FD, globals().get('SANDBOX_PROGRAM'))\n"
)
# The program's process of a paired run in a fork server: it reads the program on descriptor 5.
PROGRAM_SOURCE = f"from {HARNESS_MODULE} import program_main\nprogram_main(3, 4, job_fd=5)\n"
# A run on a code-execution service: the same source every time (a service may
# cache its compilation), the job on stdin (see remote_stdin), records on stdout.
REMOTE_SOURCE = HARNESS_SOURCE + "\nrun_remote(globals().get('__file__'))\n"


def remote_stdin(job: dict, tests: dict) -> bytes:
    """Stdin of a remote run: the program's part (length-prefixed), then the tests' part."""
    head = _wire.encode(job).encode("ascii")
    return b"%016x" % len(head) + head + _wire.encode(tests).encode("ascii")


def split_remote_output(stdout: bytes) -> tuple[bytes, bytes, bytes]:
    """A remote run's stdout as (records, the program's stdout, its stderr)."""
    records, captured = [], {b"out": b"", b"err": b""}
    for line in stdout.split(b"\n")[:-1]:
        fields = line.split(b" ")
        if len(fields) == 3 and fields[0] in captured and fields[1] == b"output":
            try:
                captured[fields[0]] = bytes.fromhex(fields[2].decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                pass
        else:
            records.append(line + b"\n")
    return b"".join(records), captured[b"out"], captured[b"err"]


@dataclass(frozen=True)
class IOCase:
    """A stdin/stdout case: the program reads ``input`` and must print ``output``."""

    input: str
    output: str


@dataclass(frozen=True)
class CallCase:
    """A function-call case: ``fn_name(*args)`` must return ``expected``."""

    args: Sequence[Any]
    expected: Any


@dataclass
class CasePlan:
    """What the harness runs and what the parent needs to judge it.

    Attributes:
        job: the program's part of the harness job (mode, program, entry point),
            which the program's process is started with.
        tests: the tests' part, sent to the harness only after the program's
            process started (so that the program never holds it); it holds no
            expected outputs for stdin/stdout and function-call cases.
        names: a short human-readable label per test.
        expected: per test, what the parent judges the reported output by: the
            expected stdout (str) of a stdin/stdout case, or a ``ValueCheck``
            of a value case (function calls, literal asserts); empty for
            assert-style tests, which the harness judges.
    """

    job: dict
    tests: dict
    names: list[str]
    expected: list[Any] = field(default_factory=list)

    @property
    def mode(self) -> str:
        """``values`` or ``stdio`` (the parent judges), ``statements`` or ``check`` (the harness judges)."""
        return self.job["mode"]


def plan_tests(program: str, tests: Any, entry_point: str | None) -> CasePlan:
    """Build the plan for ``tests`` in any of the supported formats."""
    if _is_call_cases(tests):
        if not entry_point:
            raise ValueError("CallCase tests need the function name: pass entry_point=...")
        return plan_call_cases(program, tests, entry_point)
    spec = _as_case_spec(tests)
    if spec is not None:
        return _plan_cases(program, spec)
    if not isinstance(tests, str):
        raise TypeError(f"tests must be a string, a mapping or a list of cases, got {type(tests)}")
    module = _pyast.parse(tests)
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if entry_point is not None and check is not None:
        return _plan_check(program, tests, module, check, entry_point)
    return _plan_statements(program, tests, module)


def _as_case_spec(tests: Any) -> dict | None:
    """Normalise case-based tests to ``{"inputs", "outputs", "fn_name"}``, else None."""
    if isinstance(tests, str):
        stripped = tests.lstrip()
        if not stripped.startswith("{"):
            return None
        try:
            tests = json.loads(stripped)
        except ValueError:
            return None
    if isinstance(tests, Mapping):
        # APPS: inputs/outputs (+ fn_name); CodeContests: input/output.
        inputs = tests.get("inputs", tests.get("input"))
        outputs = tests.get("outputs", tests.get("output"))
        if isinstance(inputs, list) and isinstance(outputs, list):
            if len(inputs) != len(outputs):
                raise ValueError("tests: inputs and outputs differ in length")
            return {"inputs": inputs, "outputs": outputs, "fn_name": tests.get("fn_name") or None}
    if isinstance(tests, Sequence) and not isinstance(tests, str) and tests:
        if all(isinstance(c, IOCase) for c in tests):
            return {"inputs": [c.input for c in tests], "outputs": [c.output for c in tests]}
        if all(isinstance(c, Mapping) and {"input", "output"} <= c.keys() for c in tests):
            return {"inputs": [c["input"] for c in tests], "outputs": [c["output"] for c in tests]}
    return None


def _is_call_cases(tests: Any) -> bool:
    return (
        isinstance(tests, Sequence)
        and not isinstance(tests, str)
        and bool(tests)
        and all(isinstance(c, CallCase) for c in tests)
    )


def _plan_cases(program: str, spec: dict) -> CasePlan:
    fn_name = spec.get("fn_name")
    inputs, outputs = spec["inputs"], spec["outputs"]
    if fn_name:
        pairs = zip(inputs, outputs, strict=True)
        cases = [ValueCase(fn_name, list(args), {}, ValueCheck("call", out)) for args, out in pairs]
        return _plan_values(program, cases, [f"call {i}" for i in range(len(inputs))], solution_class=True)
    texts = [_as_text(x) for x in inputs]
    job = {"mode": "stdio", "program": program}
    names = [f"case {i}" for i in range(len(inputs))]
    return CasePlan(job, {"inputs": texts}, names, [_as_text(y) for y in outputs])


def plan_call_cases(program: str, cases: Sequence[CallCase], fn_name: str) -> CasePlan:
    """Plan for a list of :class:`CallCase` against function ``fn_name``."""
    spec = {
        "inputs": [list(c.args) for c in cases],
        "outputs": [c.expected for c in cases],
        "fn_name": fn_name,
    }
    return _plan_cases(program, spec)


def _as_text(value: Any) -> str:
    # APPS stores some inputs and outputs as lists of lines.
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def _has_assert(node: ast.AST) -> bool:
    """Whether ``node`` asserts something that is not a constant (``assert True`` proves nothing)."""
    if isinstance(node, ast.Assert):
        return not isinstance(node.test, ast.Constant)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
        return False
    return any(_has_assert(child) for child in ast.iter_child_nodes(node))


def _label(tests: str, node: ast.AST) -> str:
    text = ast.get_source_segment(tests, node) or ast.unparse(node)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:160]


def _plan_values(
    program: str, cases: list[ValueCase], names: list[str], solution_class: bool = False
) -> CasePlan:
    """A run of value cases: one sandboxed process calls, the parent judges."""
    calls = []
    for i, case in enumerate(cases):
        try:
            calls.append([case.name, _wire.encode(case.args), _wire.encode(case.kwargs)])
        except (TypeError, _wire.WireError) as exc:
            raise ValueError(f"tests: the arguments of case {i} are not plain data: {exc}") from None
    job = {"mode": "values", "program": program, "calls": calls, "solution_class": solution_class}
    return CasePlan(job, {}, names, [case.check for case in cases])


def _plan_statements(program: str, tests: str, module: ast.Module) -> CasePlan:
    literal = statement_cases(module)
    if literal is not None:
        return _plan_values(program, [case for _, case in literal], [_label(tests, n) for n, _ in literal])
    units, names = [], []
    for node in module.body:
        source = ast.get_source_segment(tests, node) or ast.unparse(node)
        if _has_assert(node):
            units.append((len(names), "test", source))
            names.append(_label(tests, node))
        else:
            units.append((len(names), "setup", source))
    if not names:
        # Tests without an assert pass when they run to the end without raising.
        units = [(0, "test", tests)]
        names = ["tests run without raising"]
    return CasePlan({"mode": "statements", "program": program}, {"units": units}, names)


def _plan_check(
    program: str, tests: str, module: ast.Module, check: ast.FunctionDef, entry_point: str
) -> CasePlan:
    literal = check_cases(module, check)
    if literal is not None:
        cases = [ValueCase(entry_point, c.args, c.kwargs, c.check) for _, c in literal]
        return _plan_values(program, cases, [_label(tests, n) for n, _ in literal])
    names = []
    body = []
    for node in check.body:
        if _has_assert(node):
            hook = ast.Call(ast.Name(UNIT_HOOK, ast.Load()), [ast.Constant(len(names))], [])
            body.append(ast.With([ast.withitem(hook)], [node]))
            names.append(_label(tests, node))
        else:
            body.append(node)
    whole = not names
    if whole:
        names = [f"check({entry_point})"]
    else:
        check.body = body
    source = ast.unparse(ast.fix_missing_locations(module))
    job = {"mode": "check", "program": program, "entry_point": entry_point}
    return CasePlan(job, {"tests": source, "whole_check": whole}, names)
