"""Small helpers shared by the benchmark scripts: timing, memory, tables, the machine.

Import from a script in this folder with `from common import ...` (the scripts
put their own folder on sys.path). Nothing here knows about models, and nothing
here needs more than the standard library (workers in other virtual
environments import it too).
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def block(x: Any) -> Any:
    """Wait for JAX's asynchronous work inside `x` (a no-op for anything else)."""
    try:
        import jax
    except ImportError:
        return x
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of `fn`, its JAX results waited for."""
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 3,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Time several callables in alternation, round by round.

    Alternating spreads slow phases of a shared machine (another job, thermal
    throttling) across every contender instead of penalising whichever ran then.

    Args:
      fns: name -> zero-argument callable.
      repeats: timed rounds.
      warmup: untimed rounds first (compilation, caches).
    Returns:
      name -> the `repeats` wall times in seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    On Linux this is VmHWM of /proc/self/status, the high-water mark of this
    program's own address space. `getrusage`'s ru_maxrss (the fallback) keeps
    the peak across exec, so a worker started from a large parent would report
    at least the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_device_memory_mb(device: Any = None) -> float | None:
    """Peak bytes in use on a JAX device, MiB; None where the backend keeps no statistics (CPU)."""
    import jax

    stats = (device or jax.devices()[0]).memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def machine() -> str:
    """One line naming the machine: JAX backend and devices, CPU cores."""
    try:
        import jax

        dev = jax.devices()[0]
        accel = f"{jax.default_backend()} x{jax.device_count()} ({dev.device_kind})"
    except ImportError:
        accel = "no jax"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {accel}"


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 floatfmt: str | Mapping[str, str] = ",.1f") -> str:
    """A Markdown table of dict rows (columns: the given order, else the first row's keys).

    `floatfmt` is one format for every float, or a per-column mapping (",.1f" where absent).
    """
    columns = list(columns or (rows[0].keys() if rows else []))
    fmt = (lambda c: floatfmt) if isinstance(floatfmt, str) else (lambda c: floatfmt.get(c, ",.1f"))
    cells = [[_cell(r.get(c), fmt(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.rjust(w) for s, w in zip(items, widths, strict=True)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    return "\n".join(out + [line(row) for row in cells])


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                title: str = "", floatfmt: str | Mapping[str, str] = ",.1f") -> None:
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns, floatfmt), flush=True)


# ---------------------------------------------------------------------------
# Worker processes: one library per process, driven over a socket pair


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (what else is running on a shared machine)."""
    return os.getloadavg()


def package_versions(names: Sequence[str], python: str | None = None) -> dict[str, str | None]:
    """Installed versions of `names` (None where missing), in this interpreter or another one."""
    # A virtual environment's python is a symlink to the base interpreter: compare paths, not targets.
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        out: dict[str, str | None] = {}
        for name in names:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
        return out
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    result = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"{python}: cannot read package versions ({result.stderr.strip()[-300:]})")
    return json.loads(result.stdout)


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback or the tail of its log."""


class Worker:
    """A script run in its own process (and interpreter, if asked), answering requests.

    The parent and the child share a socket pair: the child finds its end in
    the file descriptor named by the `BENCH_WORKER_FD` environment variable
    (see `connect_to_parent`). Each request is a tuple `(command, *args)`; the
    child answers `("ok", value)` or `("error", traceback)`. The child's stdout
    and stderr go to `log_path`, so library progress bars and warnings stay
    out of the tables.
    """

    def __init__(self, name: str, argv: Sequence[str], *, python: str | None = None,
                 log_path: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                 ready_timeout_s: float = 900.0):
        self.name = name
        self.log_path = Path(log_path)
        ours, theirs = multiprocessing.Pipe(duplex=True)
        child_env = {**os.environ, **(env or {}), "BENCH_WORKER_FD": str(theirs.fileno())}
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([python or sys.executable, *argv], env=child_env, stdout=log,
                                         stderr=subprocess.STDOUT, pass_fds=(theirs.fileno(),))
        theirs.close()  # the child's end lives on in the child only: its death reads as EOF here
        self.conn = ours
        self.ready = self._answer(ready_timeout_s)
        self.setup_s = time.perf_counter() - t0

    def _answer(self, timeout_s: float | None = None) -> Any:
        if timeout_s is not None and not self.conn.poll(timeout_s):
            self.kill()
            raise WorkerError(f"{self.name}: no answer in {timeout_s:.0f} s{self._log_tail()}")
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionResetError):
            code = self.proc.wait(timeout=30)
            tail = self._log_tail()
            raise WorkerError(f"{self.name}: the process ended (exit code {code}){tail}") from None
        if status != "ok":
            self.kill()
            raise WorkerError(f"{self.name} raised:\n{value}")
        return value

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n{text[-chars:]}"

    def call(self, command: str, *args: Any, timeout_s: float | None = None) -> Any:
        """Send one request and wait for its answer."""
        self.conn.send((command, *args))
        return self._answer(timeout_s)

    def close(self) -> None:
        """Ask the child to stop and wait for it (killing it if it does not stop)."""
        if self.proc.poll() is None:
            try:
                self.conn.send(("stop",))
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.conn.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def connect_to_parent() -> Any:
    """The child's end of a `Worker`'s socket pair."""
    from multiprocessing.connection import Connection

    fd = os.environ.get("BENCH_WORKER_FD")
    if fd is None:
        raise SystemExit("this script is a benchmark worker: run it through benchmarks/common.py Worker")
    return Connection(int(fd))


def serve(handlers: Mapping[str, Callable[..., Any]], ready: Any = None) -> None:
    """The child's loop: answer `ready`, then each request with its handler's result.

    Built-in requests: "stats" (peak and ready resident memory, MiB) and "stop".
    An exception is sent back with its traceback, and the loop ends.
    """
    import traceback

    conn = connect_to_parent()
    rss_ready = peak_host_memory_mb()
    conn.send(("ok", ready))
    while True:
        try:
            command, *args = conn.recv()
        except EOFError:  # the parent went away
            return
        if command == "stop":
            return
        try:
            if command == "stats":
                value = {"peak_rss_mb": peak_host_memory_mb(), "ready_rss_mb": rss_ready}
            else:
                value = handlers[command](*args)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return
        conn.send(("ok", value))
