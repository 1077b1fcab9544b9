"""Host facts the sandbox builds on: bubblewrap, sandbox uids, interpreter paths.

Kept apart from ``sandbox.py`` so that the run loop reads top to bottom while
the platform probing (which differs between root and unprivileged users, and
between hosts with and without bubblewrap) lives in one place.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NO_NETWORK = "no_network"
READONLY_FS = "readonly_fs"
MINIMAL_FS = "minimal_fs"
PID_NAMESPACE = "pid_namespace"
UNPRIVILEGED_UID = "unprivileged_uid"
NO_NEW_PRIVS = "no_new_privs"
SYSCALL_FILTER = "syscall_filter"
RLIMITS = "rlimits"
PROCESS_GROUP_KILL = "process_group_kill"
SCRATCH_DIR = "scratch_dir"
SCRUBBED_ENV = "scrubbed_env"
OUTPUT_CAP = "output_cap"

ALL_LAYERS = (
    NO_NETWORK,
    READONLY_FS,
    MINIMAL_FS,
    PID_NAMESPACE,
    UNPRIVILEGED_UID,
    NO_NEW_PRIVS,
    SYSCALL_FILTER,
    RLIMITS,
    PROCESS_GROUP_KILL,
    SCRATCH_DIR,
    SCRUBBED_ENV,
    OUTPUT_CAP,
)

LAYER_GAPS = {
    NO_NETWORK: "programs can open sockets, reach 127.0.0.1 services and the internet",
    READONLY_FS: "programs can write anywhere their uid may (world-writable /tmp, /var/tmp,"
    " /dev/shm) and read files outside scratch",
    MINIMAL_FS: "programs can read every file their uid may: project checkouts, installed"
    " packages and their data (benchmark data with canonical solutions included)",
    PID_NAMESPACE: "programs can see host processes; a child that leaves the process group"
    " is only reaped by the uid sweep",
    UNPRIVILEGED_UID: "programs run as the calling user: they can signal or read the"
    " environment of its other processes (the trainer included), and the process limit is"
    " shared with them",
    SYSCALL_FILTER: "programs can keep data in the kernel keyrings of their uid, where a later"
    " run under that uid can read it, and reach bpf, perf_event_open, userfaultfd and io_uring",
}
# Inside bubblewrap's user and pid namespaces the caller's processes are out of
# sight, so running under the caller's uid costs less.
UID_GAP_IN_NAMESPACES = (
    "programs run as the calling user inside a user namespace: they can read that user's"
    " files outside the hidden home directories"
)

# Inside bubblewrap the root is an empty file system with only these bound into
# it (read-only): the system's programs and libraries, the interpreter's
# installation, and the packages a sandbox allows by name. Home directories,
# /run (sockets), /tmp (other users' files), /opt, /srv and every checkout stay
# out of sight.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What of /etc a program may need: the dynamic loader's cache, time zone, user names.
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "passwd", "group", "nsswitch.conf",
             "alternatives", "os-release", "mime.types")
# Directories of installed packages under the system directories (Debian's
# dist-packages included); the interpreter's own come from sysconfig.
_SITE_GLOBS = ("/usr/lib/python3*/site-packages", "/usr/lib/python3*/dist-packages",
               "/usr/local/lib/python3*/site-packages", "/usr/local/lib/python3*/dist-packages")

# Per-run uids start here when the host maps the full uid range (a plain host
# or a privileged container): far above any uid a distribution hands out.
_UID_BASE = 100_000_000
_SLOTS_PER_PROCESS = 64


@dataclass(frozen=True)
class Interpreter:
    """How to start Python inside the sandbox.

    Attributes:
        executable: resolved path of the interpreter binary.
        prefixes: installation directories that must stay visible inside bubblewrap.
    """

    executable: str
    prefixes: tuple[str, ...]

    @classmethod
    def current(cls, python: str | None = None) -> Interpreter:
        """The running interpreter, or the one at ``python``.

        A virtual environment's own prefix is left out: sandboxed Python starts
        the real binary in isolated mode, which reads nothing from it.
        """
        exe = os.path.realpath(python or sys.executable)
        prefixes = {str(Path(exe).parent.parent)}
        if python is None:
            prefixes.add(os.path.realpath(sys.base_prefix))
        return cls(exe, tuple(sorted(prefixes)))

    def site_dirs(self) -> list[str]:
        """Directories of installed packages this interpreter (and the system) may read."""
        found = set()
        if self.executable == os.path.realpath(sys.executable):
            paths = sysconfig.get_paths()
            found |= {paths["purelib"], paths["platlib"]}
        for prefix in self.prefixes:
            found.update(glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages")))
            found.update(glob.glob(os.path.join(prefix, "lib", "python3*", "dist-packages")))
        for pattern in _SITE_GLOBS:
            found.update(glob.glob(pattern))
        return sorted({os.path.realpath(d) for d in found if os.path.isdir(d)})

    def reachable_by_others(self) -> bool:
        """Whether a uid with no relation to the file owners can execute it."""
        return all(_others_can_enter(p) for p in Path(self.executable).parents) and bool(
            os.stat(self.executable).st_mode & stat.S_IXOTH
        )

    def home_prefix(self) -> str | None:
        """The installation prefix holding the executable, for descriptor-relative start."""
        for prefix in self.prefixes:
            if self.executable.startswith(prefix.rstrip("/") + "/"):
                return prefix
        return None


def _others_can_enter(directory: Path) -> bool:
    try:
        return bool(os.stat(directory).st_mode & stat.S_IXOTH)
    except OSError:
        return False


def is_root() -> bool:
    """Whether this process can switch uids (and RLIMIT_NPROC would not bind it)."""
    return os.geteuid() == 0


BWRAP_ENV = "OUROBOROS_SANDBOX_BWRAP"


def find_bwrap() -> str | None:
    """Path of the bubblewrap binary, if installed.

    ``OUROBOROS_SANDBOX_BWRAP`` overrides the PATH lookup: a path to use that
    binary, or ``none`` to act as on a host without bubblewrap (to try the
    fallback on a machine that has it).
    """
    chosen = os.environ.get(BWRAP_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "none", "off", "0") else shutil.which(chosen)
    return shutil.which("bwrap")


@dataclass(frozen=True)
class FileView:
    """What the sandbox's file system shows besides the system directories.

    Attributes:
        prefixes: interpreter installations, bound read-only.
        hidden: package directories inside them replaced by empty read-only ones.
        packages: package paths bound back into the hidden directories (allowed by name).
        sys_path: directories the sandboxed interpreter adds to ``sys.path`` (those of the packages).
    """

    prefixes: tuple[str, ...]
    hidden: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    sys_path: tuple[str, ...] = ()


def file_view(
    interpreter: Interpreter, packages: Sequence[str] = (), *, all_packages: bool = False
) -> FileView:
    """The view for ``interpreter``: every package directory hidden except ``packages``.

    Each name is a top-level importable name (``numpy``, ``sympy``); its
    directory (or module file), its compiled libraries (``numpy.libs``) and its
    metadata (``numpy-*.dist-info``) are shown. Dependencies must be named too.

    Raises:
        ValueError: a name is not installed for this interpreter.
    """
    if all_packages:
        return FileView(tuple(interpreter.prefixes))
    shown, path = [], []
    for name in packages:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not (spec.submodule_search_locations or spec.origin):
            raise ValueError(f"packages: {name!r} is not installed for {interpreter.executable}")
        location = list(spec.submodule_search_locations or [spec.origin])[0]
        site = os.path.dirname(os.path.realpath(location))
        shown.append(os.path.realpath(location))
        shown += glob.glob(os.path.join(site, f"{name}.libs"))
        shown += glob.glob(os.path.join(site, f"{name}-*.dist-info"))
        if site not in path:
            path.append(site)
    return FileView(tuple(interpreter.prefixes), tuple(interpreter.site_dirs()), tuple(shown), tuple(path))


def bwrap_supports(bwrap: str, flag: str) -> bool:
    """Whether this bubblewrap version knows ``flag`` (older ones lack ``--size``)."""
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out.stdout + out.stderr


def bwrap_args(
    bwrap: str,
    *,
    view: FileView,
    scratch: str,
    as_root: bool,
    disable_userns: bool,
) -> list[str]:
    """The bubblewrap command line that wraps one sandboxed process.

    The root is an empty read-only file system holding the system directories,
    a few files of /etc, the interpreter's installation with its package
    directories emptied (``view``), /dev, /proc, and the run's scratch directory.

    As root bubblewrap runs privileged (it can mount without a user namespace)
    and the launcher inside switches to the per-run uid, so only CAP_SETUID and
    CAP_SETGID are kept until then. Unprivileged, a user namespace maps the
    caller's uid and every capability is dropped.
    """
    args = [bwrap]
    for directory in SYSTEM_DIRS:
        if os.path.islink(directory):
            args += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            args += ["--ro-bind", directory, directory]
    for name in ETC_FILES:
        args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for prefix in view.prefixes:
        if any(_is_within(prefix, d) for d in SYSTEM_DIRS if not os.path.islink(d)):
            continue
        # bubblewrap would create the missing parents 0700; the sandbox uid
        # has to walk through them to reach the interpreter.
        for parent in reversed(Path(prefix).parents):
            if str(parent) != "/":
                args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    for hidden in view.hidden:
        args += ["--tmpfs", hidden]
    for shown in view.packages:
        args += ["--ro-bind", shown, shown]
    args += ["--bind", scratch, scratch]
    for directory in (*view.hidden, "/tmp", "/"):
        args += ["--remount-ro", directory]
    # No --chdir: the scratch directory belongs to the sandbox uid, which the
    # launcher switches to before entering it.
    args += ["--chdir", "/", "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try"]
    if as_root:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--cap-drop", "ALL"]
        if disable_userns:
            args += ["--disable-userns"]
    return args + ["--"]


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _uid_range() -> tuple[int, int]:
    """Usable [low, high) uids: the top of what this user namespace maps."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return _UID_BASE, _UID_BASE + (1 << 28)
    ranges = [(int(lines[i]), int(lines[i + 2])) for i in range(0, len(lines), 3)]
    inside, count = max(ranges, key=lambda r: r[1])
    if count >= _UID_BASE + (1 << 28):
        return _UID_BASE, _UID_BASE + (1 << 28)
    # A container maps a small range: take its upper half, away from system uids.
    low = inside + count // 2
    return max(low, inside + 1000), inside + count - 1


