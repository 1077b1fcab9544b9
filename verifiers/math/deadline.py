"""A cooperative time limit around Python-level work (sympy) that may not return.

In the main thread an interval timer (SIGALRM) interrupts the work, which is
cheap and reaches into any Python loop. Signals cannot target other threads, so
elsewhere a profile hook checks the clock on every Python function call and C
call. Neither can stop one long C-level call, and code under the limit may
catch the exception: the grading process (:mod:`verifiers.math.limits`) is
what makes the limit hard; this only lets the common slow case end cleanly.
The yielded :class:`Expiry` says whether the limit fired, even if the
exception was swallowed.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator


class TimeLimitExceeded(Exception):
    """The guarded block ran past its time limit."""


class Expiry:
    """Whether a :func:`time_limit` fired (set even if the code under it caught the exception)."""

    fired: bool = False


def _alarm_usable() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    if not hasattr(signal, "setitimer"):
        return False
    # Leave a caller's own timer or SIGALRM handler alone.
    if signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[Expiry]:
    """Raise :class:`TimeLimitExceeded` inside the block once ``seconds`` have passed.

    ``None`` or a non-positive value means no limit. Nested limits fall back to
    the profile hook for the inner one.
    """
    expiry = Expiry()
    if seconds is None or seconds <= 0:
        yield expiry
        return
    if _alarm_usable():
        with _alarm(seconds, expiry):
            yield expiry
    else:
        with _profile_deadline(seconds, expiry):
            yield expiry


@contextlib.contextmanager
def _alarm(seconds: float, expiry: Expiry) -> Iterator[None]:
    def on_alarm(signum, frame):
        expiry.fired = True
        raise TimeLimitExceeded(f"exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _profile_deadline(seconds: float, expiry: Expiry) -> Iterator[None]:
    deadline = time.monotonic() + seconds
    previous = sys.getprofile()

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            sys.setprofile(previous)
            expiry.fired = True
            raise TimeLimitExceeded(f"exceeded {seconds:g} s")

    sys.setprofile(check)
    try:
        yield
    finally:
        sys.setprofile(previous)
