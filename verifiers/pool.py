"""A pool of worker processes that verifies batches and never blocks the trainer for long.

Each call gets a wall-clock limit. A verifier that hangs past it, or a worker
that crashes (segfault, ``os._exit``, out-of-memory kill), yields a zero-score
:class:`~verifiers.base.Verdict` with a reason, and a fresh worker takes its
place. A verifier that raises gives a zero score with the exception as reason.
Only configuration errors (a verifier that cannot be pickled or imported in a
worker) raise in the caller.

Example:
    >>> with VerifierPool({"math": 1.0, "format": 0.1}, workers=2) as pool:
    ...     future = pool.score_async(completions, examples)   # overlap with device work
    ...     ...
    ...     rewards = [v.score for v in future.result()]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from verifiers.base import Verdict, VerifierSpec, resolve, run_verifier

# Consecutive workers dying before they became ready: past this the pool gives
# up instead of restarting forever (the verifier cannot even be loaded).
_MAX_START_FAILURES = 3
_TERM_GRACE_S = 1.0


class PoolBroken(RuntimeError):
    """The verifier cannot run in a worker at all (e.g. it fails to unpickle)."""


def _settle(future: Future, outcome: Verdict | BaseException) -> None:
    """Resolve ``future`` unless the caller already cancelled it."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _worker_main(conn: Connection, payload: bytes) -> None:
    """Worker process: load the verifier, then answer tasks until told to stop."""
    # SIGTERM becomes SystemExit so that a sandboxed run in progress cleans up
    # (kills its process group, deletes its scratch directory) before exiting.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    # Ctrl-C reaches the whole foreground process group; the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
            verdict = run_verifier(verifier, completion, example)
        except Exception as exc:
            verdict = Verdict.fail(f"verifier raised {type(exc).__name__}: {exc}"[:1000])
        try:
            conn.send(("result", task_id, verdict))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("result", task_id, Verdict.fail(f"verdict cannot be pickled: {exc}")))


@dataclass
class _Task:
    id: int
    completion: str
    example: Mapping[str, Any]
    future: Future = field(default_factory=Future)


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    task: _Task | None = None
    deadline: float = float("inf")
    served: int = 0
    kill_at: float | None = None  # set once terminated for a timeout; SIGKILL after it


