"""The remote backend: run_tests jobs sent over HTTP (SandboxFusion's /run_code) to a real local server.

The server is ``verifiers.sandbox.server``, started by the tests on 127.0.0.1
(port 0), running every job through a local Sandbox: verdicts must equal the
local ones. Faults are real too: a server process killed in the middle of a
batch, answers slower than the client waits, failures that retries get past,
and no server at all.
"""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from verifiers import code
from verifiers import sandbox as sb
from verifiers.code import CallCase, IOCase, run_tests
from verifiers.sandbox.remote import RemoteSandbox, ServiceUnavailable
from verifiers.sandbox.server import RunCodeServer, make_server

REPO = Path(__file__).resolve().parents[1]
ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def local():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.SandboxWarning)
        box = sb.Sandbox()
    yield box
    box.close()


def _serve(server: RunCodeServer):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def server(local):
    running = _serve(make_server(local, jobs=2, quiet=True))
    yield running
    running.shutdown()
    running.server_close()


def _statuses(result):
    return [v.status for v in result.verdicts]


CASES = [
    (ADD, "assert add(1, 2) == 3\nassert add(1, 1) == 3\nassert add(0) == 0\n", {}),  # value cases
    (ADD, "assert add(1, 2) == int('3')\nassert add(2, 2) == 2 + 3\n", {}),  # the two-process harness
    (ADD, "def check(candidate):\n    for i in range(3):\n        assert candidate(i, 1) == i + 1\n",
     {"entry_point": "add"}),
    ("a, b = map(int, input().split())\nprint(a + b)\n", [IOCase("1 2", "3"), IOCase("2 2", "5")], {}),
    (ADD, [CallCase([1, 2], 3), CallCase([[1], [2]], [1, 2]), CallCase([2, 2], 5)], {"entry_point": "add"}),
    ("def f(x):\n    while x:\n        pass\n    return x\n", "assert f(1) == 1 + 0\nassert f(0) == 0", {}),
    ("print('hello')\nimport sys\nsys.exit(3)\n" + ADD, "assert add(1, 2) == 3", {}),
]


def test_remote_verdicts_equal_local_verdicts(server, local):
    remote = RemoteSandbox(server.url)
    for program, tests, kwargs in CASES:
        ours = run_tests(program, tests, timeout_s=5.0, case_timeout_s=0.5, sandbox=local, **kwargs)
        theirs = run_tests(program, tests, timeout_s=5.0, case_timeout_s=0.5, sandbox=remote, **kwargs)
        assert _statuses(theirs) == _statuses(ours), program
        assert [v.detail for v in theirs.verdicts] == [v.detail for v in ours.verdicts]
        assert theirs.layers == ("remote_service",) and not theirs.service_error
    # The program's own output comes back, apart from the harness's records.
    printed = run_tests(CASES[-1][0], CASES[-1][1], sandbox=remote)
    assert printed.stdout == "hello\n" and _statuses(printed) == ["runtime_error"]


def test_verify_through_the_service(server):
    remote = RemoteSandbox(server.url)
    example = {"tests": "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"}
    good = code.verify(f"```python\n{ADD}```", example, sandbox=remote)
    bad = code.verify("```python\ndef add(a, b):\n    return 0\n```", example, sandbox=remote)
    assert (good.score, good.correct) == (1.0, True)
    assert (bad.score, bad.correct) == (0.0, False) and "wrong_answer" in bad.reason


def test_forged_results_fail_through_the_service(server):
    forge = (
        "import sys\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    for v in list(f.f_locals.values()):\n"
        "        if callable(v) and type(v).__name__ == '_Report':\n"
        "            for i in range(8):\n"
        "                v(i, 'passed')\n"
        "                v(i, 'ok', b'0')\n"
        "    f = f.f_back\n"
        "print('0 passed ')\n"
        "def add(a, b):\n    return 0\n"
    )
    remote = RemoteSandbox(server.url)
    for tests in ("assert add(1, 2) == 3\n", "assert add(1, 2) == 1 + 2\n", [CallCase([1, 2], 3)]):
        result = run_tests(forge, tests, entry_point="add", sandbox=remote)
        assert not result.passed and result.pass_fraction == 0.0, result.summary()


def test_at_most_max_in_flight_requests_are_open(local):
    seen = {"now": 0, "most": 0}
    lock = threading.Lock()

    class Counting(RunCodeServer):
        def run_code(self, request):
            with lock:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            try:
                return super().run_code(request)
            finally:
                with lock:
                    seen["now"] -= 1

    server = _serve(Counting(("127.0.0.1", 0), local, jobs=8, quiet=True))
    try:
        remote = RemoteSandbox(server.url, max_in_flight=2)
        program = "import time\ntime.sleep(0.2)\n" + ADD
        with ThreadPoolExecutor(6) as pool:
            tests = "assert add(1, 2) == 3"
            runs = [pool.submit(run_tests, program, tests, sandbox=remote) for _ in range(6)]
            results = [run.result() for run in runs]
        assert all(r.passed for r in results)
        assert seen["most"] == 2
    finally:
        server.shutdown()
        server.server_close()


