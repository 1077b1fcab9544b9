"""The worker pool under faults: batch deadlines, output floods, memory, leftover processes,
invalid verdicts; and verifiers from a notebook or ``__main__``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from verifiers import Verdict, VerifierPool, checked_verdict, verdict_metrics

REPO = Path(__file__).resolve().parents[1]


def hang(completion, example):
    time.sleep(600)


def returns(completion, example):
    """Returns whatever the example names: the ways a verifier can return garbage."""
    return {
        "nan verdict": Verdict(math.nan, False),
        "string verdict": Verdict("1.0", True),
        "inf verdict": Verdict(math.inf, True),
        "-inf verdict": Verdict(-math.inf, False),
        "string correct": Verdict(1.0, "yes"),
        "inf": math.inf,
        "string": "1.0",
        "none": None,
        "fine": Verdict(0.5, False, extracted="x"),
        "numpy-like int": 1,
    }[example["kind"]]


def allocate(completion, example):
    block = bytearray(int(example["mb"]) * 2**20)
    return float(len(block) > 0)


def _procs_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in open(f"/proc/{entry}/cmdline", "rb").read():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def leave_sleepers(completion, example):
    """Starts processes meant to outlive the verifier: one in a new session, one double-forked."""
    marker = example["marker"]
    subprocess.Popen(["sleep", f"600.{marker}1"], start_new_session=True)
    if os.fork() == 0:  # a daemon: fork, fork again, the middle one exits at once
        if os.fork() == 0:
            os.setsid()
            os.execvp("sleep", ["sleep", f"600.{marker}2"])
        os._exit(0)
    os.wait()
    return 1.0


def test_batch_deadline_bounds_a_batch_of_hung_rows():
    # 16 hung rows on 1 worker with a 10 s per-call limit would take 160 s.
    with VerifierPool(hang, workers=1, timeout_s=10, batch_timeout_s=2.0) as pool:
        start = time.monotonic()
        verdicts = pool.score(["x"] * 16, [{}] * 16)
        elapsed = time.monotonic() - start
        assert elapsed < 4.0
        assert all(v.score == 0.0 and v.timed_out and v.error == "timeout" for v in verdicts)
        assert all("2 s deadline passed" in v.reason for v in verdicts)
        # The hung worker was replaced: a per-call override of the deadline works next.
        start = time.monotonic()
        again = pool.score(["y"] * 2, [{}] * 2, timeout_s=1.0)
        assert time.monotonic() - start < 3.0 and all(v.timed_out for v in again)


def test_invalid_verdicts_become_errors_at_the_pool_boundary():
    kinds = ["nan verdict", "string verdict", "inf verdict", "-inf verdict", "string correct",
             "inf", "string", "none", "fine", "numpy-like int"]  # fmt: skip
    with VerifierPool(returns, workers=1, timeout_s=30) as pool:
        verdicts = pool.score(["c"] * len(kinds), [{"kind": k} for k in kinds])
    by_kind = dict(zip(kinds, verdicts, strict=True))
    for kind in kinds[:8]:
        v = by_kind[kind]
        assert (v.score, v.correct, v.error) == (0.0, False, "invalid"), kind
        assert v.reason.startswith("invalid verdict"), kind
    assert "NaN" in by_kind["nan verdict"].reason and "str" in by_kind["string verdict"].reason
    assert by_kind["fine"] == Verdict(0.5, False, extracted="x")
    assert by_kind["numpy-like int"] == Verdict(1.0, True)
    metrics = verdict_metrics(verdicts)
    assert metrics == {"verifier/timeouts": 0.0, "verifier/errors": 8.0, "verifier/error_rate": 0.8}


def test_checked_verdict_directly():
    assert checked_verdict(Verdict(1, 1)) == Verdict(1.0, True)
    assert checked_verdict(True) == Verdict(1.0, True)
    assert checked_verdict(Verdict(1.0, 2)).error == "invalid"
    same = Verdict(0.25, False, reason="partial")
    assert checked_verdict(same) is same


def test_worker_memory_is_limited():
    with VerifierPool(allocate, workers=1, timeout_s=30, memory_limit_mb=512) as pool:
        start = time.monotonic()
        big, small = pool.score(["a", "b"], [{"mb": 2048}, {"mb": 16}])
    assert time.monotonic() - start < 20
    assert big.score == 0.0 and big.error == "crashed" and "MemoryError" in big.reason
    assert small.score == 1.0 and small.error is None


def test_processes_a_verifier_leaves_behind_die_with_the_pool():
    marker = f"{os.getpid() % 1000}{time.monotonic_ns() % 10**6:06d}"
    with VerifierPool(leave_sleepers, workers=1, timeout_s=30) as pool:
        assert pool.score(["x"], [{"marker": marker}])[0].score == 1.0
        for _ in range(50):
            if len(_procs_with(marker)) == 2:
                break
            time.sleep(0.1)
        assert len(_procs_with(marker)) == 2  # both escaped the verifier's call
    for _ in range(50):
        if not _procs_with(marker):
            break
        time.sleep(0.1)
    assert _procs_with(marker) == []


def _run_script(source: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_worker_output_is_capped_and_kept_off_stdout():
    out = _run_script(
        """
        import sys
        from verifiers import VerifierPool

        def noisy(completion, example):
            sys.stdout.write("x" * 100_000_000)
            sys.stdout.flush()
            print("to stderr", file=sys.stderr)
            return 1.0

        if __name__ == "__main__":
            with VerifierPool(noisy, workers=1, timeout_s=60, output_limit_bytes=10_000) as pool:
                print("scores", [v.score for v in pool.score(["a", "b"], [{}, {}])])
        """
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.decode().strip() == "scores [1.0, 1.0]"
    assert 10_000 <= len(out.stderr) < 20_000  # the cap, a note, nothing of the 100 MB
    assert b"output past 10000 bytes is dropped" in out.stderr


def test_lambdas_and_closures_from_main_run_in_workers():
    out = _run_script(
        """
        from verifiers import VerifierPool, combine

        def make(threshold):
            def at_least(completion, example):
                return float(len(completion) >= threshold)
            return at_least

        def local(completion, example):  # defined in __main__: a worker cannot import it
            return 0.5

        if __name__ == "__main__":
            for verifier in (lambda c, e: float(c == e["answer"]), make(3), local,
                             combine({local: 1.0, "format": 0.0})):
                with VerifierPool(verifier, workers=1, timeout_s=60) as pool:
                    print([v.score for v in pool.score(["abc", "x"], [{"answer": "abc"}] * 2)])
        """
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split("\n")[:4] == ["[1.0, 0.0]", "[1.0, 0.0]", "[0.5, 0.5]", "[0.5, 0.5]"]


def test_pool_loads_a_verifier_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "user_checks.py").write_text(
        "def starts_with_a(completion, example):\n    return float(completion.startswith('a'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with VerifierPool("user_checks:starts_with_a", workers=1, timeout_s=30) as pool:
        assert [v.score for v in pool.score(["apple", "pear"], [{}, {}])] == [1.0, 0.0]


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("user_checks_missing:f", ImportError, "cannot import module 'user_checks_missing'"),
        ("json:no_such_function", KeyError, "has no attribute 'no_such_function'"),
        ("json:__doc__", TypeError, "not a callable"),
        ("json:", KeyError, "pkg.module:function"),
    ],
)
def test_module_path_errors_are_clear(name, error, match):
    from verifiers import get

    with pytest.raises(error, match=match):
        get(name)
