"""Fork server: one pre-started interpreter inside the sandbox, one forked child per run.

The host starts it once (``python -I -S -B -c <this source> <control fd> <config>``),
inside bubblewrap as pid 1 of its own pid namespace, or as root on the host
when bubblewrap is missing. For every run the host sends a request over a
SOCK_SEQPACKET socket: a small marshalled spec (uid, limits, working directory,
environment) and five descriptors (stdin, stdout, stderr, report, job). The
server forks; the child takes those descriptors as 0-4, closes every other one,
reads the job (the program and its payload: the server itself never sees it),
drops to the run's uid, lowers its limits, enters its scratch directory and
runs the program in the interpreter state the server had before any untrusted
code existed. The server never runs untrusted code itself, so every child
starts from the same pristine state.

When the child exits, or when the host asks (``K``: wall clock or output cap),
the server SIGKILLs every process of the run in one ``kill(-1)`` (as pid 1 of
the namespace, or as the run's uid, so that nothing else is in reach), reaps
them, checks that the run left nothing behind that the next run could see, and
replies ``E`` with the exit status. A run that leaves state it cannot clean
(System V IPC objects; in a shared-uid sandbox also /dev entries or changes to
the server's own limits, priority or CPU set) marks the server spent: it
replies and exits, and the host starts a new one.

Standard library only, and as few imports as possible: every module imported
here is present (untouched) in every child.
"""

import array
import builtins
import gc
import marshal
import os
import resource
import select
import sys
from _socket import CMSG_SPACE, SCM_RIGHTS, SOL_SOCKET, socket

_RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
}
_N_FDS = 5  # stdin, stdout, stderr, report, job: descriptors 0-4 of every child
_REPORT_FD = 3
_JOB_FD = 4
_SIGKILL = 9
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_SETUP_FAILED = 125


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _prctl(option, value):
    # ctypes is loaded only where the server needs prctl (a sandbox without a
    # uid of its own, or no bubblewrap to set no_new_privs).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def _io_priority():
    number = {"x86_64": 252, "aarch64": 31}.get(os.uname().machine)  # ioprio_get
    if number is None:
        return None
    import ctypes

    return ctypes.CDLL(None).syscall(number, 1, 0)  # IOPRIO_WHO_PROCESS, this process


def _settle_descriptors(control_fd):
    """Occupy 0-4 so that received descriptors land above them; return the control fd (>= 5)."""
    holder = os.open(os.devnull, os.O_RDWR)
    while holder < _N_FDS:
        holder = os.open(os.devnull, os.O_RDWR)
    if control_fd < _N_FDS:
        moved = os.dup(control_fd)
        os.dup2(holder, control_fd)
        control_fd = moved
    os.close(holder)
    return control_fd