class UidAllocator:
    """Hands out a uid no other live sandbox uses.

    A uid of its own is what makes RLIMIT_NPROC a per-sandbox limit and lets
    the fallback mode kill every process a program left behind (all processes
    of that uid) without touching anyone else's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._low, self._high = _uid_range()
        self._next = 0

    def acquire(self) -> int:
        """A free uid for one run; release it with :meth:`release`.

        Slots are taken in turn rather than lowest first: processes a run left
        behind may count against its uid's process limit until the host's init
        reaps them, so a uid is reused as late as possible.
        """
        span = self._high - self._low
        base = (os.getpid() * _SLOTS_PER_PROCESS) % max(span - _SLOTS_PER_PROCESS, 1)
        with self._lock:
            for step in range(_SLOTS_PER_PROCESS):
                uid = self._low + base + (self._next + step) % _SLOTS_PER_PROCESS
                if uid not in self._busy:
                    self._busy.add(uid)
                    self._next = (self._next + step + 1) % _SLOTS_PER_PROCESS
                    return uid
        raise RuntimeError(f"more than {_SLOTS_PER_PROCESS} concurrent sandboxes in one process")

    def release(self, uid: int) -> None:
        """Return ``uid`` once none of its processes are alive."""
        with self._lock:
            self._busy.discard(uid)


def _proc_status(pid: str) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def pids_of_uid(uid: int) -> list[int]:
    """Live processes whose real uid is ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            uids = _proc_status(entry).get("Uid", "").split()
            if uids and int(uids[0]) == uid:
                found.append(int(entry))
    return found


