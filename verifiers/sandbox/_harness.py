"""Test harness that runs inside the sandbox; its source is executed by the launcher.

It loads the untrusted program, runs the tests the parent planned, and reports
one line per test on the report descriptor: ``<nonce> <index> <status>
<hex data>``. Verdicts on stdin/stdout and function-call cases are *not*
decided here: the harness only reports what the program printed or returned,
and the parent compares that with expected values it never sends into the
sandbox. Assert-style tests can only be judged in-process; their lines carry a
per-run nonce so that a program which prints or exits early cannot fake them.

Standard library only, and none of json/re/signal/binascii on the hot path:
every import here is paid again on every sandboxed run.
"""

# The C module: the signal package builds enums on import, which costs more than
# everything else this harness does for a short program.
import _signal as signal
import builtins
import marshal
import os
import sys

_MEMORY_EXIT = 86


class _TestTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that ``except Exception`` in a program keeps out."""


def _on_alarm(signum, frame):
    raise _TestTimeout()


class _Reporter:
    def __init__(self, fd, nonce):
        self._fd = fd
        self._nonce = nonce.encode()

    def __call__(self, index, status, data=b""):
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        fields = [self._nonce, str(index).encode(), status.encode()]
        line = b" ".join(fields + [data.hex().encode()]) + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]


def _describe(exc):
    try:
        text = str(exc)
    except BaseException:
        text = "<unprintable>"
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:500]


def _classify(exc):
    """Verdict status and detail for an exception raised by a test."""
    if isinstance(exc, _TestTimeout):
        return "time_limit", "test exceeded its time limit"
    if isinstance(exc, MemoryError):
        return "memory", "MemoryError (address-space limit reached)"
    if isinstance(exc, AssertionError):
        return "wrong_answer", _describe(exc)
    if isinstance(exc, SystemExit):
        return "runtime_error", f"program called exit({exc.code!r}) during the test"
    return "runtime_error", _describe(exc)


class _Unit:
    """Context manager around one test: times it, reports it, and stops its exception."""

    def __init__(self, report, seconds, index):
        self._report, self._seconds, self._index = report, seconds, index

    def __enter__(self):
        signal.setitimer(signal.ITIMER_REAL, self._seconds)
        return self

    def __exit__(self, exc_type, exc, tb):
        signal.setitimer(signal.ITIMER_REAL, 0)
        if exc is None:
            self._report(self._index, "passed")
        else:
            self._report(self._index, *_classify(exc))
        return True


def _load_program(job, report, namespace):
    """Compile and run the program; on failure report every test and return False."""
    try:
        code = compile(job["program"], "<program>", "exec")
    except BaseException as exc:
        _fail_all(job, report, "runtime_error", "compile error: " + _describe(exc))
        return False
    failure = None
    try:
        signal.setitimer(signal.ITIMER_REAL, job["per_test_s"])
        try:
            exec(code, namespace)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exc:
        failure = exc
    if failure is None:
        return True
    status, detail = _classify(failure)
    _fail_all(job, report, status, "program failed before the tests: " + detail)
    return False


def _fail_all(job, report, status, detail):
    for index in range(job["n_units"]):
        report(index, status, detail)


def _run_statements(job, report, namespace):
    for index, kind, source in job["units"]:
        if kind == "setup":
            try:
                exec(compile(source, "<tests>", "exec"), namespace)
            except BaseException as exc:
                detail = "test setup failed: " + _describe(exc)
                for later, later_kind, _ in job["units"]:
                    # A set-up unit carries the index of the test after it.
                    if later_kind == "test" and later >= index:
                        report(later, "runtime_error", detail)
                return
            continue
        code = compile(source, "<tests>", "exec")
        with _Unit(report, job["per_test_s"], index):
            exec(code, namespace)


def _run_check(job, report, namespace):
    entry = job["entry_point"]
    if not callable(namespace.get(entry)):
        _fail_all(job, report, "runtime_error", f"entry point {entry!r} is not defined")
        return
    namespace["__ouroboros_unit__"] = lambda index: _Unit(report, job["per_test_s"], index)
    try:
        exec(compile(job["tests"], "<tests>", "exec"), namespace)
        check = namespace["check"]
        if job["whole_check"]:
            with _Unit(report, job["per_test_s"], 0):
                check(namespace[entry])
        else:
            check(namespace[entry])
    except BaseException as exc:
        report(-1, "runtime_error", "check() raised outside a test: " + _describe(exc))


def _run_calls(job, report, namespace):
    import json

    name = job["fn_name"]
    target = namespace.get(name)
    if not callable(target) and isinstance(namespace.get("Solution"), type):
        target = getattr(namespace["Solution"](), name, None)
    if not callable(target):
        _fail_all(job, report, "runtime_error", f"function {name!r} is not defined")
        return
    for index, arguments in enumerate(job["inputs"]):
        args = json.loads(arguments)
        signal.setitimer(signal.ITIMER_REAL, job["per_test_s"])
        try:
            value = target(*args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                text = json.dumps(value)
            except (TypeError, ValueError):
                text = json.dumps({"__repr__": repr(value)})
            report(index, "ok", text)
        except BaseException as exc:
            signal.setitimer(signal.ITIMER_REAL, 0)
            report(index, *_classify(exc))


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
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        try:
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except MemoryError:
            status = _MEMORY_EXIT
        except BaseException as exc:
            sys.stderr.write(_describe(exc) + "\n")
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
    except _TestTimeout:
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


def _run_stdio(job, report):
    try:
        code = compile(job["program"], "<program>", "exec")
    except BaseException as exc:
        _fail_all(job, report, "runtime_error", "compile error: " + _describe(exc))
        return
    cap = job["output_bytes"]
    for index, stdin in enumerate(job["inputs"]):
        in_path, out_path, err_path = (f"case{index}.{ext}" for ext in ("in", "out", "err"))
        with open(in_path, "wb") as handle:
            handle.write(stdin.encode())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child_main(code, in_path, out_path, err_path)
        status = _wait_case(pid, job["per_test_s"])
        verdict, detail = _stdio_verdict(status, _read_capped(err_path, 1 << 16))
        report(index, verdict, _read_capped(out_path, cap) if verdict == "ok" else detail)
        for path in (in_path, out_path, err_path):
            try:
                os.unlink(path)
            except OSError:
                pass


def _quit(code=None):
    raise SystemExit(code)


def main(payload, report_fd):
    # Without the site module (python -S) exit() and quit() do not exist, yet
    # competitive-programming code calls them all the time.
    builtins.exit = builtins.quit = _quit
    job = marshal.loads(payload)
    report = _Reporter(report_fd, job.pop("nonce"))
    signal.signal(signal.SIGALRM, _on_alarm)
    if job["mode"] == "stdio":
        _run_stdio(job, report)
    else:
        namespace = {"__name__": "solution", "__builtins__": builtins}
        if _load_program(job, report, namespace):
            runner = {"statements": _run_statements, "check": _run_check, "call": _run_calls}
            runner[job["mode"]](job, report, namespace)
    sys.stdout.flush()
    report(-1, "done")


if __name__ == "__main__":
    main(globals().pop("SANDBOX_PAYLOAD"), globals().pop("SANDBOX_REPORT_FD"))
