"""Running the shared GRPO workload in several libraries side by side.

Each library runs in its own worker process (worker_ours.py, worker_trl.py,
worker_tunix.py), so that each one's peak resident memory is its own and no
library's threads or allocator state touch another's. The parent starts the
workers one after another, times one call of each (the first step: it holds
JIT compilation for the JAX libraries), then alternates them round by round,
ours, trl, tunix, ours, trl, tunix, ..., so that a busy phase of a shared
machine hits all of them.

Tunix may live in another virtual environment (it pins its own versions of
transformers and safetensors): its worker runs under the interpreter given by
`--tunix-python` or the `TUNIX_PYTHON` environment variable, or under this
one when it imports `tunix`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import Worker, interleaved_times, load_average, median, time_call
from workload import Settings

HERE = Path(__file__).resolve().parent
LIBRARIES = ("ours", "trl", "tunix")
LABELS = {"ours": "ouroboros-jax", "trl": "trl GRPOTrainer", "tunix": "tunix GRPOLearner"}
# What each library's "generate" mode runs.
GENERATE_LABELS = {"ours": "ouroboros-jax generate", "trl": "transformers generate", "tunix": "tunix Sampler"}
PACKAGES = {"ours": ("ouroboros-jax", "jax", "jaxlib", "flax", "optax"),
            "trl": ("torch", "transformers", "trl", "accelerate"),
            "tunix": ("google-tunix", "jax", "jaxlib", "flax", "optax", "transformers")}


def add_library_args(p: argparse.ArgumentParser, default: str = ",".join(LIBRARIES)) -> None:
    p.add_argument("--libraries", default=default,
                   help=f"comma-separated, from {', '.join(LIBRARIES)}; peers not installed are skipped")
    p.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON", ""),
                   help="the interpreter of a virtual environment holding Tunix (default: $TUNIX_PYTHON, "
                        "else this interpreter when it imports tunix)")


def find_libraries(requested: str, tunix_python: str = "") -> tuple[dict[str, str], list[str]]:
    """library -> interpreter for the requested libraries that can run, and notes on those skipped."""
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in LIBRARIES]
    if unknown:
        raise SystemExit(f"--libraries: unknown {unknown}; choose from {list(LIBRARIES)}")
    if "ours" not in names:
        raise SystemExit("--libraries must include ours (the ratios are ours / peer)")
    found: dict[str, str] = {}
    notes: list[str] = []
    for name in names:
        if name == "tunix" and tunix_python:
            if not Path(tunix_python).is_file():
                raise SystemExit(f"--tunix-python: {tunix_python} is not a file")
            found[name] = tunix_python
        elif name == "ours" or importlib.util.find_spec(name) is not None:
            found[name] = sys.executable
        else:
            hint = " (pip install -e '.[bench]')" if name == "trl" else \
                " (install google-tunix in a virtual environment and pass --tunix-python)"
            notes.append(f"{name}: not installed, skipped{hint}")
    return found, notes


def worker_env(name: str) -> dict[str, str]:
    """The environment of library `name`'s worker.

    JAX workers see one CPU device, whatever the caller's XLA_FLAGS (the tests
    set 8), unless the caller's JAX_PLATFORMS names another platform (on a GPU
    machine: JAX_PLATFORMS=cuda runs every JAX worker on the first GPU).
    torch's OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE,
    unless the caller set it): with the default spin-waiting, each parallel
    region on a shared 2-core machine waits for a descheduled sibling thread,
    and transformers `generate` ran 10-20x slower at load average 6-7 than
    with passive waiting (45-63 s against 1.4-4 s for the same 16 x 64 tokens).
    Passive waiting changes nothing TRL computes; it only stops the CPU
    contention from dominating its figures.
    """
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu"}
    if name == "trl":
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    return env


def start_workers(libraries: Mapping[str, str], settings: Settings, log_dir: Path) -> dict[str, Worker]:
    workers: dict[str, Worker] = {}
    try:
        for name, python in libraries.items():
            script = str(HERE / f"worker_{name}.py")
            workers[name] = Worker(f"{name} ({settings.mode})", [script, settings.to_json()], python=python,
                                   log_path=log_dir / f"{name}-{settings.mode}.log", env=worker_env(name))
    except BaseException:
        for w in workers.values():
            w.kill()
        raise
    return workers


def measure(libraries: Mapping[str, str], settings: Settings, *, repeats: int, warmup: int,
            log_dir: Path) -> list[dict]:
    """One row per library: median step time, tokens/s, peak memory, setup and first-step times.

    tokens/s counts every row's prompt and completion per step (`step`, `update`)
    or the new tokens only (`generate`).
    """
    w = settings.work
    tokens = w.rows * w.completion_len if settings.mode == "generate" else w.tokens
    load_before = load_average()[0]
    workers = start_workers(libraries, settings, log_dir)
    try:
        first: dict[str, float] = {}
        infos: dict[str, object] = {}

        def step_of(worker: Worker):
            def call():
                infos[worker.name] = worker.call("step")
                return infos[worker.name]
            return call

        fns = {name: step_of(wk) for name, wk in workers.items()}
        for name, fn in fns.items():  # the first step: compilation for the JAX libraries
            first[name] = time_call(fn)
            print(f"  {name}: first step {first[name]:.1f} s", flush=True)
        first_info = dict(infos)
        times = interleaved_times(fns, repeats=repeats, warmup=warmup)
        rows = []
        for name, wk in workers.items():
            mem = wk.call("stats")
            step_s = median(times[name])
            labels = GENERATE_LABELS if settings.mode == "generate" else LABELS
            rows.append({"library": labels[name], "step s": step_s, "tokens/s": tokens / step_s,
                         "peak RSS MiB": mem["peak_rss_mb"], "RSS ready MiB": mem["ready_rss_mb"],
                         "setup s": wk.setup_s, "first step s": first[name],
                         "_name": name, "_first": first_info.get(wk.name), "_last": infos.get(wk.name),
                         "_times": times[name]})
    finally:
        for wk in workers.values():
            wk.close()
    ours = rows[0]["tokens/s"]
    for r in rows:
        r["ours x"] = ours / r["tokens/s"]
    for r in rows:
        r["load"] = (load_before + load_average()[0]) / 2
    return rows


def by_name(rows: Sequence[Mapping], name: str, key: str) -> float:
    """`key` of library `name`'s row, NaN when that library did not run."""
    for r in rows:
        if r["_name"] == name:
            return float(r[key])
    return math.nan


COLUMNS = ["library", "step s", "tokens/s", "ours x", "peak RSS MiB", "RSS ready MiB", "setup s",
           "first step s"]
FLOATFMT = {"step s": ",.3f", "tokens/s": ",.1f", "ours x": ".2f", "peak RSS MiB": ",.0f",
            "RSS ready MiB": ",.0f", "setup s": ".1f", "first step s": ".1f", "load": ".1f"}
