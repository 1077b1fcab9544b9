"""The CPU benchmark set: ouroboros-jax side by side with TRL and Tunix on one GRPO workload.

One tiny Qwen2-shaped model (random weights, float32) is saved once as a
Hugging Face checkpoint with a word-level tokenizer; every library loads those
files. All run the same prompts, group size, lengths and batch, with GRPO's
PPO-clip 0.2, per-sequence token-mean loss, no KL, AdamW (learning rate 1e-6)
and a gradient clip of 1.0, sampling at temperature 1 without truncation.
Completions always run to their full length (the end token lies outside the
model's vocabulary), so every library does the same work per step.

Sections (each library in its own process, alternating one step at a time):

  step      (a) a full GRPO step: generate + reward + advantages + update
  update    (b) the update alone, on one stored batch
  generate  (c) generation alone: our sampler, transformers `generate`, Tunix's Sampler
  scale     (d) the full step as the completion length (64, 256, 1024) and the
                group size (4, 8, 16) grow

tokens/s counts every row's prompt + completion tokens per step (step,
update) or the new tokens (generate). "ours x" is our tokens/s over the
library's: above 1 means ours is faster. Peak RSS is each worker process's
own peak resident memory, its runtime included; "RSS ready" is the same
after loading, before the first step. "first step s" includes JIT
compilation for the JAX libraries. TRL's worker runs with
OMP_WAIT_POLICY=PASSIVE (unless set): torch's default spin-waiting made it
10-20x slower on this shared machine (peers.worker_env).

    python benchmarks/run_cpu.py                 # the full set (tens of minutes on 2 shared cores)
    python benchmarks/run_cpu.py --quick         # sections a-c at a small workload, minutes
    TUNIX_PYTHON=/path/to/venv/bin/python python benchmarks/run_cpu.py --quick

The last line is
    benchmark grpo_step: ours=<tok/s> trl=<tok/s> tunix=<tok/s> ratio_trl=<x> ratio_tunix=<y>
from section (a), with nan for a peer that did not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, machine, package_versions, print_table  # noqa: E402
from peers import (  # noqa: E402
    COLUMNS,
    FLOATFMT,
    PACKAGES,
    add_library_args,
    by_name,
    find_libraries,
    measure,
    worker_env,
)
from workload import ModelShape, Settings, Workload, make_checkpoint, make_update_batch  # noqa: E402

SECTIONS = ("step", "update", "generate", "scale")
TITLES = {"step": "(a) full GRPO step: generate + reward + update",
          "update": "(b) update alone (one stored batch)",
          "generate": "(c) generation alone"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sections step, update, generate at 2 prompts x 4 completions of 32 tokens")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated, from {', '.join(SECTIONS)} (default: all; --quick: all but scale)")
    add_library_args(p)
    p.add_argument("--repeats", type=int, default=None, help="timed steps per library (default 5; --quick 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per library after the first (default 1; --quick 0)")
    g = p.add_argument_group("workload (sections a-c)")
    g.add_argument("--prompts", type=int, default=None, help="prompts per step (default 4; --quick 2)")
    g.add_argument("--group", type=int, default=4, help="completions per prompt")
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--completion-len", type=int, default=None, help="default 256; --quick 32")
    g.add_argument("--scale-completion-lens", default="64,256,1024",
                   help="section d: completion lengths, at --group")
    g.add_argument("--scale-groups", default="4,8,16", help="section d: group sizes, at --completion-len")
    g.add_argument("--scale-repeats", type=int, default=2,
                   help="section d: timed steps per library and point, after the first (no extra warmup)")
    m = p.add_argument_group("model")
    for name, default in dataclasses.asdict(ModelShape()).items():
        m.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="",
                   help="keep the checkpoint and worker logs here (default: a temporary directory)")
    a = p.parse_args(argv)
    quick = a.quick
    a.sections = [s.strip() for s in (a.sections or ",".join(SECTIONS[:3] if quick else SECTIONS)).split(",")]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
    a.repeats = a.repeats if a.repeats is not None else (3 if quick else 5)
    a.warmup = a.warmup if a.warmup is not None else (0 if quick else 1)
    a.prompts = a.prompts or (2 if quick else 4)
    a.completion_len = a.completion_len or (32 if quick else 256)
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    a.scale_completion_lens = [int(x) for x in a.scale_completion_lens.split(",")]
    a.scale_groups = [int(x) for x in a.scale_groups.split(",")]
    try:
        a.shape = ModelShape(**{k: getattr(a, k) for k in dataclasses.asdict(ModelShape())})
        a.work = Workload(a.prompts, a.group, a.prompt_len, a.completion_len)
    except ValueError as e:
        p.error(str(e))
    return a


def final_line(rows: list[dict]) -> str:
    """The summary line of section (a): tokens/s per library and ours / peer ratios."""
    ours, trl, tunix = (by_name(rows, n, "tokens/s") for n in ("ours", "trl", "tunix"))
    return (f"benchmark grpo_step: ours={ours:.1f} trl={trl:.1f} tunix={tunix:.1f} "
            f"ratio_trl={ours / trl:.2f} ratio_tunix={ours / tunix:.2f}")


def commit() -> str:
    """HEAD, and whether the measured code (library, verifiers, benchmarks) differs from it."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "ouroboros_jax", "verifiers", "benchmarks"], capture_output=True, text=True,
                               cwd=here.parent, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes to the measured code)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_header(a: argparse.Namespace, libraries: dict[str, str], notes: list[str]) -> None:
    print(f"date: {datetime.datetime.now().isoformat(timespec='minutes')}; commit {commit()}")
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in load_average())}")
    for name, python in libraries.items():
        versions = package_versions(PACKAGES[name], None if python == sys.executable else python)
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) +
              ("" if python == sys.executable else f" ({python})"))
    for note in notes:
        print(note)
    if "trl" in libraries:
        print(f"trl worker: OMP_WAIT_POLICY={worker_env('trl')['OMP_WAIT_POLICY']}")
    print(f"model: {a.shape.describe()}")
    print(f"workload: {a.work.describe()}; {a.repeats} timed steps per library after {a.warmup} untimed",
          flush=True)


