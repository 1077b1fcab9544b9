"""Isolated execution of untrusted programs.

Every run gets a fresh interpreter in its own process group, a private scratch
directory that is deleted afterwards, a scrubbed environment, resource limits
(CPU time, address space, processes, file size, open files), capped
stdout/stderr and a wall-clock kill of the whole group. With bubblewrap
installed the process also runs with no network, a read-only view of the file
system (home directories, /run and /tmp hidden), and its own pid namespace. When
started as root the program runs under a uid of its own, so that the process
limit binds and it cannot signal or inspect the caller.

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
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from verifiers import _isolation as iso
from verifiers._isolation import ALL_LAYERS, LAYER_GAPS  # noqa: F401  (re-exported)
from verifiers._pump import Pump

log = logging.getLogger(__name__)

Isolation = Literal["auto", "bwrap", "rlimits"]
_LAUNCHER = (Path(__file__).parent / "_launcher.py").read_text()


class SandboxWarning(RuntimeWarning):
    """Issued when untrusted code runs with some isolation layers off."""


class SandboxUnavailable(RuntimeError):
    """Raised when ``isolation="bwrap"`` is requested but bubblewrap cannot run."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed run.

    Attributes:
        wall_s: wall-clock limit; the whole process group is killed after it.
        cpu_s: CPU-time limit per process (RLIMIT_CPU); defaults to ``wall_s`` rounded up.
        memory_mb: address-space limit per process (RLIMIT_AS).
        max_processes: processes and threads the program may hold (RLIMIT_NPROC).
        file_size_mb: largest file the program may write (RLIMIT_FSIZE).
        open_files: open file descriptors (RLIMIT_NOFILE).
        output_bytes: stdout and stderr are each cut here and the run is stopped.
        report_bytes: cap on the trusted report channel used by test harnesses.
    """

    wall_s: float = 10.0
    cpu_s: float | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    open_files: int = 64
    output_bytes: int = 1 << 20
    report_bytes: int = 64 << 20

    def rlimits(self, nproc_base: int = 0) -> dict[str, tuple[int, int]]:
        """The values the launcher applies, as ``name: (soft, hard)``."""
        cpu = math.ceil(self.cpu_s if self.cpu_s is not None else self.wall_s)
        mib = 1 << 20
        nproc = nproc_base + self.max_processes
        return {
            # The hard CPU limit sits one second above the soft one so that
            # SIGXCPU arrives first and a program ignoring it still dies.
            "cpu": (cpu, cpu + 1),
            "as": (self.memory_mb * mib, self.memory_mb * mib),
            "nproc": (nproc, nproc),
            "fsize": (self.file_size_mb * mib, self.file_size_mb * mib),
            "nofile": (self.open_files, self.open_files),
            "core": (0, 0),
        }


@dataclass(frozen=True)
class SandboxResult:
    """What came back from one sandboxed run.

    Attributes:
        returncode: exit status of the sandboxed process (negative: killed by that signal).
        stdout: captured standard output, at most ``Limits.output_bytes``.
        stderr: captured standard error, at most ``Limits.output_bytes``.
        report: bytes written to the harness report channel (empty for commands).
        timed_out: the wall-clock limit expired and the group was killed.
        output_exceeded: stdout, stderr or the report hit its cap and the run was stopped.
        wall_s: seconds from start to the end of the run.
        layers: isolation layers that were active for this run.
    """

    returncode: int | None
    stdout: bytes
    stderr: bytes
    report: bytes
    timed_out: bool
    output_exceeded: bool
    wall_s: float
    layers: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Exited with status 0 within the limits."""
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


