"""The pool's worker process: how the verifier gets there, how it runs, how it is stopped.

A worker runs verifiers one call at a time. It lives in its own process group,
is the subreaper of everything it starts (so a grandchild that double-forks
and detaches is still its descendant), caps its address space, and writes its
output into a pipe the pool reads and caps. When it stops, it kills whatever
its verifiers left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import resource
import signal
import sys
from multiprocessing.connection import Connection
from multiprocessing.util import Finalize
from typing import Any

from verifiers.base import Verdict, checked_verdict

_PR_SET_CHILD_SUBREAPER = 36


def pickle_verifier(fn: Any) -> bytes:
    """The verifier as bytes for the workers.

    cloudpickle stores importable functions by reference, as pickle does, and
    lambdas, closures and functions of ``__main__`` or a notebook (which a
    worker could not import) by value, also inside a combination.
    """
    try:
        import cloudpickle

        dumps = cloudpickle.dumps
    except ImportError:  # a declared dependency; plain pickle still serves module-level functions
        dumps = pickle.dumps
    try:
        return dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"the verifier must be picklable to run in worker processes ({exc}); "
            "define it at module level, or register it in an importable module"
        ) from exc


def worker_main(conn: Connection, output: Connection | None, payload: bytes, memory_mb: int | None) -> None:
    """Worker process: load the verifier, then answer tasks until told to stop."""
    # SIGTERM becomes SystemExit so that a sandboxed run in progress cleans up
    # (kills its process group, deletes its scratch directory) before exiting.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    # Ctrl-C reaches the whole foreground process group; the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _detach(output)
    if memory_mb:
        _cap_address_space(memory_mb)
    # Kill whatever the verifiers left running as the worker exits: after the other exit
    # finalizers (a sandbox closes its servers and scratch directories in those), and also
    # on SIGTERM. A worker is not a fork parent of anything that should outlive it.
    Finalize(None, kill_tree, args=(os.getpid(),), kwargs={"include_root": False}, exitpriority=-100)
    _serve(conn, payload)


def _serve(conn: Connection, payload: bytes) -> None:
    try:
        verifier = pickle.loads(payload)
    except BaseException as exc:
        conn.send(("fatal", f"cannot load the verifier in a worker: {exc!r}"))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, completion, example = message
        try:
            verdict = checked_verdict(verifier(completion, example))
        except Exception as exc:
            verdict = Verdict.fail(f"verifier raised {type(exc).__name__}: {exc}"[:1000], error="crashed")
        try:
            conn.send(("result", task_id, verdict))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("result", task_id, Verdict.fail(f"verdict cannot be pickled: {exc}", error="invalid")))


def _detach(output: Connection | None) -> None:
    """Own process group, subreaper of all descendants, stdout/stderr into the pool's pipe."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if output is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
        output.close()


def _cap_address_space(memory_mb: int) -> None:
    """A soft RLIMIT_AS: allocations past it fail with MemoryError (children may raise it again)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(root: int) -> set[int]:
    """Every live descendant of ``root`` (Linux ``/proc``; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return set()
    children = _children_map()
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def kill_group(pgid: int) -> None:
    """SIGKILL the process group ``pgid`` (a worker's own group), if it still has members."""
    with contextlib.suppress(OSError):
        os.killpg(pgid, signal.SIGKILL)


def kill_tree(root: int, *, include_root: bool = True) -> None:
    """SIGKILL ``root``'s descendants (stopped first, so none forks past the scan), then ``root``.

    Only for a live ``root``: once it has exited its pid may belong to another process.
    """
    stopped: set[int] = set()
    for _ in range(10):
        fresh = descendants(root) - stopped
        if not fresh:
            break
        for pid in fresh:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= fresh
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if include_root:
        kill_group(root)  # the worker's group: also what /proc cannot show
        with contextlib.suppress(OSError):
            os.kill(root, signal.SIGKILL)
