"""Running proposed and predicted programs in the sandbox: validation of proposals, checks of answers.

Every run is one sandboxed interpreter executing a small trusted driver: it
runs the program's top level, calls ``f`` on each input under a per-call
timer, and reports the ``repr`` of each return value, or why there is none.
Report lines carry a per-run nonce, so text the program prints cannot pass for
a result, and expected outputs never enter the sandbox; the parent compares.

Validation runs each proposal twice in freshly started interpreters
(`verifiers.sandbox.Sandbox.run` of a command): each draws its own hash seed
and memory layout, so a program whose output depends on them (``hash`` of a
string, the order of a set of strings, ``id``) is caught. Checks of solver
answers need no such guarantee (the program is already known deterministic)
and take the faster `Sandbox.run_python`, which may fork from a pre-started
interpreter.

`CodeExecutor` runs many of these at once on a thread pool: each run is a
subprocess, so the threads only wait, and a batch of checks takes about as
long as its slowest run times the batch over the worker count.
"""

from __future__ import annotations

import marshal
import math
import os
import secrets
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from ouroboros_jax.selfplay.code_tasks import (
    FORBIDDEN_MODULES,
    CodeTask,
    TaskError,
    answer_text,
    canonical_value,
    check_program,
    parse_args,
    parse_proposal,
    same_output,
)
from verifiers import Verdict
from verifiers.code import extract_code
from verifiers.sandbox import Sandbox, default_sandbox

_START_SLACK_S = 3.0
# Runs inside the sandbox. Standard library only; `_signal` rather than `signal`
# because the package's enum set-up costs more than the rest of the driver.
_DRIVER = r'''
import _signal
import marshal
import os

try:
    _payload, _fd = SANDBOX_PAYLOAD, SANDBOX_REPORT_FD
    del SANDBOX_PAYLOAD
except NameError:
    # Started as a command: the job comes on stdin, results go to a private copy
    # of stdout, and whatever the program prints goes to stderr.
    import sys

    _payload = sys.stdin.buffer.read()
    _fd = os.dup(1)
    os.dup2(2, 1)
_job = marshal.loads(_payload)
_nonce = _job["nonce"].encode()
del _payload


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _send(index, status, text):
    line = b"\n" + b" ".join([_nonce, str(index).encode(), status.encode(),
                      text.encode("utf-8", "replace").hex().encode()]) + b"\n"
    view = memoryview(line)
    while view:
        view = view[os.write(_fd, view):]


def _why(exc):
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return (type(exc).__name__ + (": " + text if text else ""))[:300]


def _plain(x, depth=0):
    if depth > 30:
        return False
    t = type(x)
    if t in (int, float, str, bytes, bool, type(None)):
        return True
    if t in (list, tuple, set):
        return all(_plain(y, depth + 1) for y in x)
    if t is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in x.items())
    return False


_signal.signal(_signal.SIGALRM, _alarm)
_space = {"__name__": "__program__", "__builtins__": __builtins__}
try:
    _signal.setitimer(_signal.ITIMER_REAL, _job["timeout_s"])
    exec(compile(_job["program"], "<program>", "exec"), _space)
    _signal.setitimer(_signal.ITIMER_REAL, 0)
    _f = _space.get("f")
    if not callable(_f):
        raise NameError("the program defines no function f")
except BaseException as exc:
    _signal.setitimer(_signal.ITIMER_REAL, 0)
    if isinstance(exc, _Timeout):
        _send(-1, "timeout", "the top level ran past %s s" % _job["timeout_s"])
    else:
        _send(-1, "error", _why(exc))
    os._exit(0)
for _i, _text in enumerate(_job["inputs"]):
    try:
        _args = eval("(" + _text + ",)", {"__builtins__": {}, "set": set})
        _signal.setitimer(_signal.ITIMER_REAL, _job["timeout_s"])
        _value = _f(*_args)
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        if not _plain(_value):
            _kind = type(_value).__name__
            _send(_i, "unrepresentable", "f returned a %s that is not a plain literal" % _kind)
            continue
        _text = repr(_value)
        if len(_text) > _job["max_chars"]:
            _send(_i, "unrepresentable", "output longer than %d characters" % _job["max_chars"])
        else:
            _send(_i, "ok", _text)
    except BaseException as exc:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        if isinstance(exc, _Timeout):
            _send(_i, "timeout", "f ran past %s s" % _job["timeout_s"])
        else:
            _send(_i, "error", _why(exc))
os._exit(0)
'''
_DRIVER_CODE = compile(_DRIVER, "<selfplay-driver>", "exec")


@dataclass(frozen=True)
class ExecSettings:
    """Limits and rules for running programs.

    Attributes:
      timeout_s: limit for the program's top level and for each call of ``f``.
      memory_mb: address-space limit of the sandboxed interpreter.
      max_program_chars: longest program accepted.
      max_value_chars: longest input or output ``repr`` accepted.
      forbidden_modules: imports that reject a program (see `code_tasks.FORBIDDEN_MODULES`).
    """

    timeout_s: float = 2.0
    memory_mb: int = 512
    max_program_chars: int = 1200
    max_value_chars: int = 200
    forbidden_modules: tuple[str, ...] = FORBIDDEN_MODULES

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_program_chars", "max_value_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExecSettings.{name} must be positive (got {getattr(self, name)!r})")


