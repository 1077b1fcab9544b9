"""Host side of the fork server (``_forkserver.py``): start it, hand it runs, replace it.

A :class:`ForkServer` is one pre-started interpreter inside its own sandbox
(its own bubblewrap, as pid 1 of its own namespaces), serving one run at a
time; a ``ServerPool`` (``_serverpool.py``) keeps the idle ones and starts another whenever all
are busy or one died. Nothing here trusts a server with a verdict: it only
starts runs and reports exit statuses, while the program's output and report
come back on pipes the host reads itself.
"""

from __future__ import annotations

import array
import json
import logging
import marshal
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from verifiers.sandbox import _isolation as iso
from verifiers.sandbox._fresh import fd_relative_exe
from verifiers.sandbox._pump import Pump
from verifiers.sandbox._seccomp import filter_fd
from verifiers.sandbox._setup import Outcome, Setup

if TYPE_CHECKING:
    from verifiers.sandbox._serverpool import ServerPool
    from verifiers.sandbox._types import Limits

log = logging.getLogger(__name__)

SERVER_SOURCE = (Path(__file__).parent / "_forkserver.py").read_text()
# How long a killed run may take to be swept and reaped before the server
# itself is killed (its namespace and every process in it go with it).
_KILL_GRACE_S = 5.0
# How long output pipes may stay open after the server reported the run over
# (every process of the run is dead by then; this only bounds a kernel stall).
_DRAIN_GRACE_S = 1.0


class ServerDied(RuntimeError):
    """The fork server went away before it accepted a run (the caller may retry)."""