class VerifierPool:
    """Worker processes that run one verifier over batches, with a per-call time limit.

    Args:
        verifier: a registered name (``"math"``), a picklable callable (a module-level
            function), or weights such as ``{"math": 1.0, "format": 0.1}``.
        workers: number of processes (default: the CPU count).
        timeout_s: wall-clock limit for one verification, from the moment a worker
            receives it; past it the verdict is a timeout and the worker is replaced.
        max_tasks_per_worker: recycle a worker after this many calls (bounds the growth
            of sympy's caches); None keeps workers for the pool's lifetime.
        context: multiprocessing start method; default ``forkserver`` where available
            (safe beside the threads of a JAX process, and cheap to restart), else ``spawn``.
    """

    def __init__(
        self,
        verifier: VerifierSpec,
        *,
        workers: int | None = None,
        timeout_s: float = 60.0,
        max_tasks_per_worker: int | None = None,
        context: str | None = None,
    ) -> None:
        fn = resolve(verifier)
        try:
            self._payload = pickle.dumps(fn)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(
                f"the verifier must be picklable to run in worker processes ({exc}); "
                "define it at module level, or register it in an importable module"
            ) from exc
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context(context or ("forkserver" if "forkserver" in methods else "spawn"))
        self.size = workers or os.cpu_count() or 1
        self.timeout_s = float(timeout_s)
        self._max_tasks = max_tasks_per_worker
        self._queue: deque[_Task] = deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._workers: list[_Worker] = []
        self._next_id = 0
        self._closing = False
        self._abandon = False
        self._broken: str | None = None
        self._start_failures = 0
        self._thread = threading.Thread(target=self._loop, name="verifier-pool", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API

    def submit(self, completion: str, example: Mapping[str, Any]) -> Future:
        """Queue one verification; the future resolves to its :class:`Verdict`."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the pool is closed")
            if self._broken:
                raise PoolBroken(self._broken)
            task = _Task(self._next_id, completion, example)
            self._next_id += 1
            self._queue.append(task)
        self._wake()
        return task.future

    def score_async(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> Future:
        """Queue a batch; the future resolves to the verdicts in input order."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        futures = [self.submit(c, e) for c, e in zip(completions, examples, strict=True)]
        batch: Future = Future()
        remaining = [len(futures)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                finished = remaining[0] == 0
            if finished:
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    batch.set_exception(errors[0])
                else:
                    batch.set_result([f.result() for f in futures])

        if not futures:
            batch.set_result([])
        for future in futures:
            future.add_done_callback(one_done)
        return batch

    def score(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        """Verify a batch and wait for it: one :class:`Verdict` per completion, in order."""
        return self.score_async(completions, examples).result()

    def close(self, *, wait: bool = True) -> None:
        """Stop the workers; with ``wait`` pending calls finish first, else they fail now."""
        with self._lock:
            self._closing = True
            self._abandon = self._abandon or not wait
        self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(wait=exc_type is None)

    # --------------------------------------------------------------- event loop

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        try:
            while not self._finished():
                self._fill()
                self._dispatch()
                self._poll()
                self._enforce_deadlines()
        except BaseException as exc:  # the loop must never die silently
            self._break(f"pool loop failed: {exc!r}")
        finally:
            self._shutdown()

    def _finished(self) -> bool:
        with self._lock:
            if self._abandon or self._broken:
                return True
            busy = any(w.task for w in self._workers)
            return self._closing and not self._queue and not busy

    def _fill(self) -> None:
        alive = [w for w in self._workers if w.kill_at is None]
        for _ in range(self.size - len(alive)):
            parent, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(
                target=_worker_main, args=(child, self._payload), name="verifier-worker", daemon=True
            )
            process.start()
            child.close()
            self._workers.append(_Worker(process, parent))

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not worker.ready or worker.task or worker.kill_at is not None:
                continue
            with self._lock:
                if not self._queue:
                    return
                task = self._queue.popleft()
            if task.future.cancelled():
                continue
            try:
                worker.conn.send((task.id, task.completion, task.example))
            except (OSError, ValueError):
                # The worker died between polls; its sentinel will reap it.
                worker.ready = False
                with self._lock:
                    self._queue.appendleft(task)
                continue
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                _settle(task.future, Verdict.fail(f"example cannot be pickled: {exc}"))
                continue
            worker.task = task
            worker.deadline = time.monotonic() + self.timeout_s

    def _poll(self) -> None:
        deadlines = [w.deadline for w in self._workers if w.task]
        deadlines += [w.kill_at for w in self._workers if w.kill_at is not None]
        timeout = max(0.0, min(deadlines, default=time.monotonic() + 1.0) - time.monotonic())
        handles = {self._wake_r: None}
        for worker in self._workers:
            handles[worker.conn] = worker
            handles[worker.process.sentinel] = worker
        ready = wait(list(handles), timeout=min(timeout, 1.0))
        for handle in ready:
            if handle == self._wake_r:
                os.read(self._wake_r, 4096)
            elif isinstance(handle, Connection):
                self._receive(handles[handle])
        for handle in ready:
            if isinstance(handle, int) and handle != self._wake_r:
                self._reap(handles[handle])

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                self._handle(worker, message)
        except (EOFError, OSError):
            pass  # the sentinel reports the death

    def _handle(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self._start_failures = 0
        elif kind == "fatal":
            self._break(message[1])
        elif kind == "result" and worker.task and worker.task.id == message[1]:
            _settle(worker.task.future, message[2])
            worker.task, worker.deadline = None, float("inf")
            worker.served += 1
            if self._max_tasks and worker.served >= self._max_tasks:
                self._retire(worker)

    def _reap(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._receive(worker)  # a result may have been sent just before exiting
        worker.process.join(timeout=0)
        if worker.task:
            code = worker.process.exitcode
            _settle(
                worker.task.future,
                Verdict.fail(f"verifier process died (exit code {code}); a new worker was started"),
            )
            worker.task = None
        if not worker.ready and worker.kill_at is None:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self._break("verifier workers keep dying before they start")
        self._workers.remove(worker)
        worker.conn.close()

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task and now >= worker.deadline:
                _settle(
                    worker.task.future,
                    Verdict.fail(
                        f"verifier exceeded the pool's {self.timeout_s:g} s wall-clock limit;"
                        " its worker was replaced",
                        timed_out=True,
                    ),
                )
                worker.task = None
                self._retire(worker)
            elif worker.kill_at is not None and now >= worker.kill_at:
                worker.process.kill()
                worker.kill_at = float("inf")

    def _retire(self, worker: _Worker) -> None:
        """Ask a worker to stop (SIGTERM, then SIGKILL after a grace period)."""
        worker.process.terminate()
        worker.kill_at = time.monotonic() + _TERM_GRACE_S

    def _break(self, reason: str) -> None:
        with self._lock:
            self._broken = self._broken or reason

    def _shutdown(self) -> None:
        reason = self._broken or "the pool was closed before this verification ran"
        with self._lock:
            pending, self._queue = list(self._queue), deque()
        pending += [w.task for w in self._workers if w.task]
        for task in pending:
            _settle(task.future, PoolBroken(reason) if self._broken else Verdict.fail(reason))
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + _TERM_GRACE_S
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=_TERM_GRACE_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []
