"""Feeding and draining a child's pipes under limits, for the sandbox's run loop."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time

# How long a process that has exited may keep its pipes open (through a
# descendant) before the run stops listening.
_GRACE_S = 0.2


class Pump:
    """Feeds the child's input pipes and drains its output pipes without threads.

    Readers are capped: past its cap a stream stops the run (``exceeded``),
    since a program flooding output would otherwise only stop at the deadline.
    """

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.selector = selectors.DefaultSelector()
        self.data: dict[str, bytearray] = {}
        self.caps: dict[str, int] = {}
        self.timed_out = False
        self.exceeded = False
        self._closers: list = []

    def add_writer(self, stream, data: bytes) -> None:
        # Streams, not bare descriptors: closing twice is then harmless, where a
        # second os.close() could hit a descriptor another thread just opened.
        os.set_blocking(stream.fileno(), False)
        self._closers.append(stream)
        if not data:
            stream.close()
            return
        self.selector.register(stream.fileno(), selectors.EVENT_WRITE, (memoryview(data), stream))

    def add_reader(self, name: str, stream, cap: int) -> None:
        self.data[name] = bytearray()
        self.caps[name] = cap
        self._closers.append(stream)
        self.selector.register(stream.fileno(), selectors.EVENT_READ, (name, stream))

    def run(self, deadline: float) -> None:
        """Service pipes until the process is done, a cap trips or ``deadline`` passes."""
        exited_at = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.timed_out = True
                return
            if exited_at is None and _exited(self.proc.pid):
                exited_at = now
            if exited_at is not None and not self.selector.get_map():
                return
            # A program that exits but leaves a descendant holding its pipes
            # open must not hold the caller until the deadline.
            if exited_at is not None and now - exited_at > _GRACE_S:
                return
            timeout = min(deadline - now, 0.05)
            if not self.selector.get_map():
                time.sleep(min(timeout, 0.01))
                continue
            for key, _ in self.selector.select(timeout):
                if not self._service(key):
                    return

    def _service(self, key) -> bool:
        if key.events & selectors.EVENT_WRITE:
            view, stream = key.data
            try:
                written = os.write(key.fd, view[: 1 << 16])
            except (BrokenPipeError, BlockingIOError) as err:
                if isinstance(err, BlockingIOError):
                    return True
                written = len(view)
            view = view[written:]
            if view:
                self.selector.modify(key.fd, selectors.EVENT_WRITE, (view, stream))
            else:
                self.selector.unregister(key.fd)
                stream.close()
            return True
        name, stream = key.data
        chunk = os.read(key.fd, 1 << 16)
        if not chunk:
            self.selector.unregister(key.fd)
            return True
        buffer = self.data[name]
        room = self.caps[name] - len(buffer)
        buffer += chunk[:room]
        if len(chunk) > room:
            self.exceeded = True
            return False
        return True

    def stop(self) -> None:
        """Kill the process group (while the leader's pid still reserves it), reap, close."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for key in list(self.selector.get_map().values()):
            self.selector.unregister(key.fd)
        self.selector.close()
        for stream in self._closers:
            try:
                stream.close()
            except OSError:
                pass


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its pid keeps the group id reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None
