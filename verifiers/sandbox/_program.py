"""The program's process under the test harness: started before the tests exist, it only answers calls.

The harness (``_harness.py``) forks this process before it reads the tests, so
nothing of them is in its memory. It keeps descriptors 0-2 and its two pipes to
the harness (nothing else: not the report channel, not the tests' pipe), loads
the program, sends a description of what the program defined (plain data as
values, everything else as handles, see ``_wire.py``), and then answers the
harness's requests: calls, attributes, iteration. Each call runs under its own
alarm, the time left for the test it belongs to.

The harness side of it, :class:`Program`, starts the process, waits for the
description and binds it into the namespace the tests run in.

Runs inside the sandbox, where its source follows ``_wire.py``'s and precedes
the harness's; standard library only.
"""

import _signal as signal
import builtins
import marshal
import os
import sys

if not globals().get("_IN_SANDBOX"):  # on the host; in the sandbox _wire.py's source comes first
    from verifiers.sandbox._wire import (
        HARNESS_OPERATIONS,
        PROGRAM_OPERATIONS,
        CallTimeout,
        Channel,
        Handle,
        PeerGone,
        WireError,
        encode,
    )

# The harness's clock for a test runs this much longer than the program's own,
# so that a program interrupted by its alarm can still answer "time limit".
GRACE_S = 0.5
_FAILURES = ("runtime_error", "time_limit", "memory")


class UnitTimeout(BaseException):
    """Raised by SIGALRM in the harness; a BaseException so that ``except Exception`` in tests keeps out."""


def on_alarm(signum, frame):
    raise UnitTimeout()


def _on_call_alarm(signum, frame):
    raise CallTimeout()


def describe(exc):
    try:
        text = str(exc)
    except BaseException:
        text = "<unprintable>"
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:500]


def classify(exc):
    """Verdict status and detail for an exception raised by a test (or by the program's top level)."""
    if isinstance(exc, (UnitTimeout, CallTimeout)):
        return "time_limit", "test exceeded its time limit"
    if isinstance(exc, MemoryError):
        return "memory", "MemoryError (address-space limit reached)"
    if isinstance(exc, AssertionError):
        return "wrong_answer", describe(exc)
    if isinstance(exc, SystemExit):
        return "runtime_error", f"program called exit({exc.code!r}) during the test"
    return "runtime_error", describe(exc)


def prefix_fd():
    """The descriptor the interpreter was started through (``/proc/self/fd/N/...``), or None."""
    head = "/proc/self/fd/"
    if sys.prefix.startswith(head):
        return int(sys.prefix[len(head) :].split("/")[0])
    return None


