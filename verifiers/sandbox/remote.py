"""A code-execution service over HTTP, used like a sandbox: SandboxFusion's ``/run_code`` API.

When one host's CPUs run out (a TPU pod's trainer host), ``run_tests`` can
send its job to a service instead: ``run_tests(..., sandbox=RemoteSandbox(url))``
or ``verifiers.code.verify(..., sandbox=RemoteSandbox(url))``. The request and
response are SandboxFusion's (bytedance/SandboxFusion, ``sandbox/server/
sandbox_api.py``): POST ``{"code", "language": "python", "run_timeout",
"compile_timeout", "memory_limit_MB", "stdin", "files", "fetch_files"}`` to
``/run_code`` and read ``{"status": "Success" | "Failed" | "SandboxError",
"message", "run_result": {"status": "Finished" | "TimeLimitExceeded" |
"Error", "execution_time", "return_code", "stdout", "stderr"}, ...}``. Any
service speaking it works, SandboxFusion's own included;
``python -m verifiers.sandbox.server`` is one that runs every job through a
local :class:`~verifiers.sandbox.Sandbox`.

The code verifier sends its whole harness as the code and the tests on stdin,
and reads the records from stdout (see ``_harness.py``), so verdicts are judged
on this side exactly as for a local run.

Failures of the service (no connection, a reset, HTTP 429 or 5xx, a
``SandboxError``, an unreadable answer, no answer within the run's limit plus
``timeout_slack_s``) are retried with exponential backoff; when every retry
failed, :class:`ServiceUnavailable` says why, and the code verifier scores the
row 0 with that reason. At most ``max_in_flight`` requests are open at once per
process.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

from verifiers.sandbox._testplan import REMOTE_SOURCE, remote_stdin, split_remote_output
from verifiers.sandbox._types import Limits, SandboxResult

REMOTE = "remote_service"  # the layer reported for runs on a service: its isolation is the service's


class ServiceUnavailable(RuntimeError):
    """The service did not run the job: unreachable, failing, refusing or too slow, after every retry."""


class _Retry(Exception):
    """One attempt failed in a way that another attempt may not."""


class RemoteSandbox:
    """Runs Python on a code-execution service that speaks SandboxFusion's ``/run_code`` API.

    Args:
        url: the service, e.g. ``http://10.0.0.5:8080`` (``/run_code`` is added
            unless the URL already ends with it).
        limits: default limits: ``wall_s`` becomes ``run_timeout`` and
            ``memory_mb`` becomes ``memory_limit_MB``; the other limits are the
            service's own.
        max_in_flight: requests open at once from this process (the rest wait).
        retries: further attempts after a failed one.
        backoff_s: wait before the first retry; doubled for each next one
            (with up to 50% random jitter), at most ``max_backoff_s``.
        timeout_slack_s: how long past the run's own limit an answer may take.
    """

    def __init__(
        self,
        url: str,
        *,
        limits: Limits | None = None,
        max_in_flight: int = 8,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        timeout_slack_s: float = 10.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if max_in_flight < 1 or retries < 0 or backoff_s < 0 or timeout_slack_s <= 0:
            raise ValueError("max_in_flight must be >= 1, retries and backoff_s >= 0, timeout_slack_s > 0")
        base = url.rstrip("/")
        self.url = base if base.endswith("/run_code") else base + "/run_code"
        self.limits = limits or Limits()
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_slack_s = timeout_slack_s
        self.layers: tuple[str, ...] = (REMOTE,)
        self._gate = threading.BoundedSemaphore(max_in_flight)

    def __getstate__(self) -> dict:
        # Picklable (for verifier worker processes): each process gets its own gate.
        return {k: v for k, v in self.__dict__.items() if k != "_gate"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._gate = threading.BoundedSemaphore(self.max_in_flight)

    def __repr__(self) -> str:
        return f"RemoteSandbox({self.url!r}, max_in_flight={self.max_in_flight}, retries={self.retries})"

    def run_python(self, source: str, *, stdin: bytes = b"", limits: Limits | None = None) -> SandboxResult:
        """Run ``source`` as a Python program on the service.

        Raises:
            ServiceUnavailable: every attempt failed (the message says how the last one did).
        """
        limits = limits or self.limits
        body = json.dumps(
            {
                "code": source,
                "language": "python",
                "run_timeout": limits.wall_s,
                "compile_timeout": limits.wall_s,
                "memory_limit_MB": limits.memory_mb,
                "stdin": stdin.decode("utf-8", "replace"),
                "files": {},
                "fetch_files": [],
            }
        ).encode()
        start = time.monotonic()
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                pause = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                time.sleep(pause * (1 + 0.5 * random.random()))
            try:
                answer = self._post(body, limits.wall_s + self.timeout_slack_s)
                return _result(answer, limits, time.monotonic() - start, self.layers)
            except _Retry as err:
                why = str(err)
        raise ServiceUnavailable(f"{self.url}: {why} (after {self.retries + 1} attempts)")

    def run_harness(self, job: dict, tests: dict, *, limits: Limits | None = None) -> SandboxResult:
        """Run the test harness of :func:`verifiers.code.run_tests` on the service.

        The harness reports on stdout; the result carries its records as
        ``report`` and the program's own output as ``stdout`` / ``stderr``.

        Raises:
            ServiceUnavailable: every attempt failed.
        """
        result = self.run_python(REMOTE_SOURCE, stdin=remote_stdin(job, tests), limits=limits)
        report, out, err = split_remote_output(result.stdout)
        return replace(result, report=report, stdout=out, stderr=err or result.stderr)

    def _post(self, body: bytes, timeout_s: float) -> dict:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with self._gate:
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    text = response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace")
                if err.code == 429 or err.code >= 500:
                    raise _Retry(f"HTTP {err.code}: {detail}") from None
                refused = f"{self.url} refused the request: HTTP {err.code}: {detail}"
                raise ServiceUnavailable(refused) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                raise _Retry(f"{type(reason).__name__}: {reason}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise _Retry(f"unreadable answer: {text[:200]!r}") from None
        if not isinstance(answer, dict) or answer.get("status") not in ("Success", "Failed"):
            message = answer.get("message", "") if isinstance(answer, dict) else ""
            raise _Retry(f"service error: {str(message)[:300] or str(answer)[:300]}")
        if not isinstance(answer.get("run_result"), dict):
            raise _Retry(f"answer without a run_result: {str(answer)[:300]}")
        return answer


def _result(answer: dict, limits: Limits, wall_s: float, layers: tuple[str, ...]) -> SandboxResult:
    run = answer["run_result"]
    if run.get("status") == "Error":
        raise _Retry(f"service error: {str(run.get('stderr') or answer.get('message'))[:300]}")
    code = run.get("return_code")
    return SandboxResult(
        returncode=code if isinstance(code, int) else None,
        stdout=str(run.get("stdout") or "").encode(),
        stderr=str(run.get("stderr") or "").encode(),
        report=b"",
        timed_out=run.get("status") == "TimeLimitExceeded",
        output_exceeded=False,
        wall_s=wall_s,
        layers=layers,
    )

