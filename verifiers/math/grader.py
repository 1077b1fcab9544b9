"""Grading itself: extraction and comparison, and the loop of the process that runs them.

The functions here do the work; :mod:`verifiers.math.limits` runs them in a
separate grading process that the caller can kill, so that no input (a
backtracking pattern, a huge power evaluated in C) can hold a caller past its
time limit or take its memory. Inside that process an interval timer still
interrupts Python-level work at the limit, so the common slow case (sympy
simplifying) ends with a clean answer and the process lives on.
"""

from __future__ import annotations

import functools
import importlib
import resource
import signal
from collections.abc import Callable

from verifiers.math.compare import Answer, equivalent, is_single_number, read_answer
from verifiers.math.deadline import TimeLimitExceeded, time_limit
from verifiers.math.extract import extract_answer, gold_answer

# Answers longer than this (or twice the gold) are refused unparsed: no final
# answer is that long, and the parser's cost grows with length.
MAX_ANSWER_CHARS = 2_000

__all__ = ["MAX_ANSWER_CHARS", "compare", "run", "run_limited", "serve"]


@functools.lru_cache(maxsize=4096)
def _read_gold(gold: str) -> Answer:
    # Gold answers repeat across the G completions of a group; parse once.
    return read_answer(gold)


@functools.lru_cache(maxsize=4096)
def _read_pred(pred: str, single_number: bool) -> Answer:
    return read_answer(pred, single_number=single_number)


def compare(gold: str, pred: str) -> bool:
    """Whether the bare answer ``pred`` equals the bare gold answer (no time limit)."""
    if len(pred) > max(MAX_ANSWER_CHARS, 2 * len(gold)):
        return False
    try:
        g = _read_gold(gold)
        p = _read_pred(pred, is_single_number(g))
        return equivalent(g, p)
    except (TimeLimitExceeded, MemoryError):
        raise
    except Exception:
        # sympy raises many types (RecursionError too) on odd input; odd input is simply not equal.
        return False


def run(request: tuple, report: Callable[[tuple], None]) -> tuple:
    """Answer one request; ``report`` receives progress (the extracted answer) before comparing.

    Requests: ``("verify", completion, gold_field, mode)`` -> ``("verify", gold, pred, same)``;
    ``("equivalent", gold, pred)`` -> ``("equivalent", same)``; ``("call", "pkg.module:function",
    args)`` -> ``("call", function(*args))``.
    """
    kind = request[0]
    if kind == "call":
        module, _, name = request[1].partition(":")
        return ("call", getattr(importlib.import_module(module), name)(*request[2]))
    if kind == "equivalent":
        return ("equivalent", compare(request[1], request[2]))
    if kind == "verify":
        _, completion, gold_field, mode = request
        gold = gold_answer(gold_field)
        pred = extract_answer(completion, mode)
        report(("extracted", gold, pred))
        return ("verify", gold, pred, pred is not None and compare(gold, pred))
    raise ValueError(f"unknown grading request {kind!r}")


def run_limited(request: tuple, timeout_s: float | None, report: Callable[[tuple], None]) -> tuple:
    """:func:`run` under a cooperative time limit: ``("timeout",)`` / ``("memory",)`` / ``("error", msg)``.

    A limit that fired is a timeout even when the code under it (math-verify, a
    user's function) caught the exception and answered anyway.
    """
    expiry = None
    try:
        with time_limit(timeout_s) as expiry:
            result = run(request, report)
        return ("timeout",) if expiry.fired else ("ok", result)
    except TimeLimitExceeded:
        return ("timeout",)
    except MemoryError:
        return ("memory",)
    except Exception as exc:
        if expiry is not None and expiry.fired:
            return ("timeout",)
        return ("error", f"{type(exc).__name__}: {exc}"[:500])


def serve(fd: int, memory_mb: int) -> None:
    """Main loop of a grading process: answer requests on the socket ``fd`` until it closes.

    The address space is capped at its size now plus ``memory_mb``. A CPU-time
    timer of twice the request's limit (plus a second) is armed with its
    default action, which ends the process from the kernel: even if the parent
    died and a C-level call never returns, the process does not outlive it.
    """
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    _cap_memory(memory_mb)
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        timeout_s, request = message
        if timeout_s is not None:
            signal.setitimer(signal.ITIMER_PROF, 2 * timeout_s + 1.0)
        outcome = run_limited(request, timeout_s, conn.send)
        signal.setitimer(signal.ITIMER_PROF, 0)
        conn.send(outcome)
        if outcome[0] == "memory":
            return  # after a MemoryError the heap may be fragmented; a fresh process takes over


def _cap_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    try:
        with open("/proc/self/status") as status:
            size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        size_kb = 0
    limit = size_kb * 1024 + memory_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