class Sandbox:
    """Runs untrusted programs behind every isolation layer this host supports.

    Args:
        isolation: ``"auto"`` uses bubblewrap when it works and otherwise falls back
            to process limits with a :class:`SandboxWarning`; ``"bwrap"`` raises
            :class:`SandboxUnavailable` instead of falling back; ``"rlimits"``
            skips bubblewrap (still warning, since layers are off).
        limits: default limits for :meth:`run` and :meth:`run_python`.
        python: interpreter for sandboxed Python (default: the running one).
        site_packages: let sandboxed Python import installed packages. Off by
            default: the standard library suffices for test harnesses, and site
            start-up costs tens of milliseconds per run.
        scratch_root: where scratch directories are created (default: the system temp dir).
    """

    def __init__(
        self,
        *,
        isolation: Isolation = "auto",
        limits: Limits | None = None,
        python: str | None = None,
        site_packages: bool = False,
        scratch_root: str | None = None,
    ) -> None:
        if isolation not in ("auto", "bwrap", "rlimits"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'rlimits', got {isolation!r}")
        self.limits = limits or Limits()
        self.interpreter = iso.Interpreter.current(python)
        self._flags = ["-I", "-B"] + ([] if site_packages else ["-S"])
        self._scratch_root = scratch_root or tempfile.gettempdir()
        self._root = iso.is_root()
        self._uids = iso.UidAllocator() if self._root else None
        self._nproc = (-1e9, 0)  # (when counted, the caller's own threads)
        self.layers: tuple[str, ...] = ()
        self._bwrap = self._choose_bwrap(isolation)
        if not self._bwrap and not self._fd_start_possible():
            self._uids = None  # the interpreter would be out of the sandbox uid's reach
        self.layers = self._active_layers()
        off = [layer for layer in ALL_LAYERS if layer not in self.layers]
        if off:
            self._warn(off, isolation)

    def _choose_bwrap(self, isolation: Isolation) -> list[str] | None:
        self._fallback_reason = "not running as root, so no uid of its own"
        if isolation == "rlimits":
            self._fallback_reason = "isolation='rlimits' was requested"
            return None
        bwrap = iso.find_bwrap()
        if bwrap is None:
            reason = "bubblewrap (bwrap) is not installed"
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
        if self._uids is not None:
            layers.append(iso.UNPRIVILEGED_UID)
        return tuple(layer for layer in ALL_LAYERS if layer in layers)

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
    def uses_bwrap(self) -> bool:
        """Whether runs go through bubblewrap."""
        return self._bwrap is not None

    def run(self, argv: Sequence[str], *, stdin: bytes = b"", limits: Limits | None = None) -> SandboxResult:
        """Run a command (looked up on the sandbox's PATH) under every layer."""
        if not argv:
            raise ValueError("argv must name a command")
        return self._run({"argv": list(argv)}, b"", stdin, limits or self.limits, self._bwrap)

    def run_python(
        self,
        source: str | types.CodeType,
        *,
        payload: bytes = b"",
        stdin: bytes = b"",
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run Python ``source`` as ``__main__`` in a fresh sandboxed interpreter.

        ``source`` runs with two extra globals: ``SANDBOX_PAYLOAD`` (the bytes
        given here, never written to disk) and ``SANDBOX_REPORT_FD`` (a
        descriptor whose bytes come back as ``SandboxResult.report``). It may be
        a compiled code object (trusted code run often, such as a test harness):
        that saves compiling it in every run when the sandbox runs this same
        interpreter.
        """
        if isinstance(source, types.CodeType):
            if self.interpreter.executable != os.path.realpath(sys.executable):
                raise ValueError("code objects only run in the same interpreter; pass source")
            job = {"code": source}
        else:
            job = {"source": source}
        return self._run(job, payload, stdin, limits or self.limits, self._bwrap)

    def _probe(self, bwrap: str) -> str | None:
        """Run a trivial program through bubblewrap; None when it works, else why not."""
        trial = replace(self.limits, wall_s=30.0, cpu_s=10.0)
        try:
            result = self._run({"source": "print('ok')"}, b"", b"", trial, [bwrap])
        except OSError as err:
            return str(err)
        if result.stdout.strip() == b"ok" and result.returncode == 0:
            return None
        return (result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}")[:500]

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

    def _run(
        self, job: dict, payload: bytes, stdin: bytes, limits: Limits, bwrap: list[str] | None
    ) -> SandboxResult:
        start = time.monotonic()
        uid = self._uids.acquire() if self._uids else None
        scratch = tempfile.mkdtemp(prefix="ouroboros-sandbox-", dir=self._scratch_root)
        opened: list[int] = []
        try:
            if uid is not None:
                os.chown(scratch, uid, uid)
            argv, popen_kwargs, spec = self._plan(job, scratch, uid, limits, opened, bwrap)
            control = _encode_control(spec, payload)
            out = _execute(argv, popen_kwargs, control, stdin, limits, opened)
        finally:
            for fd in opened:
                os.close(fd)
            if uid is not None:
                # Children that left the process group (setsid, double fork) are
                # found by uid; in bubblewrap the pid namespace already took them.
                if not bwrap:
                    iso.kill_uid(uid)
                self._uids.release(uid)
            shutil.rmtree(scratch, ignore_errors=True)
        return replace(out, wall_s=time.monotonic() - start, layers=self.layers)

    def _plan(
        self,
        job: dict,
        scratch: str,
        uid: int | None,
        limits: Limits,
        opened: list[int],
        bwrap: list[str] | None,
    ) -> tuple[list[str], dict, dict]:
        """Command line, Popen arguments and launcher spec for one run."""
        interpreter = self.interpreter
        exe = interpreter.executable
        kwargs: dict = {"env": iso.scrubbed_env(scratch), "cwd": scratch, "pass_fds": []}
        spec = {"rlimits": limits.rlimits(self._nproc_base()), "cwd": scratch, **job}
        if bwrap:
            prefix = iso.bwrap_args(
                bwrap[0],
                interpreter=interpreter,
                scratch=scratch,
                as_root=self._root,
                disable_userns=True,
            )
            spec.update(uid=uid, gid=uid)
        else:
            prefix = []
            if uid is not None:
                prefix, switch = iso.as_uid(uid)
                kwargs.update(switch)
                exe = self._fd_relative_exe(exe, kwargs, opened)
            elif iso.find_setpriv():
                prefix = [iso.find_setpriv(), "--no-new-privs", "--"]
            # Without setpriv the launcher sets the flag itself (through ctypes).
            spec["no_new_privs"] = not prefix
        return prefix + [exe, *self._flags, "-c", _LAUNCHER], kwargs, spec

    def _fd_relative_exe(self, exe: str, kwargs: dict, opened: list[int]) -> str:
        # The interpreter may sit under a directory the sandbox uid cannot enter
        # (/root/.pyenv). Starting it through an inherited descriptor of its
        # prefix skips that path walk; Python then finds its stdlib under the
        # same /proc/self/fd path.
        if self.interpreter.reachable_by_others():
            return exe
        home = self.interpreter.home_prefix()
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
        opened.append(fd)
        kwargs["pass_fds"].append(fd)
        return f"/proc/self/fd/{fd}/{os.path.relpath(exe, home)}"


def _encode_control(spec: dict, payload: bytes) -> bytes:
    header = marshal.dumps(spec)
    return len(header).to_bytes(8, "little") + header + payload


def _execute(
    argv: list[str],
    kwargs: dict,
    control: bytes,
    stdin: bytes,
    limits: Limits,
    opened: list[int],
) -> SandboxResult:
    """Start the process and pump its pipes until it ends or a limit trips."""
    control_r, control_w = os.pipe()
    report_r, report_w = os.pipe()
    opened += [control_r, control_w, report_r, report_w]
    kwargs["pass_fds"] += [control_r, report_w]
    argv = argv + [str(control_r), str(report_w)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,
        close_fds=True,
        **kwargs,
    )
    for fd in (control_r, report_w):
        opened.remove(fd)
        os.close(fd)
    opened.remove(control_w)
    opened.remove(report_r)
    pump = Pump(proc)
    pump.add_writer(os.fdopen(control_w, "wb", buffering=0), control)
    pump.add_writer(proc.stdin, stdin)
    pump.add_reader("stdout", proc.stdout, limits.output_bytes)
    pump.add_reader("stderr", proc.stderr, limits.output_bytes)
    pump.add_reader("report", os.fdopen(report_r, "rb", buffering=0), limits.report_bytes)
    try:
        pump.run(time.monotonic() + limits.wall_s)
    finally:
        pump.stop()
    return SandboxResult(
        returncode=proc.returncode,
        stdout=bytes(pump.data["stdout"]),
        stderr=bytes(pump.data["stderr"]),
        report=bytes(pump.data["report"]),
        timed_out=pump.timed_out,
        output_exceeded=pump.exceeded,
        wall_s=0.0,
    )


_DEFAULT: Sandbox | None = None
_DEFAULT_LOCK = threading.Lock()


def default_sandbox() -> Sandbox:
    """The process-wide sandbox with default settings (probed and warned about once)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = Sandbox()
        return _DEFAULT
