"""The client's own deadline on a database connection.

A frozen PostgreSQL (SIGSTOP, a stalled VM, a hung disk) enforces nothing: its
statement_timeout never fires, a cancel request is never answered, and its kernel
keeps ACKing, so TCP keepalives and tcp_user_timeout see a healthy peer. The
deadline must therefore be kept here. A watchdog thread shuts down the socket of
every connection still in use when its deadline passes; that wakes the thread
blocked in the driver with a connection error, and the connection, now broken,
is closed instead of going back to the pool.

A call's wait for a handler thread is counted too, while the database is failing
(PostgresDatabase): HandlerPool stamps each call with the moment gRPC handed it over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from time import monotonic
from typing import ParamSpec, TypeVar

from twofactor_server.domain.errors import StorageUnavailable

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
_call = threading.local()


class HandlerPool(ThreadPoolExecutor):
    """gRPC's handler threads. Each call runs knowing when it was handed to the pool (gRPC
    submits a call as it arrives), so a wait for a thread can be counted in its budget."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return super().submit(_run_stamped, monotonic(), fn, *args, **kwargs)


def _run_stamped(arrived: float, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    _call.arrived = arrived  # a handler thread runs nothing but calls: each one sets its own
    return fn(*args, **kwargs)


def deadline_while_failing(now: float, timeout: float, silent: bool) -> float:
    """The deadline of a unit of work while the database is failing, or StorageUnavailable at once.

    Calls queued for a handler thread behind calls waiting out a frozen database would each
    wait the whole timeout again, one pool's worth after another (40 calls on 8 threads: five
    timeouts). So the timeout counts from the call's arrival at the server; and once the
    probe found the database `silent` too, calls are answered at once, and no thread waits on
    it. Either way each caller hears within the timeout."""
    arrived: float | None = getattr(_call, "arrived", None)  # None: not a call (a background task)
    deadline = (now if arrived is None else min(arrived, now)) + timeout
    if silent or deadline <= now:  # (the wait for a thread took the whole budget)
        raise StorageUnavailable()
    return deadline


@dataclass(eq=False, slots=True)
class Watch:
    """One connection's socket and the moment it is abandoned."""

    fd: int
    deadline: float
    inode: int  # the socket's identity: a descriptor number is reused once its socket is closed
    expired: bool = False


class Watchdog:
    """Shuts down the sockets whose deadline passed; one thread, started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        # watch() and release() take the plain lock (a C call), not the Condition's Python methods:
        # they run around every statement.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._watched: set[Watch] = set()
        self._next_wake = float("inf")
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, fd: int, deadline: float, inode: int | None = None) -> Watch:
        """Start watching the socket `fd`: it is shut down at `deadline` unless released before.
        `inode` is the socket's (socket_inode), when the caller keeps it for the connection's life."""
        return self.rearm(Watch(fd, deadline, socket_inode(fd) if inode is None else inode), deadline)

    def rearm(self, watch: Watch, deadline: float) -> Watch:
        """Watch again, until `deadline`, a socket whose earlier watch was released and had not
        expired (a pooled connection keeps one Watch for its life: one object less per statement)."""
        with self._lock:
            watch.deadline = deadline
            watch.expired = False
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=f"{self._name}-deadlines", daemon=True)
                self._thread.start()
            self._watched.add(watch)
            if deadline < self._next_wake:
                self._cond.notify()
        return watch

    def release(self, watch: Watch) -> bool:
        """Stop watching; True when the deadline had passed (the socket is shut down: discard it)."""
        with self._lock:
            self._watched.discard(watch)
            return watch.expired

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = monotonic()
                for watch in [w for w in self._watched if w.deadline <= now]:
                    self._watched.discard(watch)
                    watch.expired = True
                    _shut_down(watch)
                self._next_wake = min((w.deadline for w in self._watched), default=float("inf"))
                self._cond.wait(None if self._next_wake == float("inf") else self._next_wake - now)


def socket_inode(fd: int) -> int:
    """The identity of the socket behind descriptor `fd` (-1: not an open descriptor, and
    the statement on it will fail by itself)."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1


def _shut_down(watch: Watch) -> None:
    """Wake whoever waits on the socket with an error; the file descriptor stays its owner's to close."""
    try:
        if os.fstat(watch.fd).st_ino != watch.inode:
            # Its socket was closed while watched, and the number now names another one: a
            # bug (every watch is released before its connection closes), never to be paid for
            # by whichever connection holds the number now.
            log.error("a deadline watch outlived its connection (descriptor %d reused); left alone", watch.fd)
            return
        # fromfd duplicates the descriptor: closing the duplicate leaves the driver's intact.
        with socket.fromfd(watch.fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError as error:  # already closed by its peer: nothing left to wake
        log.debug("shutting down a connection past its deadline: %s", error)