@dataclass(frozen=True)
class ExecResult:
    """Outputs of one sandboxed run.

    Attributes:
      outputs: canonical repr of ``f(*args)`` per input; None where that call failed.
      errors: why each call failed ("" where it succeeded).
      error: a failure of the whole run (top level raised, no ``f``, time or output limit).
    """

    outputs: tuple[str | None, ...]
    errors: tuple[str, ...]
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(o is not None for o in self.outputs)

    def first_error(self) -> str:
        return self.error or next((e for e in self.errors if e), "")


def _parse_report(report: bytes, nonce: str, n: int) -> dict[int, tuple[str, str]]:
    records: dict[int, tuple[str, str]] = {}
    for line in report.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) != 4 or fields[0] != nonce.encode():
            continue
        try:
            index, status = int(fields[1]), fields[2].decode("ascii")
            text = bytes.fromhex(fields[3].decode("ascii")).decode("utf-8", "replace")
        except (ValueError, UnicodeDecodeError):
            continue
        if -1 <= index < n:
            records.setdefault(index, (status, text))
    return records


def run_program(program: str, inputs: Sequence[str], *, settings: ExecSettings,
                sandbox: Sandbox | None = None, fresh: bool = False) -> ExecResult:
    """Run ``f(*args)`` for each canonical argument list in ``inputs`` in one sandboxed interpreter.

    With ``fresh`` the interpreter is started anew for this run (`Sandbox.run` of
    a command), so it draws its own hash seed and memory layout; otherwise it may
    be forked from a pre-started one (`Sandbox.run_python`), which is faster but
    shares those with every other run, hiding such nondeterminism.
    """
    box = sandbox or default_sandbox()
    nonce = secrets.token_hex(16)
    job = {"program": program, "inputs": list(inputs), "nonce": nonce,
           "timeout_s": float(settings.timeout_s), "max_chars": settings.max_value_chars}
    budget = settings.timeout_s * (len(inputs) + 1)
    limits = replace(box.limits, wall_s=budget + _START_SLACK_S, cpu_s=math.ceil(budget) + 1,
                     memory_mb=settings.memory_mb)
    payload = marshal.dumps(job)
    exe = box.interpreter.executable
    if fresh:
        outcome = box.run([exe, "-I", "-S", "-B", "-c", _DRIVER], stdin=payload, limits=limits)
        channel = outcome.stdout
    else:
        same_python = exe == os.path.realpath(sys.executable)
        outcome = box.run_python(_DRIVER_CODE if same_python else _DRIVER, payload=payload, limits=limits)
        channel = outcome.report
    records = _parse_report(channel, nonce, len(inputs))
    if -1 in records:
        status, text = records[-1]
        return ExecResult((None,) * len(inputs), ("",) * len(inputs), f"{status}: {text}")
    outputs: list[str | None] = []
    errors: list[str] = []
    for i in range(len(inputs)):
        status, text = records.get(i, ("missing", ""))
        if status == "ok":
            try:
                outputs.append(canonical_value(text))
                errors.append("")
                continue
            except TaskError:
                status, text = "unrepresentable", f"{text[:60]} is not a literal"
        outputs.append(None)
        errors.append(f"{status}: {text}" if status != "missing" else _missing(outcome))
    return ExecResult(tuple(outputs), tuple(errors))


def _missing(outcome) -> str:
    if outcome.timed_out:
        return "timeout: wall-clock limit of the run"
    if outcome.output_exceeded:
        return "error: output limit exceeded"
    tail = outcome.stderr[-200:].decode("utf-8", "replace").strip()
    why = f"error: the run ended (status {outcome.returncode}) before this call"
    return f"{why}: {tail}" if tail else why


@dataclass(frozen=True)
class Validation:
    """A proposal's outcome: the task it made, or why it made none."""

    task: CodeTask | None
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.task is not None


def validate_proposal(kind: str, completion: str, *, n_inputs: int, n_visible: int, settings: ExecSettings,
                      sandbox: Sandbox | None = None) -> Validation:
    """Parse a proposer completion and run it twice; a task only if both runs agree and succeed.

    Rejected: no program or input block, a program that does not parse, lacks
    ``f`` or imports a forbidden module, a run that raises, times out or returns
    a value that is not a literal, and outputs that differ between the two
    runs (nondeterminism: each run is a fresh interpreter with its own hash seed).
    """
    try:
        program, inputs = parse_proposal(
            completion, n_inputs, max_chars=settings.max_program_chars,
            max_value_chars=settings.max_value_chars, forbidden=settings.forbidden_modules)
    except TaskError as e:
        return Validation(None, str(e))
    return make_task(kind, program, inputs, n_visible=n_visible, settings=settings, sandbox=sandbox)


