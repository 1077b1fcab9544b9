"""The idle fork servers of one sandbox: one is taken per run and given back after it."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from multiprocessing.util import Finalize

from verifiers.sandbox._servers import ForkServer


class ServerPool:
    """Idle fork servers of one sandbox: one is taken per run and given back after it.

    As many servers exist as runs ever went on at once. A dead or spent server is
    closed and a new one started on the next take. After ``fork()`` the child
    process forgets the parent's servers (they keep serving the parent).
    """

    def __init__(self, start: Callable[[], ForkServer]) -> None:
        self._start = start
        self._idle: list[ForkServer] = []
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._live: weakref.WeakSet[ForkServer] = weakref.WeakSet()
        self.started = 0
        # At exit (also of a multiprocessing worker, which skips atexit) or when
        # collected; never in a forked child, whose servers are the parent's.
        Finalize(self, _close_all, args=(self._idle,), exitpriority=1)
        _POOLS.add(self)

    def take(self) -> ForkServer:
        """An idle live server, or a newly started one."""
        with self._lock:
            if os.getpid() != self._owner_pid:
                self.forget()
            while self._idle:
                server = self._idle.pop()
                if server.alive:
                    return server
                server.close()
        server = self._start()
        with self._lock:
            self.started += 1
            self._live.add(server)
        return server

    def live(self) -> list[ForkServer]:
        """Servers started by this pool that have not been closed (idle or serving a run)."""
        with self._lock:
            return [server for server in self._live if not server.spent]

    def give_back(self, server: ForkServer) -> None:
        """Keep ``server`` for the next run, or close it when it cannot serve one."""
        with self._lock:
            if server.alive and os.getpid() == self._owner_pid:
                self._idle.append(server)
                return
        server.close()

    def close(self) -> None:
        """Stop every idle server."""
        with self._lock:
            servers = list(self._idle)
            self._idle.clear()
        _close_all(servers)

    def forget(self) -> None:
        """In a forked child: drop the parent's servers without disturbing them."""
        for server in self._idle:
            server.forget()
        self._idle.clear()
        self._live = weakref.WeakSet()
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()


_POOLS: weakref.WeakSet[ServerPool] = weakref.WeakSet()


def _close_all(servers: list[ForkServer]) -> None:
    for server in list(servers):
        server.close()
    servers.clear()


def _forget_in_child() -> None:
    for pool in list(_POOLS):
        pool.forget()


os.register_at_fork(after_in_child=_forget_in_child)
