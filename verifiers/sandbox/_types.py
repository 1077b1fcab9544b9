"""What a sandboxed run is given and what it gives back: limits in, a result out.

Shared by the local sandbox (``local.py``), the HTTP client (``remote.py``) and
the code verifier, which only ever see these two types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
