"""Hard limits for math grading: it runs in a separate process that is killed at the limit.

A thread cannot interrupt one long C-level call (a backtracking pattern, a
huge integer power), and a signal timer only works in the main thread, so a
limit kept inside the caller's process holds only for well-behaved input. Here
each request goes to a grading process (a plain interpreter with sympy loaded,
started once per concurrent caller and reused); the caller waits on a socket
for at most the limit plus a small grace, then kills the process and reports a
timeout. The grading process caps its own address space, so an answer that
would need gigabytes fails there, not in the trainer.

The first request in a process waits for its grading process to start (about
a second: an interpreter importing sympy); that start is not counted in the
limit. A killed process is replaced in the background.
"""

from __future__ import annotations

import atexit
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

# Extra address space a grading process may use beyond its size after start-up.
MEMORY_MB = 1024
# Most idle grading processes kept per calling process (one serves one caller at a time).
MAX_IDLE = max(2, os.cpu_count() or 2)
START_TIMEOUT_S = 120.0
_ROOT = str(Path(__file__).resolve().parents[2])


class GradingUnavailable(RuntimeError):
    """The grading process could not be started or died without answering."""


@dataclass
class Outcome:
    """How a request ended: ``status`` is ``"ok"``, ``"timeout"``, ``"memory"`` or ``"error"``.

    ``result`` holds the answer when ok; ``progress`` the last progress report
    (the extracted answer), which survives a timeout.
    """

    status: str
    result: tuple | None = None
    progress: tuple | None = None
    message: str = ""


class _Process:
    """One grading process and the socket to it."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        code = (
            f"import sys; sys.path.insert(0, {_ROOT!r}); "
            "from verifiers.math.grader import serve; "
            f"serve({child.fileno()}, {MEMORY_MB})"
        )
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        # One poll object per process: Connection.poll() builds a selector on every call,
        # which costs as much as the round trip itself.
        self._poller = select.poll()
        self._poller.register(self.conn.fileno(), select.POLLIN)
        self.ready = False

    def poll(self, timeout_s: float | None) -> bool:
        """Whether a message (or EOF) is ready within ``timeout_s`` (None: wait for it)."""
        ms = None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))
        return bool(self._poller.poll(ms))

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.poll(START_TIMEOUT_S):
            self.kill()
            raise GradingUnavailable(f"the grading process did not start within {START_TIMEOUT_S:g} s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            code = self.popen.poll()
            raise GradingUnavailable(f"the grading process died while starting (exit {code})") from exc
        if message != ("ready",):
            self.kill()
            raise GradingUnavailable(f"unexpected start message {message!r}")
        self.ready = True

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        try:
            self.popen.kill()
        except OSError:
            pass
        self.popen.wait()
        self.conn.close()


_idle: list[_Process] = []
_lock = threading.Lock()


def _take() -> _Process:
    with _lock:
        while _idle:
            process = _idle.pop()
            if process.alive():
                return process
            process.kill()
    return _Process()


def _give_back(process: _Process) -> None:
    with _lock:
        if len(_idle) < MAX_IDLE and process.alive():
            _idle.append(process)
            return
    process.kill()


def _replace_in_background() -> None:
    """Start a grading process for the next request, off the caller's clock."""

    def start() -> None:
        try:
            process = _Process()
            process.wait_ready()
        except (OSError, GradingUnavailable):
            return
        _give_back(process)

    threading.Thread(target=start, name="math-grader-start", daemon=True).start()


def run(request: tuple, timeout_s: float | None) -> Outcome:
    """Run one grading request (see :func:`verifiers.math.grader.run`) in a grading process.

    Waits at most ``timeout_s`` plus a grace of a quarter of it (at most half a
    second) once the process has the request, then kills it. ``None`` (or a
    non-positive value) waits as long as it takes.
    """
    if timeout_s is not None and timeout_s <= 0:
        timeout_s = None
    try:
        process = _take()
    except OSError as exc:
        raise GradingUnavailable(f"cannot start a grading process: {exc}") from exc
    process.wait_ready()
    try:
        process.conn.send((timeout_s, request))
    except (OSError, ValueError) as exc:
        process.kill()
        raise GradingUnavailable(f"the grading process is gone: {exc}") from exc
    grace = min(0.5, 0.25 * timeout_s) if timeout_s is not None else 0.0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s + grace
    progress = None
    while True:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not process.poll(remaining):
            process.kill()
            _replace_in_background()
            return Outcome("timeout", progress=progress, message=f"killed after {timeout_s:g} s")
        try:
            message = process.conn.recv()
        except (EOFError, OSError):
            code = process.popen.wait()
            process.conn.close()
            if code in (-9, -27):  # SIGKILL (memory) or SIGPROF (CPU backstop)
                return Outcome("memory" if code == -9 else "timeout", progress=progress)
            return Outcome("error", progress=progress, message=f"the grading process died (exit {code})")
        if message[0] == "extracted":
            progress = message
            continue
        status = message[0]
        if status == "memory":
            process.kill()  # it exits after a MemoryError; never reuse it
        else:
            _give_back(process)
        if status == "ok":
            return Outcome("ok", result=message[1], progress=progress)
        return Outcome(status, progress=progress, message=message[1] if len(message) > 1 else "")


def call(target: str, *args, timeout_s: float | None):
    """``pkg.module:function(*args)`` in a grading process, under the same hard limits.

    For verifiers of one's own that do heavy symbolic work: the function must be
    importable by a fresh interpreter and its arguments and result picklable.

    Raises:
        TimeoutError: it ran past ``timeout_s`` (and its process was killed).
        MemoryError: it ran out of the grading process's address space.
        RuntimeError: it raised (the message names the exception).
    """
    outcome = run(("call", target, args), timeout_s)
    if outcome.status == "ok":
        return outcome.result[1]
    if outcome.status == "timeout":
        raise TimeoutError(f"{target} exceeded {timeout_s:g} s")
    if outcome.status == "memory":
        raise MemoryError(f"{target} exceeded the {MEMORY_MB} MB limit")
    raise RuntimeError(f"{target} failed: {outcome.message}")


def shutdown() -> None:
    """Stop every idle grading process (also run at interpreter exit)."""
    with _lock:
        processes, _idle[:] = list(_idle), []
    for process in processes:
        process.kill()


def _forget_after_fork() -> None:
    # A forked child must not share its parent's grading processes (or their sockets).
    global _lock
    _lock = threading.Lock()
    for process in _idle:
        try:
            process.conn.close()
        except OSError:
            pass
    _idle.clear()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)
