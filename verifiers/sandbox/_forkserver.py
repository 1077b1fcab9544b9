"""Fork server: one pre-started interpreter inside the sandbox, one forked child per run.

The host starts it once (``python -I -S -B -c <this source> <control fd> <config>``,
and on stdin the trusted modules to import before serving, such as the test harness),
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
from _socket import AF_UNIX, CMSG_SPACE, SCM_RIGHTS, SOCK_SEQPACKET, SOL_SOCKET, socket, socketpair
from fcntl import F_DUPFD_CLOEXEC, fcntl

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
_PR_SET_CHILD_SUBREAPER = 36
_SETUP_FAILED = 125


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _prctl(option, value):
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


def _child(spec, fds, config, job=None, extra=None):
    """Set up one run (or the program's process of a paired run, given its ``job``) in the forked child.

    Never returns. ``fds`` become descriptors 0, 1, 2...; ``extra`` are further
    globals of the ``__main__`` it runs.
    """
    try:
        os.setsid()
        if len(fds) > _N_FDS:
            # Sources may sit where targets go: move them all out of the way first.
            fds = [fcntl(fd, F_DUPFD_CLOEXEC, len(fds)) for fd in fds]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        keep = config.get("keep_fd")
        if keep is None:
            os.closerange(len(fds), 1 << 30)
        else:
            os.closerange(len(fds), keep)
            os.closerange(keep + 1, 1 << 30)
        payload = b""
        if job is None:
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
    _execute(job, payload, extra)


def _execute(job, payload, extra=None):
    """Replace the child with a command, or run Python as a fresh ``__main__``."""
    if job.get("argv"):
        os.close(_REPORT_FD)
        if job.get("self_exe"):
            job["argv"][0] = sys.executable  # as the server reached it (maybe through a descriptor)
        try:
            os.execvp(job["argv"][0], job["argv"])
        except OSError as exc:
            os.write(2, f"{job['argv'][0]}: {exc}\n".encode())
            os._exit(127)
    sys.argv = ["<sandboxed>"]
    main = type(sys)("__main__")
    main.__dict__.update(__builtins__=builtins, SANDBOX_PAYLOAD=payload, SANDBOX_REPORT_FD=_REPORT_FD)
    main.__dict__.update(extra or {})
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
        # Loaded once here, where no untrusted code ran yet: the test harness
        # calls prctl through it in every run, and an import per run would cost
        # more than the rest of a short run.
        import ctypes  # noqa: F401
        if not config.get("pid1") and not config.get("shared_uid"):
            # Outside a pid namespace a run's orphans would go to the host's
            # init, and until it reaps them they count against the process limit
            # of a uid the next run gets: as their subreaper the server reaps them.
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
            config["reaper"] = True
        if config.get("shared_uid"):
            # Children share this uid: without this they could ptrace the
            # server or read its memory, and reach later runs through it.
            _prctl(_PR_SET_DUMPABLE, 0)
        if config.get("no_new_privs"):
            _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        entry = config.get("pair_entry")
        self.pair_code = compile(entry, "<program process>", "exec") if entry else None
        self.baseline = self._state()
        # The first compile() of a process builds the AST types (milliseconds);
        # done here once, every child inherits them. Freezing what exists now
        # keeps the children's collections off the pages they share with us.
        compile("pass", "<warm-up>", "exec")
        gc.freeze()
        self.spare_main = self.spare_program = None
        self._refill(paired=False)

    def serve(self):
        self.sock.send(b"R")
        while True:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, CMSG_SPACE((_N_FDS + 1) * 4))
            if not data:
                return  # the host went away
            fds = array.array("i")
            for level, kind, blob in ancillary:
                if level == SOL_SOCKET and kind == SCM_RIGHTS:
                    fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
            spec = marshal.loads(data[1:]) if data[:1] == b"S" else None
            if spec is None or len(fds) != _N_FDS + bool(spec.get("pair")):
                for fd in fds:
                    os.close(fd)
                continue  # a stray kill request after a run ended, or garbage
            status, host_gone = self._run(spec, list(fds))
            if host_gone:
                return
            spent = self._state() != self.baseline
            # Every process of the run has SIGKILL pending and can run no more
            # code: the host may go on while they are reaped and the next
            # run's children are forked.
            self.sock.send(b"E" + marshal.dumps((status, spent)))
            if spent:
                return
            if not spec.get("pair") and self.spare_program is not None:
                self.spare_program.discard()  # runs here are not paired (for now)
                self.spare_program = None
            self._reap()
            self._refill(paired=bool(spec.get("pair")))

    def _refill(self, paired):
        """Fork the next run's children now, off the run's critical path."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.spare_main = _Spare(self.config)
        if paired and self.pair_code is not None:
            self.spare_program = _Spare(self.config, {"code": self.pair_code})

    def _run(self, spec, fds):
        extra, program = [], None
        if spec.get("pair") and self.pair_code is not None:
            # A paired run: the program's process is a child of this server too,
            # started before the run's main process (the test harness), so it
            # shares no memory with it; the two talk over a pair of pipes.
            to_program, from_program = os.pipe(), os.pipe()
            null = os.open(os.devnull, os.O_RDWR)
            spare = self.spare_program or _Spare(self.config, {"code": self.pair_code})
            self.spare_program = None
            ends = [null, fds[1], fds[2], to_program[0], from_program[1], fds.pop()]
            program = spare.start(spec, ends)
            for fd in (null, to_program[0], from_program[1], ends[-1]):
                os.close(fd)
            extra = [to_program[1], from_program[0]]
        spare = self.spare_main or _Spare(self.config)
        self.spare_main = None
        names = {"SANDBOX_PROGRAM": (program, _N_FDS, _N_FDS + 1)} if program else None
        pid = spare.start(spec, fds + extra, names)
        for fd in fds + extra:
            os.close(fd)
        uid = spec.get("uid")
        status, host_gone = self._wait(pid, uid)
        self._sweep(pid, uid)
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
        # As pid 1 (or subreaper) the server inherits every orphan of the run;
        # zombies would count against the run's process limit until reaped.
        if not (self.config.get("pid1") or self.config.get("reaper")):
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

    def _reap(self):
        if not (self.config.get("pid1") or self.config.get("reaper")):
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


def _preload():
    """Run the trusted modules the host sent on stdin, so that every child finds them imported."""
    for name, code in marshal.loads(_read_all(0)):
        module = type(sys)(name)
        module.__dict__["__builtins__"] = builtins
        code = marshal.loads(code) if isinstance(code, bytes) else compile(code, f"<{name}>", "exec")
        exec(code, module.__dict__)
        sys.modules[name] = module
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


class _Spare:
    """A child forked ahead of its run, waiting in this server's code for the run's spec and descriptors.

    It runs nothing until then, so it is as pristine as a child forked when the
    run starts; forking it between runs, while the host does its own share of
    the work, takes the fork off the run's critical path.
    """

    def __init__(self, config, job=None):
        ours, theirs = socketpair(AF_UNIX, SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            _await_run(theirs, config, job)
        theirs.close()
        self.sock = ours

    def start(self, spec, fds, extra=None):
        """Hand the run to the child; return its pid."""
        self.sock.sendmsg([marshal.dumps((spec, extra))], [(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds))])
        self.sock.close()
        return self.pid

    def discard(self):
        self.sock.close()  # it reads the end of its socket and exits


def _await_run(sock, config, job):
    """Body of a spare child until its run comes; never returns."""
    try:
        # Nothing of the server's but descriptors 0-4 (placeholders) and the interpreter's.
        keep = sorted(fd for fd in (sock.fileno(), config.get("keep_fd")) if fd is not None)
        low = _N_FDS
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 30)
        data, ancillary, _, _ = sock.recvmsg(1 << 16, CMSG_SPACE(16 * 4))
        fds = array.array("i")
        for level, kind, blob in ancillary:
            if level == SOL_SOCKET and kind == SCM_RIGHTS:
                fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
        if not data:
            os._exit(0)
        spec, extra = marshal.loads(data)
        sock.close()
    except BaseException:
        os._exit(0)
    _child(spec, list(fds), config, job, extra)


def main():
    control_fd = int(sys.argv[1])
    config = marshal.loads(bytes.fromhex(sys.argv[2]))
    del sys.argv[1:]
    sys.path.extend(p.replace("{prefix}", sys.prefix) for p in config.get("sys_path", ()))
    if config.get("preload"):
        _preload()
    _Server(control_fd, config).serve()
    os._exit(0)


if __name__ == "__main__":
    main()