def tasks_of_uid(uid: int) -> int:
    """Threads owned by ``uid``: what RLIMIT_NPROC counts against."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            status = _proc_status(entry)
            uids = status.get("Uid", "").split()
            if uids and int(uids[0]) == uid:
                total += int(status.get("Threads", "1"))
    return total


def find_setpriv() -> str | None:
    """Path of util-linux's setpriv, which changes uid and sets no_new_privs before exec."""
    return shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")


def as_uid(uid: int) -> tuple[list[str], dict]:
    """Argv prefix and Popen arguments that run a command as ``uid`` with no groups.

    Through setpriv when installed: Popen may then use vfork, where its own
    ``user=`` forces a full fork of the (possibly large) calling process.
    """
    setpriv = find_setpriv()
    if setpriv:
        prefix = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return prefix + ["--no-new-privs", "--"], {}
    return [], {"user": uid, "group": uid, "extra_groups": []}


def kill_uid(uid: int, rounds: int = 20) -> None:
    """SIGKILL every process of ``uid``.

    ``kill(-1)`` sent *as* that uid reaches all its processes in one kernel
    pass under the task-list lock, so a forking program cannot outrun it (a
    process with SIGKILL pending cannot finish a fork). Killing pid by pid from a
    /proc scan can be outrun, so it is only the fallback when no ``kill`` binary
    exists.
    """
    kill = shutil.which("kill", path="/usr/bin:/bin")
    if kill:
        prefix, kwargs = as_uid(uid)
        subprocess.run(
            prefix + [kill, "-KILL", "-1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            **kwargs,
        )
        return
    for _ in range(rounds):
        pids = pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def scrubbed_env(scratch: str, extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """The whole environment a sandboxed program sees: nothing from the host."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    env.update(extra)
    return env
