"""One fresh interpreter per run: bubblewrap (or setpriv) and ``python -c <launcher>`` every time.

The slower of the two ways to start a run (see ``_servers.py`` for the fork
server), kept for ``Sandbox(fork_server=False)``, for hosts where no fork
server can run, and to probe whether bubblewrap works at all.
"""

from __future__ import annotations

import fcntl
import marshal
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from verifiers.sandbox import _isolation as iso
from verifiers.sandbox._pump import Pump
from verifiers.sandbox._seccomp import filter_fd
from verifiers.sandbox._setup import Outcome, Setup

if TYPE_CHECKING:
    from verifiers.sandbox._types import Limits

LAUNCHER = (Path(__file__).parent / "_launcher.py").read_text()


def run_fresh(setup: Setup, job: dict, payload: bytes, stdin: bytes, limits: Limits) -> Outcome:
    """Start a new sandboxed interpreter for ``job`` and pump its pipes until it ends."""
    uid = setup.uids.acquire() if setup.uids else None
    scratch = tempfile.mkdtemp(prefix="ouroboros-sandbox-", dir=setup.scratch_root)
    opened: list[int] = []
    try:
        if uid is not None:
            os.chown(scratch, uid, uid)
        argv, popen_kwargs, spec = _plan(setup, job, scratch, uid, limits, opened)
        control = _encode_control(spec, payload)
        return _execute(argv, popen_kwargs, control, stdin, limits, opened)
    finally:
        for fd in opened:
            os.close(fd)
        if uid is not None:
            # Children that left the process group (setsid, double fork) are
            # found by uid; in bubblewrap the pid namespace already took them.
            if not setup.bwrap:
                iso.kill_uid(uid)
            setup.uids.release(uid)
        setup.trash.discard(scratch)


def _plan(
    setup: Setup, job: dict, scratch: str, uid: int | None, limits: Limits, opened: list[int]
) -> tuple[list[str], dict, dict]:
    """Command line, Popen arguments and launcher spec for one run."""
    exe = setup.interpreter.executable
    kwargs: dict = {"env": iso.scrubbed_env(scratch), "cwd": scratch, "pass_fds": []}
    spec = {"rlimits": limits.rlimits(setup.nproc_base()), "cwd": scratch, "sys_path": setup.sys_path, **job}
    if setup.bwrap:
        prefix = iso.bwrap_args(
            setup.bwrap,
            view=setup.view,
            scratch=scratch,
            as_root=setup.as_root,
            disable_userns=True,
        )
        if setup.seccomp:
            fd = filter_fd(setup.seccomp)
            opened.append(fd)
            kwargs["pass_fds"].append(fd)
            prefix[-1:-1] = ["--seccomp", str(fd)]
        spec.update(uid=uid, gid=uid)
    else:
        prefix = []
        if uid is not None:
            prefix, switch = iso.as_uid(uid)
            kwargs.update(switch)
            exe = fd_relative_exe(setup.interpreter, kwargs, opened)
        elif iso.find_setpriv():
            prefix = [iso.find_setpriv(), "--no-new-privs", "--"]
        # Without setpriv the launcher sets the flag itself (through ctypes).
        spec["no_new_privs"] = not prefix
    return prefix + [exe, *setup.flags, "-c", LAUNCHER], kwargs, spec


def fd_relative_exe(interpreter: iso.Interpreter, kwargs: dict, opened: list[int], lowest: int = 0) -> str:
    """The interpreter's path through an inherited descriptor of its prefix, where that is needed.

    The interpreter may sit under a directory the sandbox uid cannot enter
    (/root/.pyenv). Starting it through an inherited descriptor of its prefix
    skips that path walk; Python then finds its stdlib under the same
    /proc/self/fd path. The descriptor is numbered ``lowest`` or above.
    """
    exe = interpreter.executable
    if interpreter.reachable_by_others():
        return exe
    home = interpreter.home_prefix()
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    if fd < lowest:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
        os.close(fd)
        fd = moved
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
) -> Outcome:
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
    return Outcome(
        returncode=proc.returncode,
        stdout=bytes(pump.data["stdout"]),
        stderr=bytes(pump.data["stderr"]),
        report=bytes(pump.data["report"]),
        timed_out=pump.timed_out,
        output_exceeded=pump.exceeded,
    )
