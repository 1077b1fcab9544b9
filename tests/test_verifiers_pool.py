"""The worker pool: order, per-call wall-clock limit, crashes, errors, async use, shutdown."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from verifiers import Verdict, VerifierPool
from verifiers.pool import PoolBroken


# Module-level so that worker processes can import them by reference.
def echo_score(completion, example):
    return float(example["score"])


def misbehave(completion, example):
    if completion == "hang":
        time.sleep(600)
    if completion == "crash":
        os._exit(3)
    if completion == "raise":
        raise ValueError("boom")
    if completion == "nan":
        return float("nan")
    return Verdict(1.0, True, extracted=completion)


class FailsInWorker:
    """Pickles in the parent, refuses to unpickle anywhere else (a missing module, say)."""

    def __init__(self):
        self.parent = os.getpid()

    def __setstate__(self, state):
        if os.getpid() != state["parent"]:
            raise RuntimeError("cannot load here")
        self.__dict__.update(state)

    def __call__(self, completion, example):
        return 1.0


def slow(completion, example):
    time.sleep(float(completion))
    return 1.0


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(misbehave, workers=2, timeout_s=1.5) as p:
        yield p


def test_scores_in_input_order():
    examples = [{"score": i / 10} for i in range(10)]
    with VerifierPool(echo_score, workers=2) as p:
        verdicts = p.score(["x"] * 10, examples)
    assert [v.score for v in verdicts] == [i / 10 for i in range(10)]
    assert not any(v.correct for v in verdicts)


def test_hang_crash_and_raise_give_zero_with_a_reason(pool):
    start = time.monotonic()
    verdicts = pool.score(["ok", "hang", "crash", "raise", "nan", "ok"], [{}] * 6)
    elapsed = time.monotonic() - start
    ok, hang, crash, err, nan, ok2 = verdicts
    assert ok.score == 1.0 and ok.extracted == "ok" and ok2.correct
    assert hang.score == 0.0 and hang.timed_out and "wall-clock limit" in hang.reason
    assert crash.score == 0.0 and "exit code 3" in crash.reason
    assert err.score == 0.0 and "ValueError: boom" in err.reason
    assert nan.score == 0.0 and "NaN" in nan.reason
    assert elapsed < 15
    assert [v.error for v in verdicts] == [None, "timeout", "crashed", "crashed", "invalid", None]


def test_pool_recovers_after_failures(pool):
    pool.score(["crash", "crash", "hang"], [{}] * 3)
    verdicts = pool.score(["ok"] * 6, [{}] * 6)
    assert all(v.correct for v in verdicts)


def test_async_overlaps_with_other_work(pool):
    start = time.monotonic()
    future = pool.score_async(["ok"] * 4, [{}] * 4)
    assert time.monotonic() - start < 0.5  # returns at once
    assert [v.score for v in future.result(timeout=30)] == [1.0] * 4
    single = pool.submit("ok", {})
    assert single.result(timeout=30).correct


def test_empty_batch_and_length_mismatch(pool):
    assert pool.score([], []) == []
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        pool.score(["a", "b"], [{}])


def test_registered_names_and_weights_run_in_workers():
    with VerifierPool({"math": 1.0, "format": 0.5}, workers=1, timeout_s=30) as p:
        good, bad = p.score(["<think>x</think> \\boxed{\\frac{1}{2}}", "\\boxed{3}"], [{"answer": "0.5"}] * 2)
    assert good.score == 1.5 and good.correct and good.info["scores"] == {"math": 1.0, "format": 1.0}
    assert bad.score == 0.5 and not bad.correct


class HoldsALock:
    """Cannot be pickled even by cloudpickle: a lock is process-local state."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, completion, example):
        return 1.0


def test_unpicklable_verifier_is_refused_up_front():
    with pytest.raises(TypeError, match="picklable"):
        VerifierPool(HoldsALock())


def test_verifier_that_cannot_load_in_workers_breaks_the_pool_loudly():
    with VerifierPool(FailsInWorker(), workers=1) as p:
        with pytest.raises(PoolBroken, match="cannot load"):
            p.score(["x"], [{}])
        with pytest.raises(PoolBroken):
            p.submit("x", {})


def test_close_without_waiting_fails_pending_calls():
    p = VerifierPool(slow, workers=1, timeout_s=30)
    running = p.submit("0.5", {})
    queued = [p.submit("0.5", {}) for _ in range(3)]
    time.sleep(0.1)
    p.close(wait=False)
    outcomes = [f.result(timeout=10) for f in [running, *queued]]
    assert all(v.score == 0.0 and "closed" in v.reason for v in outcomes[1:])
    assert all(v.error == "unavailable" for v in outcomes[1:])
    with pytest.raises(RuntimeError, match="closed"):
        p.submit("0", {})


def test_close_waits_for_pending_calls():
    p = VerifierPool(slow, workers=2, timeout_s=30)
    futures = [p.submit("0.2", {}) for _ in range(4)]
    p.close()
    assert [f.result(timeout=1).score for f in futures] == [1.0] * 4


def test_workers_are_recycled_and_cleaned_up():
    with VerifierPool(misbehave, workers=1, max_tasks_per_worker=2) as p:
        p.score(["ok"] * 5, [{}] * 5)
        processes = [w.process for w in p._workers]
    for process in processes:
        assert not process.is_alive()


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


def test_pool_timeout_tears_down_a_running_sandbox():
    marker = f"{os.getpid() % 1000}.{time.monotonic_ns() % 10**6:06d}"
    program = f"import os\nos.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    example = {"tests": "pass", "timeout_s": 60}
    scratch = set(Path(tempfile.gettempdir()).glob("ouroboros-sandbox-*"))
    with VerifierPool("code", workers=1, timeout_s=3) as p:
        verdict = p.score([f"```python\n{program}```"], [example])[0]
    assert verdict.timed_out and verdict.score == 0.0
    for _ in range(50):
        if not _procs_with(marker):
            break
        time.sleep(0.1)
    assert _procs_with(marker) == []
    # The worker was asked to stop, so its sandbox deleted its scratch directory.
    assert set(Path(tempfile.gettempdir()).glob("ouroboros-sandbox-*")) <= scratch
