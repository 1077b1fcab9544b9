"""A hard time limit around pure-Python work (sympy) that may not return.

In the main thread an interval timer (SIGALRM) interrupts the work, which is
cheap and reaches into any Python loop. Signals cannot target other threads, so
elsewhere a profile hook checks the clock on every Python function call and C
call; sympy calls functions constantly, so the limit still holds, at the cost of
making the guarded work a few times slower.
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
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TimeLimitExceeded` inside the block once ``seconds`` have passed.

    ``None`` or a non-positive value means no limit. Nested limits fall back to
    the profile hook for the inner one.
    """
    if seconds is None or seconds <= 0:
        yield
        return
    if _alarm_usable():
        with _alarm(seconds):
            yield
    else:
        with _profile_deadline(seconds):
            yield


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise TimeLimitExceeded(f"exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _profile_deadline(seconds: float) -> Iterator[None]:
    deadline = time.monotonic() + seconds
    previous = sys.getprofile()

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            sys.setprofile(previous)
            raise TimeLimitExceeded(f"exceeded {seconds:g} s")

    sys.setprofile(check)
    try:
        yield
    finally:
        sys.setprofile(previous)
