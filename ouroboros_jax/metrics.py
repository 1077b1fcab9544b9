"""Metric writers (console progress line, JSONL, TensorBoard), phase timers and plots.

A `MetricsLogger` takes one dict of scalars per step (JAX arrays or Python
numbers), moves them to the host in one transfer and hands them to its
writers. Keys are free-form ("/" groups them in TensorBoard); the console line
shows the first key present of each of CONSOLE_FIELDS:

    reward     reward, reward/mean          kl       kl, train/kl_ref, kl_ref
    acc        accuracy, train/accuracy     ent      entropy, train/entropy
    len        length, length/mean          tok/s    tokens_per_s, throughput/tokens_per_s
    eval acc   eval/accuracy, eval/pass@1, eval/greedy_acc
    s/step     time/step                    (time/sample, time/verify, time/update: PhaseTimer)

and `plot_run` draws the curves (`ouroboros_jax.plots`: one panel per question, legend
names in words; docs/metrics.md says what every key means).

On disk, in the run directory: `metrics.jsonl` (one JSON object per logged
step: "step", "wall_time" and the metrics; NaN and inf are written as null)
and TensorBoard event files. The run directory may be a URL (gs://bucket/run):
it is kept as a string (see `paths`), never a `pathlib.Path`, which would turn it
into the local "gs:/bucket/run". `python -m ouroboros_jax.metrics plot RUN_DIR`
turns metrics.jsonl into PNG curves next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TextIO

from ouroboros_jax import paths
from ouroboros_jax.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
# Console fields: (label, candidate keys (the first present is shown), format).
CONSOLE_FIELDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("reward", ("reward", "reward/mean"), ".3f"),
    ("acc", ("accuracy", "train/accuracy"), ".3f"),
    ("kl", ("kl", "train/kl_ref", "kl_ref"), ".3g"),
    ("ent", ("entropy", "train/entropy"), ".3f"),
    ("len", ("length", "length/mean"), ".1f"),
    ("tok/s", ("tokens_per_s", "throughput/tokens_per_s"), ",.0f"),
    ("eval acc", ("eval/accuracy", "eval/pass@1", "eval/greedy_acc"), ".3f"),
    ("s/step", ("time/step",), ".2f"),
)


class Writer(Protocol):
    """Receives one step's metrics as Python floats."""

    def write(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Python floats for a dict of scalar metrics, with a single device-to-host transfer.

    Args:
        metrics: name -> JAX array, NumPy value or Python number; each of size 1.

    Returns:
        name -> float, in the input's order.

    Raises:
        ValueError: a value holds more than one element (the message names it).
    """
    import jax  # here, so that reading and plotting metrics need no JAX
    import numpy as np

    host = jax.device_get(dict(metrics))  # one transfer for every metric of the step
    out = {}
    for name, value in host.items():
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
        out[name] = float(array.reshape(()))
    return out


# ---------------------------------------------------------------------------
# Writers


def format_progress(step: int, scalars: Mapping[str, float], total_steps: int | None = None) -> str:
    """The console line: step, then each of CONSOLE_FIELDS present in `scalars`.

    Args:
        step: the training step.
        scalars: the step's metrics.
        total_steps: shown as "step 12/100" when given.

    Returns:
        e.g. "step 12/100  reward 0.412  acc 0.380  kl 0.00123  len 34.5  tok/s 1,234".
    """
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    for label, candidates, fmt in CONSOLE_FIELDS:
        key = next((k for k in candidates if k in scalars), None)
        if key is not None:
            value = scalars[key]
            parts.append(f"{label} {value:{fmt}}" if math.isfinite(value) else f"{label} {value}")
    return "  ".join(parts)


class ConsoleWriter:
    """A live progress line: rewritten in place on a terminal, one line per step otherwise.

    Steps that carry eval/ metrics get a line of their own that stays on screen.

    Args:
        stream: where to write (default sys.stdout).
        total_steps: the run's length, for "step k/N".
        live: rewrite in place with carriage returns; default: whether `stream` is a TTY.
    """

    def __init__(self, stream: TextIO | None = None, total_steps: int | None = None,
                 live: bool | None = None) -> None:
        self.stream = sys.stdout if stream is None else stream
        self.total_steps = total_steps
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = isatty() if live is None else live
        self._open_line = False  # a live line is on screen without its newline

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        line = format_progress(step, scalars, self.total_steps)
        if not self.live:
            self.stream.write(line + "\n")
        else:
            keep = any(key.startswith("eval/") for key in scalars)
            # \r returns to the line start, \x1b[K clears what a longer old line left.
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if keep else ""))
            self._open_line = not keep
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class JsonlWriter:
    """Appends one JSON object per step to a file, flushed after each line.

    Appending (not truncating) keeps the history of a resumed run in one file;
    `read_metrics` merges records of the same step. Object stores (gs://, s3://)
    cannot append: for a URL the lines are kept and the whole object is rewritten,
    at the first step, then at most every `flush_secs`, and at `close`.

    Args:
        path: the .jsonl file, local or a URL; its directory is created.
        flush_secs: for a URL, the least time between two rewrites of the object.
    """

    def __init__(self, path: str | os.PathLike[str], flush_secs: float = 30.0) -> None:
        self.path = paths.as_path(path)
        self.remote = paths.is_remote(path)
        self.flush_secs = flush_secs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            self._flushed_at = -math.inf
        else:
            self._file = open(self.path, "a")  # held open for the run, closed by close()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        record: dict[str, Any] = {"step": int(step), "wall_time": round(time.time(), 3)}
        # Strict JSON has no NaN/inf; null marks them so that other tools can read the file.
        record.update({k: v if math.isfinite(v) else None for k, v in scalars.items()})
        line = json.dumps(record) + "\n"
        if not self.remote:
            self._file.write(line)
            self._file.flush()
            return
        self._lines.append(line)
        if time.monotonic() - self._flushed_at >= self.flush_secs:
            self._rewrite()

    def _rewrite(self) -> None:
        self.path.write_text("".join(self._lines))
        self._flushed_at = time.monotonic()

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed run logs them again, once)."""
        if self.remote:
            self._lines = [x for x in self._lines if _record_step(x) <= step]
            self._rewrite()
            return
        self._file.flush()
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [x for x in lines if _record_step(x) <= step]
        if len(kept) != len(lines):
            self.path.write_text("".join(kept))  # the append handle writes on at the new end


    def close(self) -> None:
        if self.remote:
            self._rewrite()
        else:
            self._file.close()


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl line (inf for a line cut short, which is dropped)."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return math.inf


class TensorBoardWriter:
    """Scalars into TensorBoard event files (tensorboardX).

    Args:
        logdir: the directory for the event files (the run directory; tensorboardX
            writes gs:// and s3:// URLs itself).
        flush_secs: how often pending events reach the file.
    """

    def __init__(self, logdir: str | os.PathLike[str], flush_secs: int = 10) -> None:
        # Imported here: tensorboardX imports torch when it is installed, seconds of start-up.
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=paths.check(logdir), flush_secs=flush_secs)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Fans each step's metrics out to the enabled writers.

    Args:
        run_dir: where metrics.jsonl and the event files go (a local path or a URL string).
        console, jsonl, tensorboard: which built-in writers to enable.
        total_steps: shown on the console line.
        stream: the console's stream (default sys.stdout).
        writers: further writers, called after the built-in ones.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, console: bool = True, jsonl: bool = True,
                 tensorboard: bool = True, total_steps: int | None = None,
                 stream: TextIO | None = None, writers: Sequence[Writer] = ()) -> None:
        self.run_dir = paths.check(run_dir)
        self.writers: list[Writer] = []
        if console:
            self.writers.append(ConsoleWriter(stream, total_steps))
        if jsonl:
            self.writers.append(JsonlWriter(paths.join(self.run_dir, METRICS_FILE)))
        if tensorboard:
            self.writers.append(TensorBoardWriter(self.run_dir))
        self.writers.extend(writers)

    @classmethod
    def from_config(cls, cfg: LoggingConfig, total_steps: int | None = None,
                    stream: TextIO | None = None) -> MetricsLogger:
        """The logger a LoggingConfig describes (run_dir and writers).

        `cfg.log_every` is the caller's cadence: the logger writes every step it is given.
        With several processes (hosts) only process 0 writes; the others' loggers are silent.
        """
        import jax  # here, so that reading and plotting metrics need no JAX

        first = jax.process_index() == 0
        return cls(cfg.run_dir, console=cfg.console and first, jsonl=cfg.jsonl and first,
                   tensorboard=cfg.tensorboard and first, total_steps=total_steps, stream=stream)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Write one step's metrics (device values are fetched together, once).

        Args:
            step: the training step.
            metrics: name -> scalar (JAX array or number).

        Returns:
            The metrics as Python floats.
        """
        scalars = to_scalars(metrics)
        for writer in self.writers:
            writer.write(int(step), scalars)
        return scalars

    def truncate_after(self, step: int) -> None:
        """Forget the steps after `step` in the writers that keep a history (metrics.jsonl):
        a run resumed from checkpoint `step` logs the later steps again (-1: drop all)."""
        for writer in self.writers:
            if hasattr(writer, "truncate_after"):
                writer.truncate_after(step)

    def close(self) -> None:
        """Flush and close every writer."""
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Timing


class PhaseTimer:
    """Wall time per phase of a step: `with timer.phase("sample"): ...`, then `lap()`.

    JAX dispatches asynchronously: end each phase with a `jax.block_until_ready` on
    its result, or its device time is billed to whichever phase waits next.

    Args:
        clock: seconds as a float (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._lap_start = clock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block and add it to `name` (repeated phases accumulate)."""
        start = self._clock()
        try:
            yield
        finally:
            self._totals[name] = self._totals.get(name, 0.0) + self._clock() - start

    def reset(self) -> None:
        """Forget the phases so far and start a new lap now."""
        self._totals, self._lap_start = {}, self._clock()

    def lap(self) -> dict[str, float]:
        """{"time/<phase>": seconds, ..., "time/step": seconds since the last lap}; resets.

        Returns:
            The step's timings, ready to merge into its metrics.
        """
        now = self._clock()
        out = {f"time/{name}": total for name, total in self._totals.items()}
        out["time/step"] = now - self._lap_start
        self._totals, self._lap_start = {}, now
        return out


# ---------------------------------------------------------------------------
# Reading and plotting


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, merged per step and sorted by step.

    Records of the same step (a step logged twice, or re-logged after a resume) merge
    key by key, later ones winning; a line cut short by a killed process is skipped.

    Args:
        path: a metrics.jsonl file, or a run directory holding one (local or a URL).

    Returns:
        One dict per step, each with "step" and its metrics (None for NaN/inf).
    """
    path = paths.as_path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    by_step: dict[int, dict[str, Any]] = {}
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Any]:
    """PNG curves of a run's metrics.jsonl (see `ouroboros_jax.plots.plot_run`)."""
    from ouroboros_jax.plots import plot_run as plot

    return plot(run_dir, out_dir)


def panel_keys(keys: Sequence[str], panel: str) -> list[str]:
    """The keys a plot panel draws (see `ouroboros_jax.plots.panel_keys`)."""
    from ouroboros_jax.plots import panel_keys as keys_of

    return keys_of(keys, panel)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ouroboros_jax.metrics plot RUN_DIR [--out DIR]`.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m ouroboros_jax.metrics",
                                     description="Tools for a run directory's metrics.")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help=f"PNG curves from RUN_DIR/{METRICS_FILE}")
    plot.add_argument("run_dir", help="run directory (or its metrics.jsonl)")
    plot.add_argument("--out", default=None, help="output directory (default: next to metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except FileNotFoundError as err:
        print(f"plot: no metrics to read: {err}", file=sys.stderr)
        return 1
    if not written:
        from ouroboros_jax.plots import PANELS

        print(f"plot: no plottable metrics ({', '.join(PANELS)}) in {args.run_dir}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
