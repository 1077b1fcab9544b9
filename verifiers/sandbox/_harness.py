"""Test harness: runs inside the sandbox and keeps the program under test away from the results.

A run is two processes. The harness (this file, trusted) holds the report
channel and reads the tests. The program runs in a child forked *before* the
tests were read, so its memory never held them, and it keeps no descriptor but
its own two pipes to the harness (the report channel and the tests' pipe are
closed before any of its code runs). The harness makes itself non-dumpable
first, so the program (same uid) can neither ptrace it nor open its memory or
descriptors through /proc.

* Assert statements and ``check(candidate)`` run here, in the harness's own
  interpreter, which the program never touched: each name the program defined
  is bound to a handle (``_wire.py``), calling it asks the program's process,
  and what comes back is rebuilt as plain data, so an assert compares built-in
  values with built-in ``==``. Program names that shadow builtins are not bound
  (except the entry point): the tests' ``abs`` or ``set`` stay the real ones.
* Function-call cases: the function is called the same way and the harness
  reports the value; the parent compares it with the expected one, which never
  enters the sandbox.
* stdin/stdout cases: each case runs in a child forked from the harness with
  descriptors 0-2 only; the harness reports what it printed; the parent compares.

Every record (``<index> <status> <hex data>`` per line) is written by the
harness after its test ran. Two transports: a local run gets its job in
``SANDBOX_PAYLOAD`` and reports on ``SANDBOX_REPORT_FD`` (:func:`run_local`); a
run on a code-execution service gets its job in the source and reports on
stdout, the program's output going to files (:func:`run_remote`). Either way the
tests arrive on stdin, after the program's process was started.

Standard library only (``_wire.py``'s source precedes this file's in the
sandbox) and few imports: every module imported here is paid again per run.
"""

import _signal as signal
import builtins
import marshal
import os
import sys
import time

if not globals().get("_IN_SANDBOX"):  # on the host; in the sandbox the earlier sources come first
    from verifiers.sandbox._program import (
        GRACE_S,
        Program,
        UnitTimeout,
        await_program,
        classify,
        close_all_but,
        describe,
        load,
        on_alarm,
        prefix_fd,
        tests_namespace,
    )
    from verifiers.sandbox._wire import PeerGone, WireError, _string, decode, encode

_MEMORY_EXIT = 86


class _Report:
    def __init__(self, fd):
        self.fd = fd

    def __call__(self, index, status, data=b""):
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        line = b"%s %s %s\n" % (str(index).encode(), status.encode(), data.hex().encode())
        # An alarm between two writes would cut a record in half: it waits until the line is out.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view) :]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def _quit(code=None):
    raise SystemExit(code)


def _find_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None).prctl
    except (ImportError, OSError, AttributeError):
        return None


# Looked up once: where the harness is preloaded (a fork server), before any run.
_PRCTL = _find_prctl()


def _make_private():
    # Without this the program, under the same uid, could ptrace the harness or
    # open /proc/<harness>/mem and /proc/<harness>/fd/<report>.
    if _PRCTL is None or _PRCTL(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        sys.stderr.write("harness: could not make itself non-dumpable\n")


# ------------------------------------------------------------------ running the tests


class _Run:
    def __init__(self, report, job, tests):
        self.report = report
        self.per_test_s = float(job["per_test_s"])
        self.n_units = tests["n_units"]
        self.job, self.tests = job, tests
        self.program = None
        self.deadline = None

    def fail_all(self, status, detail):
        for index in range(self.n_units):
            self.report(index, status, detail)

    def unit(self, index):
        return _Unit(self, index)

    def budget(self):
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)


