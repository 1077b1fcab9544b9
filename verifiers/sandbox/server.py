"""A code-execution service speaking SandboxFusion's ``/run_code`` API, running every job in a local Sandbox.

    python -m verifiers.sandbox.server --port 8080      # http://127.0.0.1:8080/run_code

Run it on a machine with spare CPUs and point the trainer's code verifier at
it (``RemoteSandbox("http://that-host:8080")``, see ``remote.py``). It is also
the reference for the part of the API that client uses:

* ``POST /run_code`` with ``{"code", "language", "run_timeout",
  "compile_timeout", "memory_limit_MB", "stdin", "files", "fetch_files"}``
  (SandboxFusion's ``RunCodeRequest``) runs ``code`` as a Python program with
  ``stdin`` under every layer of :class:`~verifiers.sandbox.Sandbox`, with
  ``run_timeout`` as its wall-clock limit and ``memory_limit_MB`` (``-1``: the
  sandbox's default) as its address-space limit. The answer is
  SandboxFusion's ``RunCodeResponse``: ``status`` ``Success`` (exit status 0)
  or ``Failed``, and ``run_result`` with ``status`` ``Finished`` or
  ``TimeLimitExceeded``, ``execution_time``, ``return_code``, ``stdout`` and
  ``stderr``. Other languages, and ``files`` / ``fetch_files``, answer
  ``SandboxError`` with a message; a malformed request answers HTTP 422.
* ``GET /v1/ping`` answers ``"pong"``.

At most ``--jobs`` programs run at once (default: the CPU count); further
requests wait their turn. The same code sent again is compiled once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
import types
from collections import OrderedDict
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from verifiers.sandbox._types import Limits
from verifiers.sandbox.local import Isolation, Sandbox

_MAX_BODY = 64 << 20
_FIELDS = {
    "code": str,
    "language": str,
    "run_timeout": (int, float),
    "compile_timeout": (int, float),
    "memory_limit_MB": int,
    "stdin": (str, type(None)),
    "files": dict,
    "fetch_files": list,
}


class RunCodeServer(ThreadingHTTPServer):
    """The HTTP server; ``sandbox`` runs the jobs, at most ``jobs`` at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sandbox: Sandbox, jobs: int, quiet: bool = False) -> None:
        super().__init__(address, RunCodeHandler)
        self.sandbox = sandbox
        self.gate = threading.BoundedSemaphore(jobs)
        self.quiet = quiet
        self._compiled: OrderedDict[str, types.CodeType] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The base URL clients use."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def compiled(self, code: str) -> types.CodeType | str:
        """``code`` compiled (kept for the next request with the same code), or as is if it cannot be."""
        key = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        try:
            compiled = compile(code, "<run_code>", "exec")
        except (SyntaxError, ValueError):
            return code  # compiled (and reported) inside the sandbox
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > 16:
                self._compiled.popitem(last=False)
        return compiled

    def run_code(self, request: dict) -> dict:
        """The answer to one ``/run_code`` request (already validated)."""
        if request["language"] != "python":
            return _error(f"language {request['language']!r} is not supported here (only 'python')")
        if request["files"] or request["fetch_files"]:
            return _error("files and fetch_files are not supported here")
        limits = replace(self.sandbox.limits, wall_s=float(request["run_timeout"]))
        if request["memory_limit_MB"] > 0:
            limits = replace(limits, memory_mb=request["memory_limit_MB"])
        code = self.compiled(request["code"]) if self.sandbox.runs_this_python else request["code"]
        stdin = (request["stdin"] or "").encode("utf-8", "surrogatepass")
        with self.gate:
            start = time.monotonic()
            result = self.sandbox.run_python(code, stdin=stdin, limits=limits)
        finished = "TimeLimitExceeded" if result.timed_out else "Finished"
        return {
            "status": "Success" if result.ok else "Failed",
            "message": "",
            "compile_result": None,
            "run_result": {
                "status": finished,
                "execution_time": round(time.monotonic() - start, 6),
                "return_code": result.returncode,
                "stdout": result.stdout.decode("utf-8", "replace"),
                "stderr": result.stderr.decode("utf-8", "replace"),
            },
            "executor_pod_name": None,
            "files": {},
        }


def _error(message: str) -> dict:
    return {"status": "SandboxError", "message": message, "compile_result": None, "run_result": None,
            "executor_pod_name": None, "files": {}}


def parse_request(body: bytes) -> dict:
    """The request with SandboxFusion's defaults filled in.

    Raises:
        ValueError: the body is not such a request (the message names the field).
    """
    try:
        request = json.loads(body)
    except ValueError as err:
        raise ValueError(f"body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise ValueError("body must be a JSON object")
    request = {"run_timeout": 10, "compile_timeout": 10, "memory_limit_MB": -1, "stdin": None,
               "files": {}, "fetch_files": [], **request}
    for name, kind in _FIELDS.items():
        if name not in request:
            raise ValueError(f"field {name!r} is required")
        if not isinstance(request[name], kind) or isinstance(request[name], bool):
            raise ValueError(f"field {name!r} has the wrong type: {type(request[name]).__name__}")
    if not 0 < request["run_timeout"] <= 3600:
        raise ValueError("field 'run_timeout' must be in (0, 3600] seconds")
    return request


class RunCodeHandler(BaseHTTPRequestHandler):
    """``POST /run_code`` and ``GET /v1/ping``."""

    server: RunCodeServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
        if self.path.rstrip("/") == "/v1/ping":
            self._answer(200, "pong")
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/run_code":
            self._answer(404, {"detail": "Not Found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._answer(413, {"detail": f"body over {_MAX_BODY} bytes"})
            return
        try:
            request = parse_request(self.rfile.read(length))
        except ValueError as err:
            self._answer(422, {"detail": str(err)})
            return
        try:
            answer = self.server.run_code(request)
        except Exception as err:  # the sandbox itself failed: the client retries
            answer = _error(f"{type(err).__name__}: {err}")
        self._answer(200, answer)

    def _answer(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(
    sandbox: Sandbox | None = None, host: str = "127.0.0.1", port: int = 0, jobs: int | None = None,
    quiet: bool = False,
) -> RunCodeServer:
    """A server on ``host:port`` (port 0: a free one, see ``server.url``); call ``serve_forever()``."""
    return RunCodeServer((host, port), sandbox or Sandbox(), jobs or os.cpu_count() or 1, quiet)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m verifiers.sandbox.server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--jobs", type=int, default=None, help="programs run at once (default: CPU count)")
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "rlimits"],
                        help="sandbox isolation (see verifiers.sandbox.Sandbox)")
    parser.add_argument("--memory-mb", type=int, default=Limits().memory_mb, help="memory limit (MiB)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    isolation: Isolation = args.isolation
    sandbox = Sandbox(isolation=isolation, limits=Limits(memory_mb=args.memory_mb))
    server = make_server(sandbox, args.host, args.port, args.jobs, args.quiet)
    print(f"serving {server.url}/run_code (layers: {', '.join(sandbox.layers)})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sandbox.close()


if __name__ == "__main__":
    main()