def _read_job(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(chunk)


def close_all_but(keep):
    low = 3
    for fd in sorted(k for k in keep if k is not None and k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def program_main(rfd, wfd, job=None, job_fd=None):
    """Body of the program's process: load the program, describe it, then answer calls. Never returns.

    Forked by the harness, it gets the program's ``job``; forked by a fork
    server beside the harness, it reads the job (marshalled, from the host) on ``job_fd``.
    """
    try:
        if job is None:
            job = marshal.loads(_read_job(job_fd))
        else:
            os.setpgid(0, 0)  # the fork server's child already leads its own session
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        close_all_but((rfd, wfd, prefix_fd()))
        channel = Channel(rfd, wfd, PROGRAM_OPERATIONS)
        channel.invoke = _timed_call
        signal.signal(signal.SIGALRM, _on_call_alarm)
        namespace = {"__name__": "solution", "__builtins__": builtins}
        failure = load(job, namespace)
        if failure is not None:
            channel.send(["failed", *failure])
            return
        channel.send(["ready", _manifest(namespace, channel)])
        channel.serve_forever()
    except BaseException:
        pass
    finally:
        os._exit(0)


def load(job, namespace):
    """Compile and run the program in ``namespace``; (status, detail) when that failed, else None."""
    try:
        code = compile(job["program"], "<program>", "exec")
    except BaseException as exc:
        return "runtime_error", "compile error: " + describe(exc)
    try:
        signal.setitimer(signal.ITIMER_REAL, job["per_test_s"])
        try:
            exec(code, namespace)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exc:
        status, detail = classify(exc)
        return status, "program failed before the tests: " + detail
    return None


def _manifest(namespace, channel):
    entries = []
    for name, value in list(namespace.items()):
        if name.startswith("__") and name.endswith("__"):
            continue
        if isinstance(value, type(sys)):
            entries.append([name, "module", str(getattr(value, "__name__", ""))])
            continue
        if not callable(value):
            try:
                encode(value)
            except BaseException:
                value = Handle(value)  # not plain data all the way down (an object inside, a cycle)
        entries.append([name, "value", value])
    return entries


_calls = [0]


def _timed_call(function, args, kwargs, budget):
    if budget is None or _calls[0]:
        return function(*args, **kwargs)
    _calls[0] += 1
    signal.setitimer(signal.ITIMER_REAL, max(float(budget), 0.001))
    try:
        return function(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _calls[0] -= 1


class Program:
    """The program's process, seen from the harness.

    Args:
        job: the program's part of the job.
        forked: ``(pid, write fd, read fd)`` of a program's process a fork
            server started beside the harness (the host sent it the job);
            without one, the harness forks it here, before it reads the tests.
    """

    def __init__(self, job, forked=None):
        if forked is None:
            to_program, from_program = os.pipe(), os.pipe()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self.pid = os.fork()
            if self.pid == 0:
                program_main(to_program[0], from_program[1], job)
            os.close(to_program[0])
            os.close(from_program[1])
            rfd, wfd = from_program[0], to_program[1]
        else:
            self.pid, wfd, rfd = forked
        self.channel = Channel(rfd, wfd, HARNESS_OPERATIONS, _test_function, Exception)
        self.ended = None

    def stop(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass

    def end_status(self):
        """How the process ended, as (status, detail); it is stopped if it still runs.

        The same words whether the harness forked it or a fork server did (then
        its exit status is not the harness's to see): the program's process is
        gone, and the tests it had not answered fail.
        """
        if self.ended is None:
            self.stop()
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.ended = ("runtime_error", "the program's process ended")
        return self.ended


def _test_function(obj):
    # The program may call back only functions the tests defined.
    code = getattr(obj, "__code__", None)
    return code is not None and code.co_filename == "<tests>"


def await_program(run, program):
    """Wait for the loaded program's description; None (every test failed) when it did not come."""
    signal.setitimer(signal.ITIMER_REAL, run.per_test_s + GRACE_S)
    try:
        message = program.channel.recv()
    except UnitTimeout:
        program.stop()
        return run.fail_all("time_limit", f"the program's top level ran past {run.per_test_s} s")
    except (PeerGone, WireError, OSError) as exc:
        status, detail = program.end_status()
        why = "program exited before this test ran" if isinstance(exc, PeerGone) else describe(exc)
        return run.fail_all("not_run", f"{why} ({detail})")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if message[0] == "failed" and len(message) == 3:
        status = message[1] if message[1] in _FAILURES else "runtime_error"
        return run.fail_all(status, str(message[2])[:500])
    if message[0] != "ready" or len(message) != 2 or type(message[1]) is not list:
        program.stop()
        return run.fail_all("runtime_error", "the program's process answered out of turn")
    return message[1]


def tests_namespace(manifest, entry):
    namespace = {"__name__": "solution", "__builtins__": builtins}
    stdlib = getattr(sys, "stdlib_module_names", ())
    for item in manifest:
        if type(item) is not list or len(item) != 3 or type(item[0]) is not str:
            continue
        name, kind, value = item
        if name in builtins.__dict__ and name != entry:
            continue
        if kind == "module":
            if type(value) is str and value.partition(".")[0] in stdlib:
                namespace[name] = _LazyModule(value)
        elif kind == "value":
            namespace[name] = value
    return namespace


class _LazyModule:
    """A standard-library module the program imported, imported here only when the tests use it."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        __import__(self._name)
        return getattr(sys.modules[self._name], attribute)