class _Unit:
    """One test: times it, and reports it once it ran (``passed``, a failure, or ``ok`` with a value)."""

    def __init__(self, run, index):
        self.run, self.index = run, index
        self.value = None

    def __enter__(self):
        program = self.run.program
        self.gone_before = program is not None and program.channel.gone is not None
        self.run.deadline = time.monotonic() + self.run.per_test_s
        # With a program's process, its own clock fires first and this one is the backstop.
        signal.setitimer(signal.ITIMER_REAL, self.run.per_test_s + (GRACE_S if program else 0.0))
        return self

    def __exit__(self, exc_type, exc, tb):
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.run.deadline = None
        program = self.run.program
        broke = program is not None and program.channel.gone is not None and not self.gone_before
        if broke and not isinstance(exc, PeerGone):
            program.stop()  # interrupted mid-call: the exchange is out of step
        if exc is None:
            self.run.report(self.index, *(("passed",) if self.value is None else ("ok", self.value)))
        elif isinstance(exc, PeerGone):
            status, detail = program.end_status()
            if self.gone_before:
                why = f"the program's process ended in an earlier test ({detail})"
                self.run.report(self.index, "not_run", why)
            else:
                self.run.report(self.index, status, f"the program's process ended during this test: {detail}")
        else:
            self.run.report(self.index, *classify(exc))
        return True


def _run_statements(run, namespace):
    for index, kind, source in run.tests["units"]:
        if kind == "setup":
            try:
                exec(compile(source, "<tests>", "exec"), namespace)
            except BaseException as exc:
                detail = "test setup failed: " + describe(exc)
                for later, later_kind, _ in run.tests["units"]:
                    # A set-up unit carries the index of the test after it.
                    if later_kind == "test" and later >= index:
                        run.report(later, "runtime_error", detail)
                return
            continue
        code = compile(source, "<tests>", "exec")
        with run.unit(index):
            exec(code, namespace)


def _run_check(run, namespace):
    entry = run.job["entry_point"]
    if not callable(namespace.get(entry)):
        run.fail_all("runtime_error", f"entry point {entry!r} is not defined")
        return
    namespace["__ouroboros_unit__"] = run.unit
    try:
        exec(compile(run.tests["tests"], "<tests>", "exec"), namespace)
        check = namespace["check"]
        if run.tests["whole_check"]:
            with run.unit(0):
                check(namespace[entry])
        else:
            check(namespace[entry])
    except BaseException as exc:
        run.report(-1, "runtime_error", "check() raised outside a test: " + describe(exc))


def _run_values(run):
    """Value cases, in this one process: load the program, call, report each value (the parent judges)."""
    namespace = {"__name__": "solution", "__builtins__": builtins}
    failure = load(run.job, namespace)
    if failure is not None:
        run.fail_all(*failure)
        return
    solution = []
    for index, (name, args, kwargs) in enumerate(run.job["calls"]):
        with run.unit(index) as unit:
            target = namespace.get(name)
            leetcode = run.job["solution_class"] and isinstance(namespace.get("Solution"), type)
            if not callable(target) and leetcode:
                # LeetCode style: the function is a method of class Solution.
                solution = solution or [namespace["Solution"]()]
                target = getattr(solution[0], name, None)
            if not callable(target):
                raise NameError(f"name {name!r} is not defined by the program")
            value = target(*decode(args), **decode(kwargs))
            try:
                unit.value = encode(value)
            except (TypeError, WireError):
                unit.value = '{"O":' + _string(_safe_repr(value)) + "}"


def _safe_repr(value):
    try:
        return repr(value)[:200]
    except BaseException:
        return f"<{type(value).__name__}>"