class ForkServer:
    """One pre-started sandboxed interpreter, fed one run at a time over a socket.

    Args:
        prefix: what wraps the interpreter (the bubblewrap command line ending
            in ``--``, setpriv, or nothing).
        bwrap: ``prefix`` is bubblewrap: ``--info-fd`` is added so that the
            server's host pid (pid 1 of its namespace) is known.
        python: the interpreter and its flags.
        config: settings for the server (see ``_forkserver.py``).
        env: the server's whole environment (children get their own per run).
        scratch_root: directory holding the runs' scratch directories; removed on close.
        pass_fds: descriptors the prefix needs (e.g. one for a descriptor-relative interpreter).
        preload: trusted modules the server imports before serving (marshalled
            ``[(name, code or source)]``, sent on its stdin; see ``config["preload"]``).
        startup_s: how long the server may take to say it is ready.
    """

    def __init__(
        self,
        prefix: Sequence[str],
        python: Sequence[str],
        *,
        config: dict,
        env: dict[str, str],
        scratch_root: str,
        bwrap: bool = False,
        pass_fds: Sequence[int] = (),
        preload: bytes = b"",
        startup_s: float = 30.0,
    ) -> None:
        self.scratch_root = scratch_root
        self.runs = 0
        self.spent = False
        self.sock, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        info_r, info_w = os.pipe() if bwrap else (None, None)
        prefix = list(prefix)
        if info_w is not None:
            prefix[-1:-1] = ["--info-fd", str(info_w)]
        argv = prefix + list(python) + [str(guest.fileno()), marshal.dumps(config).hex()]
        fds = [guest.fileno(), *pass_fds] + ([info_w] if info_w is not None else [])
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if preload else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                env=env,
                cwd="/",
                process_group=0,
                close_fds=True,
            )
        finally:
            guest.close()
            if info_w is not None:
                os.close(info_w)
        self.pid = self.proc.pid
        try:
            if preload:
                try:
                    self.proc.stdin.write(preload)
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass  # it died: _await_ready says why
            self._await_ready(startup_s)
            if info_r is not None:
                self.pid = _child_pid(info_r, self.proc.pid)
        except BaseException:
            self.close()
            raise
        finally:
            if info_r is not None:
                os.close(info_r)

    def _await_ready(self, startup_s: float) -> None:
        ready = _readable(self.sock, startup_s)
        message = self.sock.recv(16) if ready else b""
        if message == b"R":
            return
        if not ready:
            raise ServerDied(f"fork server did not start within {startup_s:.0f} s")
        self.proc.wait()
        why = self.proc.stderr.read(2000).decode(errors="replace").strip()
        raise ServerDied(f"fork server exited with status {self.proc.returncode}: {why}")

    @property
    def alive(self) -> bool:
        """Whether the server can take another run."""
        if self.spent or self.proc.poll() is not None or not os.path.isdir(self.scratch_root):
            return False
        ready = _readable(self.sock, 0)
        return not ready  # an idle server only ever speaks when it goes away

    def run(
        self,
        spec: dict,
        job: bytes,
        stdin: bytes,
        wall_s: float,
        caps: dict[str, int],
        program_job: bytes | None = None,
    ) -> Outcome:
        """One run: send the spec with fresh pipes, feed and drain them, return how it ended.

        ``program_job`` is what the program's process of a paired run reads
        (on a sixth pipe), so that it starts at once rather than after the harness.

        Raises:
            ServerDied: the server was gone before it could take the run.
        """
        pipes = [os.pipe() for _ in range(5 if program_job is None else 6)]
        # Child ends: stdin (read), stdout, stderr, report (write), job (read), the program's job (read).
        guest = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]] + [p[0] for p in pipes[4:]]
        host = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]] + [p[1] for p in pipes[4:]]
        try:
            self.sock.sendmsg(
                [b"S" + marshal.dumps(spec)],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", guest))],
            )
        except OSError as err:
            for fd in host:
                os.close(fd)
            self.spent = True
            raise ServerDied(f"fork server is gone: {err}") from err
        finally:
            for fd in guest:
                os.close(fd)
        self.runs += 1
        pump = _ServerPump(self.sock)
        pump.add_writer(os.fdopen(host[4], "wb", buffering=0), job)
        if program_job is not None:
            pump.add_writer(os.fdopen(host[5], "wb", buffering=0), program_job)
        pump.add_writer(os.fdopen(host[0], "wb", buffering=0), stdin)
        for name, fd in zip(("stdout", "stderr", "report"), host[1:4], strict=True):
            pump.add_reader(name, os.fdopen(fd, "rb", buffering=0), caps[name])
        try:
            pump.run(time.monotonic() + wall_s)
            if pump.status is None and not pump.died:
                self._stop_run(pump)
        finally:
            pump.stop()
        if pump.died or pump.spent:
            self.spent = True
        return Outcome(
            returncode=pump.status,
            stdout=bytes(pump.data["stdout"]),
            stderr=bytes(pump.data["stderr"]),
            report=bytes(pump.data["report"]),
            timed_out=pump.timed_out,
            output_exceeded=pump.exceeded,
            server_died=pump.died,
        )

    def _stop_run(self, pump: _ServerPump) -> None:
        """Ask the server to kill the run; kill the server if it does not answer in time."""
        try:
            self.sock.send(b"K")
        except OSError:
            pump.died = True
            return
        deadline = time.monotonic() + _KILL_GRACE_S
        while pump.status is None and not pump.died and time.monotonic() < deadline:
            ready = _readable(self.sock, max(deadline - time.monotonic(), 0))
            if ready:
                pump.on_control()
        if pump.status is None and not pump.died:
            self.kill()
            pump.died = True

    def kill(self) -> None:
        """SIGKILL the server; inside bubblewrap its whole pid namespace dies with it."""
        for pid in {self.pid, self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.spent = True

    def close(self) -> None:
        """Stop the server (closing its socket ends it) and remove its scratch root."""
        self.spent = True
        self.sock.close()
        try:
            self.proc.wait(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.scratch_root, ignore_errors=True)

    def forget(self) -> None:
        """Drop a server inherited through fork() without touching it (it belongs to the parent)."""
        self.spent = True
        self.sock.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class _ServerPump(Pump):
    """Pump whose run ends with the server's ``E`` message instead of a child's exit."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(proc=None)  # type: ignore[arg-type]
        self.sock = sock
        self.status: int | None = None
        self.spent = False
        self.died = False

    def on_control(self) -> None:
        try:
            message = self.sock.recv(1 << 10)
        except OSError:
            message = b""
        if not message:
            self.died = True
            self.selector.unregister(self.sock.fileno())
        elif message[:1] == b"E":
            self.status, self.spent = marshal.loads(message[1:])

    def run(self, deadline: float) -> None:
        """Service pipes until the server reports the run over, a cap trips or ``deadline`` passes."""
        control = self.sock.fileno()
        self.selector.register(control, selectors.EVENT_READ, ("control", None))
        ended_at = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.timed_out = True
                return
            if self.status is not None or self.died:
                ended_at = ended_at or now
                open_pipes = [k for k in self.selector.get_map().values() if k.fd != control]
                if not open_pipes or now - ended_at > _DRAIN_GRACE_S:
                    return
            for key, _ in self.selector.select(min(deadline - now, 0.1)):
                if key.fd == control:
                    self.on_control()
                elif not self._service(key):
                    return

    def stop(self) -> None:
        """Unregister and close the host's pipe ends (the server already killed the run)."""
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fd)
        self.selector.close()
        for stream in self._closers:
            try:
                stream.close()
            except OSError:
                pass


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    """Whether ``sock`` has data or was closed, waiting up to ``timeout_s`` (poll: any fd number)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _child_pid(info_r: int, fallback: int) -> int:
    """The server's host pid from bubblewrap's ``--info-fd`` report."""
    os.set_blocking(info_r, False)
    try:
        text = os.read(info_r, 1 << 12)
        return int(json.loads(text)["child-pid"])
    except (OSError, ValueError, KeyError):
        return fallback


def start_server(setup: Setup) -> ForkServer:
    """A new fork server behind the sandbox's layers: in bubblewrap, or as root switching uids."""
    root = tempfile.mkdtemp(prefix="ouroboros-sandbox-", dir=setup.scratch_root)
    kwargs: dict = {"pass_fds": []}
    opened: list[int] = []
    config = {"pid1": setup.bwrap is not None, "shared_uid": setup.uids is None}
    config["preload"] = bool(setup.preload)
    config["pair_entry"] = setup.pair_entry
    config["sys_path"] = setup.sys_path
    exe = setup.interpreter.executable
    try:
        if setup.uids is not None:
            os.chmod(root, 0o711)  # a run's uid reaches its own directory and nothing else here
        if setup.bwrap:
            prefix = iso.bwrap_args(
                setup.bwrap,
                view=setup.view,
                scratch=root,
                as_root=setup.as_root,
                disable_userns=True,
            )
            # Lifetime follows the control socket, not the thread that started
            # the server; as pid 1 the server reaps every orphan of a run, and
            # signals from inside its namespace cannot reach it.
            prefix.remove("--die-with-parent")
            prefix[-1:-1] = ["--as-pid-1"]
            if setup.seccomp:
                fd = filter_fd(setup.seccomp)
                opened.append(fd)
                kwargs["pass_fds"].append(fd)
                prefix[-1:-1] = ["--seccomp", str(fd)]
        else:
            setpriv = iso.find_setpriv()
            prefix = [setpriv, "--no-new-privs", "--"] if setpriv else []
            config["no_new_privs"] = not setpriv
            # Children take descriptors 0-4; the interpreter's must stay above them.
            exe = fd_relative_exe(setup.interpreter, kwargs, opened, lowest=10)
            if kwargs["pass_fds"]:
                config["keep_fd"] = kwargs["pass_fds"][0]
        return ForkServer(
            prefix,
            [exe, *setup.flags, "-c", SERVER_SOURCE],
            config=config,
            env=iso.scrubbed_env(root),
            scratch_root=root,
            bwrap=setup.bwrap is not None,
            pass_fds=kwargs["pass_fds"],
            preload=setup.preload,
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    finally:
        for fd in opened:
            os.close(fd)


def run_in_server(
    setup: Setup,
    pool: ServerPool,
    job: dict,
    payload: bytes,
    stdin: bytes,
    limits: Limits,
    pair: bytes | None = None,
) -> Outcome | None:
    """One run in a fork server, replacing one found dead; None when no server can be had.

    With ``pair`` (the program's part of a test-harness job) the server also
    forks the program's process of the run, which reads it (see ``_forkserver.py``).
    """
    for _ in range(2):
        try:
            server = pool.take()
        except (OSError, ServerDied) as err:
            log.warning("could not start a fork server (%s); this run starts a fresh interpreter", err)
            return None
        try:
            outcome = serve(setup, server, job, payload, stdin, limits, pair)
        except BaseException:
            server.close()  # interrupted (SystemExit, KeyboardInterrupt): the run dies with it
            raise
        pool.give_back(server)
        if outcome is not None:
            return outcome
    return None


def serve(
    setup: Setup,
    server: ForkServer,
    job: dict,
    payload: bytes,
    stdin: bytes,
    limits: Limits,
    pair: bytes | None = None,
) -> Outcome | None:
    """One run in ``server``; None when the server was gone before the run began."""
    try:
        scratch = tempfile.mkdtemp(prefix="ouroboros-sandbox-", dir=server.scratch_root)
    except OSError:
        server.spent = True  # its scratch root was removed from outside: it cannot serve
        return None
    uid = setup.uids.acquire() if setup.uids else None
    try:
        if uid is not None:
            os.chown(scratch, uid, uid)
        spec = {
            "uid": uid,
            # No POSIX message queues: they would outlive the run in the
            # server's IPC namespace.
            "rlimits": {**limits.rlimits(setup.nproc_base()), "msgqueue": (0, 0)},
            "cwd": scratch,
            "env": iso.scrubbed_env(scratch),
            "pair": pair is not None,
        }
        caps = {"stdout": limits.output_bytes, "stderr": limits.output_bytes, "report": limits.report_bytes}
        try:
            return server.run(spec, marshal.dumps((job, payload)), stdin, limits.wall_s, caps, pair)
        except ServerDied:
            return None
    finally:
        if uid is not None:
            if not setup.bwrap and server.spent:
                iso.kill_uid(uid)  # no namespace took the run's processes with the server
            setup.uids.release(uid)
        setup.trash.discard(scratch)
        if setup.uids is None:
            # Runs share the uid that owns the scratch root: clear whatever they put there.
            for entry in os.listdir(server.scratch_root):
                setup.trash.discard(os.path.join(server.scratch_root, entry))
