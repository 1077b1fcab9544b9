"""Verifier throughput: sandboxed runs per second, and math grading beside math-verify.

Sandbox: trivial programs (``pass``) run ``--runs`` times from ``--threads``
threads, in three groups measured in the same interleaved rounds. "fresh" rows
start a new interpreter per run (the old path, ``Sandbox(fork_server=False)``);
"server" rows fork each run from an interpreter pre-started inside the
sandbox (the default). Within a group each row adds isolation layers to the
one above it, so the difference between rows is those layers' cost per run.
The "http" row sends run_tests() jobs to ``python -m verifiers.sandbox.server``
on this host (SandboxFusion's /run_code API). ``--baseline CHECKOUT`` compares
run_tests() calls/s with another checkout, in alternating rounds.
Math: the same gold/prediction pairs graded by ``verifiers.math.is_equivalent``
(through its grading process), by the same comparison in process without a
limit, and by ``math_verify`` (when installed); then math-verify's own test
cases graded from the raw strings by both.

    python benchmarks/bench_verifiers.py
    python benchmarks/bench_verifiers.py --runs 400 --threads 4 --pairs 2000
    python benchmarks/bench_verifiers.py --skip-math --baseline ../checkout-of-an-older-commit
"""

from __future__ import annotations

import argparse
import datetime
import marshal
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

from verifiers import sandbox as sb  # noqa: E402
from verifiers.code import run_tests  # noqa: E402
from verifiers.sandbox import _isolation as iso  # noqa: E402
from verifiers.sandbox import _servers  # noqa: E402
from verifiers.sandbox._serverpool import ServerPool  # noqa: E402
from verifiers.sandbox.remote import RemoteSandbox  # noqa: E402


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
                box._setup.bwrap,
                view=box._setup.view,
                scratch=scratch,
                as_root=iso.is_root(),
                disable_userns=True,
            )
            args.remove("--unshare-net")
            exe = box.interpreter.executable
            return _plain(args + [exe, "-I", "-S", "-B", "-c", "pass"])()

    return run


BARE = "python -I -S -c pass (no isolation)"
NO_NET = "bwrap: ro fs, pid/ipc/uts ns, no launcher"
FULL_FRESH = "bwrap + net ns + seccomp + launcher (full sandbox)"
FLOOR = "fork server, no isolation (floor)"
FULL_SERVER = "+ bwrap namespaces, seccomp (full sandbox)"
TESTS = "run_tests(): full sandbox + harness"
COMPUTED = "run_tests(), computed assert: + the program's own process"
HTTP = "run_tests() over HTTP (verifiers.sandbox.server, this host)"
PROGRAM = "def f(x):\n    return x * 2\n"
# A literal assert runs as a value case (one sandboxed process; the parent
# compares); a computed one in the harness beside a process of the program's own.
LITERAL_TEST, COMPUTED_TEST = "assert f(2) == 4", "assert f(2) == 2 + 2"


def _bare_fork_server() -> tuple[Callable[[], object], Callable[[], None]]:
    """The fork server with no isolation at all (no bubblewrap, uid, limits or scratch):
    the floor for a forked run (request, fork, exec of ``pass``, reap, reply)."""
    exe = iso.Interpreter.current().executable
    cwd = tempfile.mkdtemp(prefix="ouroboros-bench-")
    python = [exe, "-I", "-S", "-B", "-c", _servers.SERVER_SOURCE]
    pool = ServerPool(lambda: _servers.ForkServer([], python, config={}, env={}, scratch_root=cwd))
    spec = {"uid": None, "rlimits": {}, "cwd": cwd, "env": {}}
    job = marshal.dumps(({"source": "pass"}, b""))
    caps = dict.fromkeys(("stdout", "stderr", "report"), 1 << 20)

    def run() -> object:
        server = pool.take()
        try:
            return server.run(spec, job, b"", 10.0, caps)
        finally:
            pool.give_back(server)

    return run, pool.close


def _http_service(jobs: int) -> tuple[subprocess.Popen, RemoteSandbox]:
    """``python -m verifiers.sandbox.server`` on a free port of 127.0.0.1, and a client of it."""
    command = [sys.executable, "-m", "verifiers.sandbox.server", "--port", "0", "--jobs", str(jobs)]
    command.append("--quiet")
    root = Path(__file__).resolve().parents[1]
    service = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=root)
    line = service.stderr.readline()
    while line and not line.startswith("serving "):
        line = service.stderr.readline()
    if not line:
        raise RuntimeError("the code-execution server did not start")
    return service, RemoteSandbox(line.split()[1], max_in_flight=jobs)