def run_section(section: str, a, libraries, directory: Path, log_dir: Path) -> list[dict]:
    settings = Settings(directory=str(directory), mode=section, work=a.work, seed=a.seed)
    if section == "update":
        make_update_batch(directory, a.work, seed=a.seed)
    rows = measure(libraries, settings, repeats=a.repeats, warmup=a.warmup, log_dir=log_dir)
    print_table(rows, COLUMNS, floatfmt=FLOATFMT,
                title=f"{TITLES[section]}; {a.work.describe()}; load {rows[0]['load']:.1f}")
    return rows


SCALE_COLUMNS = ["completion", "group", "library", "step s", "x first", "tokens/s", "ours x", "peak RSS MiB",
                 "first step s", "load"]


def run_scale(a, libraries, directory: Path, log_dir: Path, base_rows: list[dict] | None) -> list[dict]:
    """Section (d): two sweeps of the full step; "x first" is the step time over the sweep's first point's."""
    replace = dataclasses.replace
    sweeps = {"completion length": [replace(a.work, completion_len=c) for c in a.scale_completion_lens],
              "group size": [replace(a.work, group=g) for g in a.scale_groups]}
    measured: dict[Workload, list[dict]] = {}
    if base_rows is not None:
        measured[a.work] = base_rows  # section (a) measured this point
    for work in dict.fromkeys(w for points in sweeps.values() for w in points):  # each shape once
        if work not in measured:
            settings = Settings(directory=str(directory), mode="step", work=work, seed=a.seed)
            measured[work] = measure(libraries, settings, repeats=a.scale_repeats, warmup=0, log_dir=log_dir)
            print_table(measured[work], COLUMNS, floatfmt=FLOATFMT,
                        title=f"(d) point: {work.describe()}; load {measured[work][0]['load']:.1f}")
    table = []
    for sweep, points in sweeps.items():
        rows = []
        for work in points:
            for r in measured[work]:
                first = by_name(measured[points[0]], r["_name"], "step s")
                rows.append({"completion": work.completion_len, "group": work.group, "sweep": sweep,
                             "x first": r["step s"] / first} | r)
        print_table(rows, SCALE_COLUMNS, floatfmt=FLOATFMT | {"x first": ".2f"},
                    title=f"(d) full GRPO step as the {sweep} grows ({a.work.prompts} prompts, "
                          f"prompt {a.work.prompt_len} tokens)")
        table += rows
    return table


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    a = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    libraries, notes = find_libraries(a.libraries, a.tunix_python)
    print_header(a, libraries, notes)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.work_dir or tmp)
        directory, log_dir = root / "model", root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        longest = max([a.work.seq_len] + [a.prompt_len + c for c in a.scale_completion_lens])
        start = time.perf_counter()
        make_checkpoint(directory, a.shape, max_seq_len=longest, seed=a.seed)
        print(f"checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)
        for section in a.sections:
            if section == "scale":
                results[section] = run_scale(a, libraries, directory, log_dir, results.get("step"))
            else:
                results[section] = run_section(section, a, libraries, directory, log_dir)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in load_average())}")
    if "step" in results:
        print(final_line(results["step"]), flush=True)
    return results


if __name__ == "__main__":
    main()