def test_failures_are_retried_with_backoff(local):
    attempts = []

    class Flaky(RunCodeServer):
        def run_code(self, request):
            attempts.append(time.monotonic())
            if len(attempts) <= 2:
                return {"status": "SandboxError", "message": "executor restarting", "run_result": None}
            return super().run_code(request)

    server = _serve(Flaky(("127.0.0.1", 0), local, jobs=2, quiet=True))
    try:
        remote = RemoteSandbox(server.url, retries=3, backoff_s=0.2)
        result = run_tests(ADD, "assert add(1, 2) == 3", sandbox=remote)
        assert result.passed and len(attempts) == 3
        # Backoff 0.2 s then 0.4 s (each with up to 50% jitter) between the attempts.
        gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
        assert 0.2 <= gaps[0] < 0.5 and 0.4 <= gaps[1] < 0.9
    finally:
        server.shutdown()
        server.server_close()


def test_slow_answers(local):
    stall = {"s": 0.0}

    class Slow(RunCodeServer):
        def run_code(self, request):
            time.sleep(stall["s"])
            return super().run_code(request)

    server = _serve(Slow(("127.0.0.1", 0), local, jobs=4, quiet=True))
    try:
        # A slow program within its limit: the answer is late, and right.
        remote = RemoteSandbox(server.url, timeout_slack_s=2.0)
        program = "import time\ntime.sleep(1.0)\n" + ADD
        assert run_tests(program, "assert add(1, 2) == 3", timeout_s=3.0, sandbox=remote).passed
        # A program past its limit: time_limit, not a service failure.
        sleeper = "import time\ntime.sleep(30)\n" + ADD
        late = run_tests(sleeper, "assert add(1, 2) == 3", timeout_s=1.0, sandbox=remote)
        assert _statuses(late) == ["time_limit"] and not late.service_error
        # A service slower than the run's limit plus the slack: retried, then given up on with the reason.
        stall["s"] = 2.0
        impatient = RemoteSandbox(server.url, timeout_slack_s=0.3, retries=1, backoff_s=0.05)
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="timed out.*after 2 attempts"):
            impatient.run_python("print(1)", limits=sb.Limits(wall_s=0.2))
        assert 1.0 <= time.monotonic() - start < 2.5
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_service_scores_zero_with_the_reason():
    remote = RemoteSandbox(f"http://127.0.0.1:{_free_port()}", retries=2, backoff_s=0.05)
    start = time.monotonic()
    result = run_tests(ADD, "assert add(1, 2) == 3\nassert add(1, 1) == 2", sandbox=remote)
    assert time.monotonic() - start < 3
    assert _statuses(result) == ["not_run", "not_run"] and not result.passed
    assert result.service_error.startswith(code.SERVICE_DOWN) and "Connection refused" in result.service_error
    verdict = code.verify(f"```python\n{ADD}```", {"tests": "assert add(1, 2) == 3"}, sandbox=remote)
    assert (verdict.score, verdict.correct) == (0.0, False)
    assert verdict.reason.startswith(code.SERVICE_DOWN) and verdict.info["service_error"]


def test_server_killed_in_the_middle_of_a_batch():
    command = [sys.executable, "-m", "verifiers.sandbox.server", "--port", "0", "--jobs", "2", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        while line and not line.startswith("serving "):  # a SandboxWarning comes first without bubblewrap
            line = process.stderr.readline()
        url = line.split()[1].removesuffix("/run_code")
        remote = RemoteSandbox(url, max_in_flight=2, retries=1, backoff_s=0.05)
        program = "import time\ntime.sleep(0.4)\n" + ADD
        example = {"tests": "assert add(1, 2) == 3"}
        completion = f"```python\n{program}```"
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(code.verify, completion, example, sandbox=remote) for _ in range(8)]
            for done in futures[:2]:
                done.result(timeout=30)
            process.kill()
            verdicts = [f.result(timeout=30) for f in futures]
    finally:
        process.kill()
        process.wait()
    finished = [v for v in verdicts if v.correct]
    down = [v for v in verdicts if not v.correct]
    assert 2 <= len(finished) < 8 and len(finished) + len(down) == 8
    assert all(v.score == 1.0 for v in finished)
    assert all(v.score == 0.0 and v.reason.startswith(code.SERVICE_DOWN) for v in down)


def test_the_api_by_hand(server):
    with urllib.request.urlopen(f"{server.url}/v1/ping", timeout=10) as answer:
        assert json.loads(answer.read()) == "pong"
    body = {"code": "import sys\nprint(sys.stdin.read()[::-1])", "language": "python", "stdin": "abc"}
    request = urllib.request.Request(f"{server.url}/run_code", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        reply = json.loads(answer.read())
    assert reply["status"] == "Success" and reply["run_result"]["stdout"] == "cba\n"
    assert reply["run_result"]["status"] == "Finished" and reply["run_result"]["return_code"] == 0
    body = {"code": "print(1)", "language": "cpp"}
    request = urllib.request.Request(f"{server.url}/run_code", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["status"] == "SandboxError"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/run_code", b'{"language": "python"}'))
    assert refused.value.code == 422 and "'code'" in refused.value.read().decode()


def test_remote_sandbox_pickles_for_worker_processes(server):
    remote = pickle.loads(pickle.dumps(RemoteSandbox(server.url, max_in_flight=3)))
    assert remote.url == f"{server.url}/run_code" and remote.max_in_flight == 3
    assert run_tests(ADD, "assert add(1, 2) == 3", sandbox=remote).passed
    with pytest.raises(ValueError, match="http"):
        RemoteSandbox("127.0.0.1:8080")
    with pytest.raises(ServiceUnavailable, match="refused"):
        RemoteSandbox(server.url + "/nowhere/run_code").run_python("pass")
