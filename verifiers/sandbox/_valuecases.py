"""Asserts that only compare a call with literals become value cases, judged in the parent.

``assert add(1, 2) == 3`` needs no test code in the sandbox: the arguments and
the expected value are literals. Such a test becomes a *value case*: the
sandbox calls ``add(1, 2)`` and reports the value, and the parent compares it
with ``3``, which never enters the sandbox (as for function-call cases). A
run whose tests all have this shape needs one sandboxed process; any other
test (a helper, a loop, a computed expectation) sends the whole run to the
two-process harness (``_harness.py``).

Recognised: ``assert CALL == LIT``, ``LIT == CALL``, ``!=``, ``CALL is None /
True / False`` (and ``is not``), ``assert CALL`` and ``assert not CALL``, each
with no message or a literal one, where ``CALL`` is ``name(literals...,
key=literal...)`` of a name the program defines: in assert statements any
name that is neither a builtin nor bound by the tests themselves; in
``check(candidate)`` the candidate.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass
from typing import Any

_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is", ast.IsNot: "is not"}
_SINGLETONS = (None, True, False)


@dataclass(frozen=True)
class ValueCheck:
    """How the parent judges a returned value.

    Attributes:
        op: ``==``, ``!=``, ``is``, ``is not``, ``truthy``, ``falsy``, or ``call``
            (a function-call case: equal as JSON-like values, see ``values_equal``).
        expected: the literal compared with.
        message: the assert's message, for the verdict's detail.
    """

    op: str
    expected: Any = None
    message: str | None = None


@dataclass(frozen=True)
class ValueCase:
    """One call the sandbox makes and how its value is judged."""

    name: str
    args: list
    kwargs: dict
    check: ValueCheck


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _call(node: ast.AST, callee: str | None, bound: set[str]) -> tuple[str, list, dict] | None:
    """``(name, args, kwargs)`` when ``node`` calls a program name with literal arguments only."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    name = node.func.id
    if callee is not None and name != callee:
        return None
    if callee is None and (name in bound or name in builtins.__dict__):
        return None
    args = []
    for arg in node.args:
        ok, value = _literal(arg)
        if not ok or isinstance(arg, ast.Starred):
            return None
        args.append(value)
    kwargs = {}
    for keyword in node.keywords:
        ok, value = _literal(keyword.value)
        if not ok or keyword.arg is None:
            return None
        kwargs[keyword.arg] = value
    return name, args, kwargs


def value_case(node: ast.AST, callee: str | None, bound: set[str]) -> ValueCase | None:
    """The value case an assert statement amounts to, or None when it is not of that shape."""
    if not isinstance(node, ast.Assert):
        return None
    message = None
    if node.msg is not None:
        ok, message = _literal(node.msg)
        if not ok or not isinstance(message, str):
            return None
    test = node.test
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        call, check = _call(test.operand, callee, bound), ValueCheck("falsy", None, message)
    elif isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _OPS:
        op = _OPS[type(test.ops[0])]
        left, right = test.left, test.comparators[0]
        call = _call(left, callee, bound)
        if call is None and op in ("==", "!="):
            call, right = _call(right, callee, bound), left
        ok, expected = _literal(right)
        if not ok or (op in ("is", "is not") and not any(expected is s for s in _SINGLETONS)):
            return None
        check = ValueCheck(op, expected, message)
    else:
        call, check = _call(test, callee, bound), ValueCheck("truthy", None, message)
    if call is None:
        return None
    return ValueCase(*call, check)


def _bound_names(module: ast.Module) -> set[str]:
    """Names the tests bind themselves (imports, definitions, assignments)."""
    bound = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    return bound


def statement_cases(module: ast.Module) -> list[tuple[ast.AST, ValueCase]] | None:
    """Value cases for assert statements, when every statement is one (``assert <constant>`` aside)."""
    bound = _bound_names(module)
    cases = []
    for node in module.body:
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Constant):
            continue
        case = value_case(node, None, bound)
        if case is None:
            return None
        cases.append((node, case))
    return cases or None


def check_cases(module: ast.Module, check: ast.FunctionDef) -> list[tuple[ast.AST, ValueCase]] | None:
    """Value cases for ``check(candidate)``, when its body holds only such asserts.

    Besides ``check`` the module may hold only its docstring, imports and
    assignments of literals (HumanEval's ``METADATA``).
    """
    for node in module.body:
        if node is check or isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and _literal(node.value)[0]:
            continue
        return None
    params = check.args
    if len(params.args) != 1 or params.vararg or params.kwarg or params.kwonlyargs or check.decorator_list:
        return None
    callee = params.args[0].arg
    cases = []
    for node in check.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Constant):
            continue
        case = value_case(node, callee, set())
        if case is None:
            return None
        cases.append((node, case))
    return cases or None
