"""A pool of worker processes that verifies batches and never blocks the trainer for long.

Each call gets a wall-clock limit, and each batch may get a deadline. A
verifier that hangs past them, or a worker that crashes (segfault,
``os._exit``, out of memory), yields a zero-score :class:`~verifiers.base.Verdict`
with a reason and an ``error`` kind, and a fresh worker takes its place. A
verifier that raises, or returns something that is not a valid verdict (NaN,
inf, a string), gives a zero score with the reason. Workers have a memory
limit, their output is capped and kept off the trainer's stdout, and stopping
a worker kills every process it started. Only configuration errors (a verifier
that cannot be pickled or imported in a worker) raise in the caller.

Example:
    >>> with VerifierPool({"math": 1.0, "format": 0.1}, workers=2) as pool:
    ...     future = pool.score_async(completions, examples)   # overlap with device work
    ...     ...
    ...     rewards = [v.score for v in future.result()]
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from verifiers._pool_worker import kill_group, kill_tree, pickle_verifier, worker_main
from verifiers.base import Verdict, VerifierSpec, checked_verdict, resolve

# Consecutive workers dying before they became ready: past this the pool gives
# up instead of restarting forever (the verifier cannot even be loaded).
_MAX_START_FAILURES = 3
_TERM_GRACE_S = 1.0
_READ_CHUNK = 65536


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


@dataclass
class _Task:
    id: int
    completion: str
    example: Mapping[str, Any]
    future: Future = field(default_factory=Future)
    batch_deadline: float = float("inf")
    batch_timeout_s: float | None = None


@dataclass
class _Worker:
    process: Any
    conn: Connection
    ready: bool = False
    task: _Task | None = None
    deadline: float = float("inf")
    served: int = 0
    kill_at: float | None = None  # set once terminated for a timeout; SIGKILL after it
    output: int | None = None  # read end of the worker's stdout/stderr pipe
    output_bytes: int = 0


class VerifierPool:
    """Worker processes that run one verifier over batches, with a per-call time limit.

    Args:
        verifier: a registered name (``"math"``), ``"pkg.module:function"``, a callable
            (module-level, or a lambda / closure from a notebook or ``__main__``, sent
            with cloudpickle), or weights such as ``{"math": 1.0, "format": 0.1}``.
        workers: number of processes (default: the CPU count).
        timeout_s: wall-clock limit for one verification, from the moment a worker
            receives it; past it the verdict is a timeout and the worker is replaced.
        batch_timeout_s: default deadline for a whole batch (:meth:`score`,
            :meth:`score_async`), from submission; rows unfinished by then score 0
            with ``timed_out`` and their workers are replaced. None: no deadline
            beyond the per-call limit.
        memory_limit_mb: address-space limit of each worker (a soft ``RLIMIT_AS``;
            allocations past it raise MemoryError); None for no limit.
        output_limit_bytes: how much of each worker's stdout/stderr is copied to the
            trainer's stderr (prefixed ``[verifier worker]``); the rest is dropped.
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
        batch_timeout_s: float | None = None,
        memory_limit_mb: int | None = 4096,
        output_limit_bytes: int = 64 * 1024,
        max_tasks_per_worker: int | None = None,
        context: str | None = None,
    ) -> None:
        self._payload = pickle_verifier(resolve(verifier))
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if batch_timeout_s is not None and batch_timeout_s <= 0:
            raise ValueError("batch_timeout_s must be positive (or None)")
        if memory_limit_mb is not None and memory_limit_mb <= 0:
            raise ValueError("memory_limit_mb must be positive (or None)")
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context(context or ("forkserver" if "forkserver" in methods else "spawn"))
        self.size = workers or os.cpu_count() or 1
        self.timeout_s = float(timeout_s)
        self.batch_timeout_s = batch_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.output_limit_bytes = output_limit_bytes
        self._max_tasks = max_tasks_per_worker
        self._queue: deque[_Task] = deque()
        self._batch_deadlines: list[float] = []  # a heap
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
        return self._submit(completion, example, None)

    def _submit(self, completion: str, example: Mapping[str, Any], batch_timeout_s: float | None) -> Future:
        with self._lock:
            if self._closing:
                raise RuntimeError("the pool is closed")
            if self._broken:
                raise PoolBroken(self._broken)
            task = _Task(self._next_id, completion, example)
            if batch_timeout_s is not None:
                task.batch_timeout_s = batch_timeout_s
                task.batch_deadline = time.monotonic() + batch_timeout_s
                heapq.heappush(self._batch_deadlines, task.batch_deadline)
            self._next_id += 1
            self._queue.append(task)
        self._wake()
        return task.future

    def score_async(
        self,
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
    ) -> Future:
        """Queue a batch; the future resolves to the verdicts in input order.

        ``timeout_s`` is this batch's deadline from now (default ``batch_timeout_s``).
        """
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        limit = self.batch_timeout_s if timeout_s is None else timeout_s
        if limit is not None and limit <= 0:
            raise ValueError("a batch deadline must be positive")
        futures = [self._submit(c, e, limit) for c, e in zip(completions, examples, strict=True)]
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

    def score(
        self,
        completions: Sequence[str],
        examples: Sequence[Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
    ) -> list[Verdict]:
        """Verify a batch and wait for it: one :class:`Verdict` per completion, in order.

        ``timeout_s`` is this batch's deadline (default ``batch_timeout_s``).
        """
        return self.score_async(completions, examples, timeout_s=timeout_s).result()

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
            out_r, out_w = os.pipe()
            os.set_blocking(out_r, False)
            output = Connection(out_w, readable=False)  # a Connection, so forkserver passes the fd
            process = self._ctx.Process(
                target=worker_main,
                args=(child, output, self._payload, self.memory_limit_mb),
                name="verifier-worker",
                daemon=True,
            )
            try:
                process.start()
            finally:
                child.close()
                output.close()
            self._workers.append(_Worker(process, parent, output=out_r))

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
                _settle(task.future, Verdict.fail(f"example cannot be pickled: {exc}", error="invalid"))
                continue
            worker.task = task
            worker.deadline = time.monotonic() + self.timeout_s

    def _poll(self) -> None:
        deadlines = [w.deadline for w in self._workers if w.task]
        deadlines += [w.kill_at for w in self._workers if w.kill_at is not None]
        deadlines += self._batch_deadlines[:1]
        timeout = max(0.0, min(deadlines, default=time.monotonic() + 1.0) - time.monotonic())
        handles: dict[Any, tuple[str, _Worker | None]] = {self._wake_r: ("wake", None)}
        for worker in self._workers:
            handles[worker.conn] = ("conn", worker)
            handles[worker.process.sentinel] = ("exit", worker)
            if worker.output is not None:
                handles[worker.output] = ("output", worker)
        ready = wait(list(handles), timeout=min(timeout, 1.0))
        for handle in ready:
            kind, worker = handles[handle]
            if kind == "wake":
                os.read(self._wake_r, 4096)
            elif kind == "conn":
                self._receive(worker)
            elif kind == "output":
                self._read_output(worker)
        for handle in ready:
            kind, worker = handles[handle]
            if kind == "exit":
                self._reap(worker)

    def _read_output(self, worker: _Worker) -> None:
        """Copy a worker's output to our stderr up to the limit; drop the rest (never block)."""
        while worker.output is not None:
            try:
                data = os.read(worker.output, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                os.close(worker.output)
                worker.output = None
                return
            room = self.output_limit_bytes - worker.output_bytes
            worker.output_bytes += len(data)
            if room > 0:
                text = data[:room].decode(errors="replace")
                if worker.output_bytes > self.output_limit_bytes:
                    text += (
                        f"\n[verifier worker {worker.process.pid}: output past "
                        f"{self.output_limit_bytes} bytes is dropped]\n"
                    )
                sys.stderr.write(text)

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
            # The pool boundary: whatever came back, the trainer gets a valid verdict.
            _settle(worker.task.future, checked_verdict(message[2]))
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
                Verdict.fail(
                    f"verifier process died (exit code {code}); a new worker was started", error="crashed"
                ),
            )
            worker.task = None
        if not worker.ready and worker.kill_at is None:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self._break("verifier workers keep dying before they start")
        self._workers.remove(worker)
        self._release(worker)

    def _release(self, worker: _Worker) -> None:
        """After a worker ended: kill what is left in its process group, drain and close its pipes.

        A worker that exits normally has killed its own descendants; one that
        crashed could not, and its pid may be reused, so only its process group
        (whose id stays reserved while members live) is signalled here.
        """
        kill_group(worker.process.pid)
        self._read_output(worker)
        if worker.output is not None:
            os.close(worker.output)
            worker.output = None
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
                kill_tree(worker.process.pid)
                worker.kill_at = float("inf")
        if self._batch_deadlines and now >= self._batch_deadlines[0]:
            self._expire_batches(now)

    def _expire_batches(self, now: float) -> None:
        """Rows whose batch deadline passed score 0, queued or running (their worker is replaced)."""
        with self._lock:
            while self._batch_deadlines and self._batch_deadlines[0] <= now:
                heapq.heappop(self._batch_deadlines)
            expired = [t for t in self._queue if t.batch_deadline <= now]
            if expired:
                self._queue = deque(t for t in self._queue if t.batch_deadline > now)
        for worker in self._workers:
            if worker.task and worker.task.batch_deadline <= now:
                expired.append(worker.task)
                worker.task = None
                self._retire(worker)
        for task in expired:
            _settle(
                task.future,
                Verdict.fail(
                    f"the batch's {task.batch_timeout_s:g} s deadline passed before this row was verified",
                    timed_out=True,
                ),
            )

    def _retire(self, worker: _Worker) -> None:
        """Ask a worker to stop (SIGTERM, then SIGKILL of it and its descendants after a grace period)."""
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
            _settle(
                task.future, PoolBroken(reason) if self._broken else Verdict.fail(reason, error="unavailable")
            )
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
                kill_tree(worker.process.pid)
                worker.process.join()
            self._release(worker)
        self._workers = []
