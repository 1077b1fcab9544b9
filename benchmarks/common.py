"""Small helpers shared by the benchmark scripts: timing, memory, tables, the machine.

Import from a script in this folder with `from common import ...` (the scripts
put their own folder on sys.path). Nothing here knows about models.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