def sandbox_rows(runs: int, threads: int) -> list[tuple[str, str, float, str | None]]:
    """(path, layers, runs/s, the row it adds layers to): fresh interpreters, then fork servers."""
    exe = iso.Interpreter.current().executable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.SandboxWarning)
        fresh_fallback = sb.Sandbox(isolation="rlimits", fork_server=False)
        server_fallback = sb.Sandbox(isolation="rlimits")
        try:
            fresh, server = sb.Sandbox(isolation="bwrap", fork_server=False), sb.Sandbox(isolation="bwrap")
        except sb.SandboxUnavailable:
            fresh = server = None
    own_uid = ", own uid + sweep" if iso.is_root() else ""
    program, test = PROGRAM, LITERAL_TEST
    bare_server, close_bare = _bare_fork_server()
    service, remote = _http_service(threads)
    bare, launcher, no_net = BARE, f"launcher: rlimits, scratch, env, group kill{own_uid}", NO_NET
    floor, limits = FLOOR, f"+ rlimits, scratch, env, session{own_uid}"
    rows = [
        ("fresh", bare, _plain([exe, "-I", "-S", "-c", "pass"]), None),
        ("fresh", launcher, lambda: fresh_fallback.run_python("pass"), bare),
    ]
    if fresh is not None:
        rows += [
            ("fresh", no_net, _bwrap_without_net(fresh), bare),
            ("fresh", FULL_FRESH, lambda: fresh.run_python("pass"), no_net),
            ("fresh", TESTS, lambda: run_tests(program, test, sandbox=fresh), FULL_FRESH),
        ]
    rows += [("server", floor, bare_server, None)]
    if server_fallback.uses_fork_server:
        rows += [("server", limits, lambda: server_fallback.run_python("pass"), floor)]
    if server is not None and server.uses_fork_server:
        rows += [
            ("server", FULL_SERVER, lambda: server.run_python("pass"), limits),
            ("server", TESTS, lambda: run_tests(program, test, sandbox=server), FULL_SERVER),
            ("server", COMPUTED, lambda: run_tests(program, COMPUTED_TEST, sandbox=server), TESTS),
        ]
    rows += [("http", HTTP, lambda: run_tests(program, test, sandbox=remote), None)]
    try:
        rates = _rates([(name, fn) for _, name, fn, _ in rows], runs, threads)
    finally:
        close_bare()
        service.kill()
        service.wait()
        for box in (fresh_fallback, server_fallback, fresh, server):
            if box is not None:
                box.close()
    return [(path, name, rate, ref) for (path, name, _, ref), rate in zip(rows, rates, strict=True)]


# Runs run_tests in batches on command: reads a batch size per line, answers its seconds.
_WORKER = """
import sys, time, warnings
from concurrent.futures import ThreadPoolExecutor
warnings.simplefilter("ignore")
from verifiers import sandbox as sb
from verifiers.code import run_tests
box = sb.Sandbox(isolation=sys.argv[1])
program, test, threads = sys.argv[2], sys.argv[3], int(sys.argv[4])
pool = ThreadPoolExecutor(threads)
assert all(r.passed for r in pool.map(lambda _: run_tests(program, test, sandbox=box), range(2 * threads)))
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    list(pool.map(lambda _: run_tests(program, test, sandbox=box), range(int(line))))
    print(time.perf_counter() - start, flush=True)
box.close()
"""


