"""What the two ways of starting a run share: the sandbox's setup, a run's outcome, scratch removal.

A run starts either as a fresh interpreter (``_fresh.py``) or as a child of a
pre-started fork server (``_servers.py``); both read the same :class:`Setup`
and hand back an :class:`Outcome`, which ``sandbox.py`` turns into the public
``SandboxResult``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.util import Finalize

from verifiers.sandbox import _isolation as iso


@dataclass(frozen=True)
class Setup:
    """How one sandbox starts its runs.

    Attributes:
        interpreter: the Python that runs sandboxed programs.
        flags: its command-line flags (``-I -B``, and ``-S`` without site packages).
        bwrap: path of bubblewrap, or None for the process-limits fallback.
        as_root: the caller is root (bubblewrap runs privileged; uids can switch).
        uids: hands out a uid per run, or None when runs keep the caller's uid.
        seccomp: the syscall filter bubblewrap installs, or None.
        scratch_root: where scratch directories are made.
        trash: removes scratch directories after runs.
        nproc_base: threads the caller's uid already runs (RLIMIT_NPROC counts them).
        view: what the file system shows inside bubblewrap.
        sys_path: directories sandboxed Python adds to ``sys.path`` (allowed
            packages); ``{prefix}`` stands for the interpreter's own prefix.
        preload: trusted modules every fork server imports before serving
            (marshalled ``[(name, code or source)]``), or empty.
        pair_entry: source a fork server runs in the program's process of a
            paired run (the test harness's), or empty.
    """

    interpreter: iso.Interpreter
    flags: tuple[str, ...]
    bwrap: str | None
    as_root: bool
    uids: iso.UidAllocator | None
    seccomp: bytes | None
    scratch_root: str
    trash: Trash
    nproc_base: Callable[[], int]
    view: iso.FileView
    sys_path: tuple[str, ...] = ()
    preload: bytes = b""
    pair_entry: str = ""


@dataclass(frozen=True)
class Outcome:
    """What one run produced, before the sandbox adds its timing and layers.

    ``server_died`` is set when the fork server running it went away mid-run.
    """

    returncode: int | None
    stdout: bytes
    stderr: bytes
    report: bytes
    timed_out: bool
    output_exceeded: bool
    server_died: bool = False


class Trash:
    """Removes scratch directories off the runs' critical path.

    A directory is renamed at once into a private directory that no run can
    reach (a cheap metadata change), and deleted there by a background thread:
    on some file systems each ``rmdir`` waits milliseconds for the disk.
    """

    def __init__(self, parent: str) -> None:
        self.path = tempfile.mkdtemp(prefix="ouroboros-sandbox-trash-", dir=parent)
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._count = 0
        self._busy = False
        self._thread: threading.Thread | None = None
        # Run when the trash is collected or the process exits, including a
        # multiprocessing worker (which skips atexit), and never in a forked child.
        Finalize(self, shutil.rmtree, args=(self.path, True), exitpriority=0)
        _TRASHES.add(self)

    def discard(self, directory: str) -> None:
        """Make ``directory`` unreachable now and delete it soon."""
        with self._cond:
            self._count += 1
            target = os.path.join(self.path, f"{os.getpid()}-{self._count}")
            try:
                os.rename(directory, target)
            except OSError:
                target = directory  # on another file system: deleted where it is
            self._pending.append(target)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=_empty_trash, args=(weakref.ref(self),), name="sandbox-trash", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until everything discarded so far is deleted."""
        with self._cond:
            while self._pending or self._busy:
                self._cond.wait(0.05)

    def _next_batch(self, timeout: float) -> list[str]:
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            if not self._pending:
                self._cond.wait(timeout)
            batch, self._pending = self._pending, []
            self._busy = bool(batch)
            return batch

    def _after_fork(self) -> None:
        # The parent's thread, lock holders and pending list stay with the parent.
        self._cond = threading.Condition()
        self._pending, self._busy, self._thread = [], False, None


_TRASHES: weakref.WeakSet[Trash] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [trash._after_fork() for trash in list(_TRASHES)])


def _empty_trash(ref: weakref.ref[Trash]) -> None:
    # A weak reference, so that a sandbox nobody uses any more can be collected
    # (its finalizer then removes the trash directory itself).
    while (trash := ref()) is not None:
        batch = trash._next_batch(1.0)
        del trash
        for directory in batch:
            shutil.rmtree(directory, ignore_errors=True)