def _child_main(code, in_path, out_path, err_path):
    """Body of the forked process for one stdin/stdout case; never returns."""
    status = 1
    try:
        os.setpgid(0, 0)
        for path, fd, flags in (
            (in_path, 0, os.O_RDONLY),
            (out_path, 1, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (err_path, 2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        close_all_but((prefix_fd(),))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        try:
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except MemoryError:
            status = _MEMORY_EXIT
        except BaseException as exc:
            sys.stderr.write(describe(exc) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _wait_case(pid, seconds):
    """Exit status of ``pid``, or None when it ran past ``seconds`` (then it is killed)."""
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        _, status = os.waitpid(pid, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        return status
    except UnitTimeout:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.waitpid(pid, 0)
        return None


def _read_capped(path, cap):
    try:
        with open(path, "rb") as handle:
            return handle.read(cap)
    except OSError:
        return b""


def _stdio_verdict(status, err):
    if status is None:
        return "time_limit", "case exceeded its time limit"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return "time_limit", f"killed by signal {sig} (CPU limit)"
        if sig == signal.SIGXFSZ:
            return "runtime_error", "output limit exceeded"
        return "runtime_error", f"killed by signal {sig}"
    code = os.WEXITSTATUS(status)
    if code == _MEMORY_EXIT:
        return "memory", "MemoryError (address-space limit reached)"
    if code != 0:
        return "runtime_error", f"exit status {code}: " + err[-400:].decode("utf-8", "replace")
    return "ok", ""


def _run_stdio(run):
    try:
        code = compile(run.job["program"], "<program>", "exec")
    except BaseException as exc:
        run.fail_all("runtime_error", "compile error: " + describe(exc))
        return
    cap = run.job["output_bytes"]
    for index, stdin in enumerate(run.tests["inputs"]):
        in_path, out_path, err_path = (f"case{index}.{ext}" for ext in ("in", "out", "err"))
        with open(in_path, "wb") as handle:
            handle.write(stdin.encode())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child_main(code, in_path, out_path, err_path)
        status = _wait_case(pid, run.per_test_s)
        verdict, detail = _stdio_verdict(status, _read_capped(err_path, 1 << 16))
        run.report(index, verdict, _read_capped(out_path, cap) if verdict == "ok" else detail)
        for path in (in_path, out_path, err_path):
            try:
                os.unlink(path)
            except OSError:
                pass


_RUNNERS = {"statements": _run_statements, "check": _run_check}


def _main(job, read_tests, report, forked=None):
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    # Without the site module (python -S) exit() and quit() do not exist, yet
    # competitive-programming code calls them all the time.
    builtins.exit = builtins.quit = _quit
    signal.signal(signal.SIGALRM, on_alarm)
    if job["mode"] in ("values", "stdio"):
        # Outputs judged by the parent: nothing here the program could use to pass.
        run = _Run(report, job, read_tests())
        (_run_values if job["mode"] == "values" else _run_stdio)(run)
        sys.stdout.flush()
        return
    _make_private()
    program = Program(job, forked)
    run = _Run(report, job, read_tests())
    try:
        run.program = program
        program.channel.budget = run.budget
        manifest = await_program(run, program)
        if manifest is not None:
            namespace = tests_namespace(manifest, job.get("entry_point"))
            _RUNNERS[job["mode"]](run, namespace)
    finally:
        program.stop()
        sys.stdout.flush()


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_local(payload, report_fd, forked=None):
    """A run in the local sandbox: the program's job in ``payload``, the tests on stdin (marshal).

    ``forked`` is the program's process a fork server started beside this one, if any.
    """
    _main(marshal.loads(payload), lambda: marshal.loads(_read_all(0)), _Report(report_fd), forked)


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("stdin ended early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def run_remote(script=None):
    """A run on a code-execution service: records go to stdout, the program's output to files.

    Stdin holds the program's part of the job (16 hex digits of length, then
    the JSON) and then the tests' part, read only after the program's process started.
    """
    cwd = os.getcwd()
    here = os.path.dirname(os.path.abspath(script)) if script else None
    # Never import from a directory the program can write to.
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd, here)]
    report = _Report(os.dup(1))
    sys.stdout.flush()
    sys.stderr.flush()
    captures = []
    for fd, name in ((1, "program.stdout"), (2, "program.stderr")):
        opened = os.open(os.path.join(cwd, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
        captures.append(os.path.join(cwd, name))
    job = decode(_read_exact(0, int(_read_exact(0, 16), 16)).decode("ascii"))
    try:
        _main(job, lambda: decode(_read_all(0).decode("ascii")), report)
    finally:
        sys.stderr.flush()
        for label, path in zip(("out", "err"), captures, strict=True):
            report(label, "output", _read_capped(path, job["output_bytes"]))