def _child(spec, fds, config):
    """Set up one run in the forked child, then run it; never returns."""
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        keep = config.get("keep_fd")
        if keep is None:
            os.closerange(_N_FDS, 1 << 30)
        else:
            os.closerange(_N_FDS, keep)
            os.closerange(keep + 1, 1 << 30)
        job, payload = marshal.loads(_read_all(_JOB_FD))
        os.close(_JOB_FD)
        if config.get("shared_uid"):
            _prctl(_PR_SET_DUMPABLE, 1)  # the server is not; the program may be
        if spec.get("uid") is not None:
            os.setgroups([])
            os.setresgid(spec["uid"], spec["uid"], spec["uid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        for name, (soft, hard) in spec["rlimits"].items():
            resource.setrlimit(_RLIMITS[name], (soft, hard))
        os.umask(0o077)
        os.chdir(spec["cwd"])
        os.environ.clear()
        os.environ.update(spec["env"])
    except BaseException as exc:
        os.write(2, f"sandbox setup failed: {type(exc).__name__}: {exc}\n".encode())
        os._exit(_SETUP_FAILED)
    del spec, fds, config
    _execute(job, payload)


def _execute(job, payload):
    """Replace the child with a command, or run Python as a fresh ``__main__``."""
    if job.get("argv"):
        os.close(_REPORT_FD)
        try:
            os.execvp(job["argv"][0], job["argv"])
        except OSError as exc:
            os.write(2, f"{job['argv'][0]}: {exc}\n".encode())
            os._exit(127)
    sys.argv = ["<sandboxed>"]
    main = type(sys)("__main__")
    main.__dict__.update(__builtins__=builtins, SANDBOX_PAYLOAD=payload, SANDBOX_REPORT_FD=_REPORT_FD)
    sys.modules["__main__"] = main
    del payload
    status = 0
    try:
        code = job.get("code") or compile(job["source"], "<harness>", "exec")
        del job
        exec(code, main.__dict__)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        if exc.code is not None and not isinstance(exc.code, int):
            sys.stderr.write(f"{exc.code}\n")
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    # Skip interpreter finalisation: nothing sandboxed needs it, and it is a
    # large share of a short run.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)


class _Server:
    def __init__(self, control_fd, config):
        self.sock = socket(fileno=_settle_descriptors(control_fd))
        self.config = config
        if config.get("shared_uid"):
            # Children share this uid: without this they could ptrace the
            # server or read its memory, and reach later runs through it.
            _prctl(_PR_SET_DUMPABLE, 0)
        if config.get("no_new_privs"):
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        self.baseline = self._state()
        # The first compile() of a process builds the AST types (milliseconds);
        # done here once, every child inherits them. Freezing what exists now
        # keeps the children's collections off the pages they share with us.
        compile("pass", "<warm-up>", "exec")
        gc.freeze()

    def serve(self):
        self.sock.send(b"R")
        while True:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, CMSG_SPACE(_N_FDS * 4))
            if not data:
                return  # the host went away
            fds = array.array("i")
            for level, kind, blob in ancillary:
                if level == SOL_SOCKET and kind == SCM_RIGHTS:
                    fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
            if data[:1] != b"S" or len(fds) != _N_FDS:
                for fd in fds:
                    os.close(fd)
                continue  # a stray kill request after a run ended, or garbage
            spec = marshal.loads(data[1:])
            status, host_gone = self._run(spec, list(fds))
            if host_gone:
                return
            spent = self._state() != self.baseline
            self.sock.send(b"E" + marshal.dumps((status, spent)))
            if spent:
                return

    def _run(self, spec, fds):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            _child(spec, fds, self.config)
        for fd in fds:
            os.close(fd)
        uid = spec.get("uid")
        status, host_gone = self._wait(pid, uid)
        self._sweep(pid, uid)
        self._reap(pid)
        return status, host_gone

    def _wait(self, pid, uid):
        """Exit status of the run's main process, killing the run when the host asks."""
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll(100)}
                if pidfd in ready:
                    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), False
                if self.sock.fileno() in ready:
                    message = self.sock.recv(64)
                    if message in (b"", b"K"):
                        self._sweep(pid, uid)
                        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), message == b""
                self._reap_orphans(pid)
        finally:
            os.close(pidfd)

    def _reap_orphans(self, pid):
        # As pid 1 the server inherits every orphan of the run; zombies would
        # count against the run's process limit until reaped.
        if not self.config.get("pid1"):
            return
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid == pid:
                return
            os.waitpid(found.si_pid, 0)

    def _sweep(self, pid, uid):
        """SIGKILL every process of the run in one kernel pass (a fork bomb cannot outrun it)."""
        if uid is None and not self.config.get("pid1"):
            # Neither a namespace nor a uid of its own bounds kill(-1) here:
            # only the run's process group can be reached safely.
            try:
                os.killpg(pid, _SIGKILL)
            except OSError:
                pass
            return
        if uid is not None:
            # Real and effective uid both the run's: kill(-1) then reaches that
            # uid's processes and nothing else (a root real uid would reach
            # every root process in sight).
            os.setresuid(uid, uid, 0)
        try:
            os.kill(-1, _SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            if uid is not None:
                os.setresuid(0, 0, 0)

    def _reap(self, pid):
        if not self.config.get("pid1"):
            return
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return

    def _state(self):
        """What a run could leave behind for the next one; compared with the baseline."""
        state = []
        if self.config.get("pid1"):
            # Each namespace has its own System V IPC; objects outlive processes.
            for kind in ("shm", "sem", "msg"):
                with open(f"/proc/sysvipc/{kind}", "rb") as handle:
                    state.append(handle.read().count(b"\n"))
        if self.config.get("shared_uid"):
            # Same uid: a run may write /dev (a tmpfs of this namespace) and
            # lower this process's limits, priorities or CPU set, which the next
            # child would inherit.
            state += [sorted(os.listdir("/dev")), sorted(os.listdir("/dev/shm"))]
            state += [resource.getrlimit(r) for r in _RLIMITS.values()]
            state += [os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)), _io_priority()]
        return state


def main():
    control_fd = int(sys.argv[1])
    config = marshal.loads(bytes.fromhex(sys.argv[2]))
    del sys.argv[1:]
    _Server(control_fd, config).serve()
    os._exit(0)


if __name__ == "__main__":
    main()