def compare_rows(baseline: str, runs: int, threads: int) -> list[tuple[str, str, float, float]]:
    """run_tests() calls/s of this checkout and of the one at ``baseline``, in alternating rounds.

    Each checkout runs in its own process (its own ``verifiers`` on the path);
    rounds alternate between them so that load from elsewhere falls on both alike.
    """
    isolation = "bwrap" if iso.find_bwrap() else "rlimits"
    here = str(Path(__file__).resolve().parents[1])
    tests = [("literal assert", LITERAL_TEST), ("computed assert", COMPUTED_TEST)]
    workers = {}
    for label, test in tests:
        for root in (baseline, here):
            env = dict(os.environ, PYTHONPATH=root)
            argv = [sys.executable, "-c", _WORKER, isolation, PROGRAM, test, str(threads)]
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
            workers[(label, root)] = subprocess.Popen(argv, env=env, cwd=root, **pipes)
    for worker in workers.values():
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("a benchmark worker did not start")
    rounds, batch = 10, max(runs // 10, threads)
    elapsed = dict.fromkeys(workers, 0.0)
    for _ in range(rounds):
        for key, worker in workers.items():
            worker.stdin.write(f"{batch}\n")
            worker.stdin.flush()
            elapsed[key] += float(worker.stdout.readline())
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    rate = {key: rounds * batch / seconds for key, seconds in elapsed.items()}
    return [(label, test, rate[(label, baseline)], rate[(label, here)]) for label, test in tests]


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


def _math_verify_cases() -> list[tuple[str, str, bool]]:
    """The 264 default-setting cases of math-verify's own tests (tests/data/math_verify_cases.jsonl)."""
    import json

    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "math_verify_cases.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["gold"], r["prediction"], r["expected"]) for r in rows]


def _rate(grade: Callable[[str, str], bool], pairs: list[tuple[str, str]]) -> tuple[float, list[bool]]:
    start = time.perf_counter()
    verdicts = [grade(g, p) for g, p in pairs]
    return len(pairs) / (time.perf_counter() - start), verdicts


def math_rows(n: int) -> list[tuple[str, float, str]]:
    """(grader, gradings/s, result) on the same pairs: generated answers, then math-verify's own cases.

    Every grader is warmed first (our grading process starts once, about a
    second, outside any measurement; math-verify compiles its grammars).
    """
    from verifiers.math import is_equivalent, verify
    from verifiers.math.grader import compare

    try:
        import math_verify
    except ImportError:
        math_verify = None

    def theirs(gold: str, pred: str) -> bool:
        return bool(math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(f"${pred}$")))

    def theirs_text(gold: str, pred: str) -> bool:
        return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(pred)))

    def ours_text(gold: str, pred: str) -> bool:
        return verify(pred, {"answer": gold}, mode="any").correct

    pairs = math_pairs(n)
    for grade in (is_equivalent, compare, ours_text) + ((theirs, theirs_text) if math_verify else ()):
        grade("\\frac{1}{2}", "0.5")
    rows = []
    rate, ours = _rate(is_equivalent, pairs)
    rows.append(("answers: verifiers.math.is_equivalent (grading process)", rate, f"{sum(ours)}/{n} equal"))
    rate, alone = _rate(compare, pairs)
    rows.append(("answers: verifiers.math.grader.compare (no limit)", rate, f"{sum(alone)}/{n} equal"))
    if math_verify is not None:
        rate, other = _rate(theirs, pairs)
        agree = sum(a == b for a, b in zip(ours, other, strict=True))
        note = f"{sum(other)}/{n} equal; agree {agree}"
        rows.append(("answers: math_verify.verify(parse, parse)", rate, note))
    cases = _math_verify_cases()
    texts = [(g, p) for g, p, _ in cases]
    expected = [e for _, _, e in cases]
    rate, ours = _rate(ours_text, texts)
    right = sum(a == b for a, b in zip(ours, expected, strict=True))
    rows.append(("its cases: verifiers.math.verify(mode='any')", rate, f"{right}/{len(cases)} expected"))
    if math_verify is not None:
        rate, other = _rate(theirs_text, texts)
        right = sum(a == b for a, b in zip(other, expected, strict=True))
        rows.append(("its cases: math_verify.verify(parse, parse)", rate, f"{right}/{len(cases)} expected"))
    return rows


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [header] + [tuple(f"{c:,.1f}" if isinstance(c, float) else str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _machine() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "?"
    bwrap = iso.find_bwrap()
    version = (
        subprocess.run([bwrap, "--version"], capture_output=True, text=True).stdout.strip()
        if bwrap
        else "none"
    )
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"python {platform.python_version()}, "
        f"{version}, {'root' if iso.is_root() else 'unprivileged'}, commit {commit or '?'}, "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )


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
    parser.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        help="another checkout (e.g. a git worktree of an older commit): compare run_tests() calls/s with it",
    )
    args = parser.parse_args()
    print(f"# {_machine()}\n# load average at start: {_load()}\n")
    if not args.skip_sandbox:
        rows = sandbox_rows(args.runs, args.threads)
        ms = {(path, name): 1000 / rate for path, name, rate, _ in rows}
        bare = ms[("fresh", BARE)]
        fresh = {name: rate for path, name, rate, _ in rows if path == "fresh"}
        table = []
        for path, name, rate, ref in rows:
            added = f"{ms[(path, name)] - ms[(path, ref)]:+.2f}" if ref else ""
            # The fork server's full-sandbox rows beside the fresh path's same rows.
            before = fresh.get({FULL_SERVER: FULL_FRESH}.get(name, name)) if path == "server" else None
            speedup = f"{rate / before:.1f}x" if before else ""
            table.append(
                (
                    path,
                    name,
                    rate,
                    f"{ms[(path, name)]:.2f}",
                    added,
                    f"{ms[(path, name)] / bare:.2f}x",
                    speedup,
                )
            )
        title = (
            f"Sandboxed trivial programs ({args.runs} runs per row, {args.threads} threads; "
            "ms/run = 1000 / runs/s; added = ms/run over the row it adds layers to)"
        )
        header = ("path", "layers", "runs/s", "ms/run", "added", "vs bare start", "vs fresh")
        print(_table(title, header, table))
        print(f"\n# load average at end of sandbox rows: {_load()}\n")
    if args.baseline:
        rows = [
            (label, test, before, after, f"{after / before:.2f}x")
            for label, test, before, after in compare_rows(args.baseline, args.runs, args.threads)
        ]
        title = (
            f"run_tests() calls/s, {args.baseline} against this checkout "
            f"({args.runs} runs per row, {args.threads} threads, alternating rounds)"
        )
        print(_table(title, ("tests", "source", "baseline", "this checkout", "ratio"), rows))
        print(f"\n# load average after the comparison: {_load()}\n")
    if not args.skip_math:
        print(
            _table(
                f"Math grading (answers: {args.pairs} generated pairs; its cases: math-verify's "
                "264 default-setting test cases; 1 thread, graders warmed)",
                ("grader", "gradings/s", "result"),
                math_rows(args.pairs),
            )
        )


if __name__ == "__main__":
    main()
