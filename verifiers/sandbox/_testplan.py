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
from typing import Any

from verifiers import _pyast

UNIT_HOOK = "__ouroboros_unit__"


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
        job: the harness job (sent into the sandbox; holds no expected outputs
            for stdin/stdout and function-call cases).
        names: a short human-readable label per test.
        expected: expected output (str) or return value per test, for judging in
            the parent; empty for assert-style tests, which judge themselves.
    """

    job: dict
    names: list[str]
    expected: list[Any] = field(default_factory=list)

    @property
    def mode(self) -> str:
        """``statements``, ``check``, ``stdio`` or ``call``."""
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
        encoded = [json.dumps(list(args)) for args in inputs]
        job = {"mode": "call", "program": program, "fn_name": fn_name, "inputs": encoded}
        return CasePlan(job, [f"call {i}" for i in range(len(inputs))], list(outputs))
    texts = [_as_text(x) for x in inputs]
    job = {"mode": "stdio", "program": program, "inputs": texts}
    return CasePlan(job, [f"case {i}" for i in range(len(inputs))], [_as_text(y) for y in outputs])


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


def _plan_statements(program: str, tests: str, module: ast.Module) -> CasePlan:
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
    job = {"mode": "statements", "program": program, "units": units}
    return CasePlan(job, names)


def _plan_check(
    program: str, tests: str, module: ast.Module, check: ast.FunctionDef, entry_point: str
) -> CasePlan:
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
    job = {
        "mode": "check",
        "program": program,
        "tests": source,
        "entry_point": entry_point,
        "whole_check": whole,
    }
    return CasePlan(job, names)