def make_task(kind: str, program: str, inputs: Sequence[str], *, n_visible: int, settings: ExecSettings,
              sandbox: Sandbox | None = None, origin: str = "proposed") -> Validation:
    """Run ``program`` twice on canonical ``inputs``; the task when both runs succeed and agree."""
    first = run_program(program, inputs, settings=settings, sandbox=sandbox, fresh=True)
    if not first.ok:
        return Validation(None, first.first_error())
    second = run_program(program, inputs, settings=settings, sandbox=sandbox, fresh=True)
    if not second.ok:
        return Validation(None, f"second run failed: {second.first_error()}")
    if first.outputs != second.outputs:
        return Validation(None, "nondeterministic: two runs returned different outputs")
    outputs = tuple(o for o in first.outputs if o is not None)
    return Validation(CodeTask(kind, program, tuple(inputs), outputs, n_visible, origin))


def check_solution(task: CodeTask, completion: str, *, settings: ExecSettings,
                   sandbox: Sandbox | None = None) -> Verdict:
    """Grade a solver completion for ``task``: 1 when right, else 0 with the reason.

    Deduction compares the predicted literal with the stored output (no run);
    abduction runs ``f`` on the predicted input and compares with the target
    output; induction runs the predicted program on the held-back inputs.
    """
    if task.kind == "deduction":
        answer = answer_text(completion, "output")
        if same_output(answer, task.outputs[0]):
            return Verdict(1.0, True, extracted=answer)
        return Verdict.fail(f"expected {task.outputs[0][:60]}", extracted=answer)
    if task.kind == "abduction":
        answer = answer_text(completion, "input")
        try:
            args = parse_args(answer, settings.max_value_chars)
        except TaskError as e:
            return Verdict.fail(str(e), extracted=answer)
        result = run_program(task.program, [args], settings=settings, sandbox=sandbox)
        if result.ok and same_output(result.outputs[0] or "", task.outputs[0]):
            return Verdict(1.0, True, extracted=args)
        got = result.outputs[0] if result.ok else result.first_error()
        why = f"f({args[:40]}) gave {str(got)[:60]}, not {task.outputs[0][:60]}"
        return Verdict.fail(why, extracted=args)
    if task.kind == "induction":
        program = extract_code(completion).strip()
        try:
            check_program(program, max_chars=settings.max_program_chars, forbidden=())
        except TaskError as e:
            return Verdict.fail(str(e), extracted=program)
        held = task.held_back
        result = run_program(program, [i for i, _ in held], settings=settings, sandbox=sandbox)
        if not result.ok:
            return Verdict.fail(result.first_error(), extracted=program)
        wrong = [i for (i, o), got in zip(held, result.outputs, strict=True) if not same_output(got or "", o)]
        if wrong:
            return Verdict.fail(f"wrong on {len(wrong)} of {len(held)} held-back inputs", extracted=program)
        return Verdict(1.0, True, extracted=program)
    raise TaskError(f"unknown task type {task.kind!r}")


class CodeExecutor:
    """Validation and checks of many programs at once, on a pool of threads around the sandbox.

    Args:
      settings: the limits and rules of every run.
      workers: runs in flight at once.
      sandbox: the sandbox to run in; default `verifiers.sandbox.default_sandbox()`.
    """

    def __init__(self, settings: ExecSettings | None = None, *, workers: int = 4,
                 sandbox: Sandbox | None = None) -> None:
        if workers < 1:
            raise ValueError(f"CodeExecutor workers must be >= 1 (got {workers})")
        self.settings = settings or ExecSettings()
        self.sandbox = sandbox or default_sandbox()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-exec")

    def validate_many(self, proposals: Sequence[tuple[str, str]], *, n_inputs: dict[str, int],
                      n_visible: dict[str, int]) -> list[Validation]:
        """Validate ``(kind, completion)`` pairs; inputs and visible examples per kind."""
        return list(self._pool.map(
            lambda p: validate_proposal(p[0], p[1], n_inputs=n_inputs[p[0]], n_visible=n_visible[p[0]],
                                        settings=self.settings, sandbox=self.sandbox), proposals))

    def make_tasks(self, kind: str, seeds: Sequence[tuple[str, Sequence[str]]], *,
                   n_visible: int) -> list[Validation]:
        """Tasks from trusted ``(program, inputs)`` seeds, validated like proposals."""
        def one(seed):
            program, inputs = seed
            try:
                check_program(program, max_chars=self.settings.max_program_chars,
                              forbidden=self.settings.forbidden_modules)
                canonical = [parse_args(i, self.settings.max_value_chars) for i in inputs]
            except TaskError as e:
                return Validation(None, str(e))
            return make_task(kind, program, canonical, n_visible=n_visible, settings=self.settings,
                             sandbox=self.sandbox, origin="seed")
        return list(self._pool.map(one, seeds))

    def check_many(self, pairs: Sequence[tuple[CodeTask, str]]) -> list[Verdict]:
        """Grade ``(task, completion)`` pairs."""
        return list(self._pool.map(
            lambda p: check_solution(p[0], p[1], settings=self.settings, sandbox=self.sandbox), pairs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CodeExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

