"""Verifier throughput: sandboxed runs per second, and math grading beside math-verify.

Sandbox: trivial programs (``pass``) started ``--runs`` times from ``--threads``
threads, once per isolation layer added on top of the previous ones, so the
difference between rows is that layer's cost. Math: the same gold/prediction
pairs graded by ``verifiers.math.is_equivalent`` and by ``math_verify`` (when
installed), in one process.

    python benchmarks/bench_verifiers.py
    python benchmarks/bench_verifiers.py --runs 400 --threads 4 --pairs 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verifiers import _isolation as iso  # noqa: E402
from verifiers import sandbox as sb  # noqa: E402
from verifiers.code import run_tests  # noqa: E402


def _rates(rows: list[tuple[str, Callable[[], object]]], runs: int, threads: int) -> list[float]:
    """Runs/s per row, measured in interleaved rounds so that load from other
    processes on a shared machine falls on every row alike."""
    rounds = 10
    batch = max(runs // rounds, threads)
    elapsed = [0.0] * len(rows)
    for _, fn in rows:
        fn()  # warm caches (bubblewrap probe, page cache)
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            for i, (_, fn) in enumerate(rows):
                start = time.perf_counter()
                for _ in pool.map(_call, [fn] * batch):
                    pass
                elapsed[i] += time.perf_counter() - start
    return [rounds * batch / t for t in elapsed]


def _call(fn: Callable[[], object]) -> object:
    return fn()


def _plain(argv: list[str]) -> Callable[[], object]:
    def run() -> object:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)

    return run


def _bwrap_without_net(box: sb.Sandbox) -> Callable[[], object]:
    def run() -> object:
        with tempfile.TemporaryDirectory(prefix="ouroboros-bench-") as scratch:
            args = iso.bwrap_args(
                box._bwrap[0],
                interpreter=box.interpreter,
                scratch=scratch,
                as_root=iso.is_root(),
                disable_userns=True,
            )
            args.remove("--unshare-net")
            exe = box.interpreter.executable
            return _plain(args + [exe, "-I", "-S", "-B", "-c", "pass"])()

    return run


def sandbox_rows(runs: int, threads: int) -> list[tuple[str, float]]:
    """(layer description, runs/s) from a bare interpreter up to the full sandbox."""
    exe = iso.Interpreter.current().executable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.SandboxWarning)
        fallback = sb.Sandbox(isolation="rlimits")
        try:
            full = sb.Sandbox(isolation="bwrap")
        except sb.SandboxUnavailable:
            full = None
    own_uid = ", own uid + sweep" if iso.is_root() else ""
    rows = [
        ("python -I -S (no isolation)", _plain([exe, "-I", "-S", "-c", "pass"])),
        (f"launcher: rlimits, scratch, env, group kill{own_uid}", lambda: fallback.run_python("pass")),
    ]
    if full is not None:
        program, test = "def f(x):\n    return x * 2\n", "assert f(2) == 4"
        rows += [
            ("bwrap: ro fs, pid/ipc/uts ns, no launcher", _bwrap_without_net(full)),
            ("bwrap + net ns + launcher (full sandbox)", lambda: full.run_python("pass")),
            ("run_tests(): full sandbox + harness", lambda: run_tests(program, test, sandbox=full)),
        ]
    return list(zip([name for name, _ in rows], _rates(rows, runs, threads), strict=True))


def math_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """A mix of answer forms seen in GSM8K and MATH: numbers, fractions, radicals, sets..."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        value = Fraction(rng.randint(-999, 999), rng.choice([1, 1, 2, 3, 4, 8]))
        p, q = value.numerator, value.denominator
        k, m = rng.randint(2, 9), rng.choice([2, 3, 5, 7])
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        big = rng.randint(0, 10**6)
        pairs += [
            (str(big), f"{big:,}"),
            (f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}"),
            (f"{k}\\sqrt{{{m}}}", f"\\sqrt{{{k * k * m}}}"),
            (f"({a}x+{b})^2", f"{a * a}x^2 + {2 * a * b}x + {b * b}"),
            (f"\\{{{a}, {b}\\}}", f"\\{{{b}, {a}\\}}"),
            (f"[{a}, {a + b})", f"{a} \\le x < {a + b}"),
            (f"x = {p}", f"{p}"),
            (f"{a}\\%", f"{a / 100}"),
        ]
    return pairs[:n]


def math_rows(n: int) -> list[tuple[str, float, str]]:
    """(grader, verifications/s, agreement note) on the same pairs."""
    from verifiers.math import is_equivalent

    pairs = math_pairs(n)
    rows = []
    start = time.perf_counter()
    ours = [is_equivalent(g, p) for g, p in pairs]
    rows.append(("verifiers.math.is_equivalent", n / (time.perf_counter() - start), f"{sum(ours)}/{n} equal"))
    try:
        import math_verify
    except ImportError:
        return rows
    start = time.perf_counter()
    theirs = [
        bool(math_verify.verify(math_verify.parse(f"${g}$"), math_verify.parse(f"${p}$"))) for g, p in pairs
    ]
    rate = n / (time.perf_counter() - start)
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True))
    rows.append(("math_verify.verify(parse, parse)", rate, f"{sum(theirs)}/{n} equal; agrees on {agree}"))
    return rows


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [header] + [tuple(f"{c:,.1f}" if isinstance(c, float) else str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=300, help="sandboxed runs per row (default 300)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="concurrent runs (default: CPU count)"
    )
    parser.add_argument("--pairs", type=int, default=1000, help="math pairs per grader (default 1000)")
    parser.add_argument("--skip-sandbox", action="store_true", help="only the math table")
    parser.add_argument("--skip-math", action="store_true", help="only the sandbox table")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"python {platform.python_version()}, load average {load:.1f} at start\n"
    )
    if not args.skip_sandbox:
        rows = sandbox_rows(args.runs, args.threads)
        bare = rows[0][1]
        table = [(name, rate, f"{1000 / rate:.1f}", f"{bare / rate:.2f}x") for name, rate in rows]
        title = f"Sandboxed trivial programs ({args.runs} runs per row, {args.threads} threads)"
        print(_table(title, ("layers", "runs/s", "ms/run", "cost vs bare"), table))
        print()
    if not args.skip_math:
        print(
            _table(
                f"Math verification ({args.pairs} pairs, 1 process)",
                ("grader", "verifications/s", "result"),
                math_rows(args.pairs),
            )
        )


if __name__ == "__main__":
    main()
