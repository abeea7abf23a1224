"""gRPC health that reflects the storage: NOT_SERVING while the database does not answer,
SERVING again as soon as it does, without a restart.

A probe thread runs one round trip (`Database.ping`, bounded by the storage timeout)
every TWOFACTOR_STORAGE_PROBE_SECONDS, and at once when a call has just found the
storage unavailable. The health service itself only reads the last status, so it
answers while the database is frozen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.observability import logs, metrics
from twofactor_server.storage.database import Database

log = logging.getLogger(__name__)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
Send = Callable[[Any], None]  # a Watch's send_response_callback (grpcio's non-blocking streams)
# Watches need no token, so what they may hold is bounded: the open ones per process (gRPC's
# client-side health checking keeps one per client connection: a large fleet's worth), and the
# name each is kept under (a fully qualified service name is far shorter).
MAX_WATCHES = 10_000
MAX_SERVICE_NAME = 256


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: Check and Watch answer the statuses that `set` gives, with
    grpc_health's behaviour (NOT_FOUND and SERVICE_UNKNOWN for a name never set; after
    `enter_graceful_shutdown` every name NOT_SERVING for good), written here for two reasons.

    Sends never happen under the lock that a Watch's end takes. grpc_health's servicer sent
    each update while holding its lock; a send waits for gRPC's polling thread, and when that
    thread was ending a Watch whose client had left, it waited for the same lock: neither went
    on, and the server answered no call again (`stop()`, whose NOT_SERVING goes to every
    watcher, hung there). Here `_lock` guards the table only; `_sending` keeps updates in
    order, and gRPC's thread never takes it.

    Check answers on threads of its own. With the database frozen, every handler thread may
    wait out the storage timeout, and more calls queue behind them: a Check queued there
    passed its deadline, and a liveness probe took a live server for dead. As many threads as
    the handler pool: a Check costs what it cost there (fewer threads contend less for the
    GIL, and the empty call that `make bench` measures Verify against would get cheaper by the
    pool's shape, not by the work). grpcio runs a handler on the pool its
    `experimental_thread_pool` names; the monitoring interceptor keeps it.

    Watch needs no token: at most `max_watches` are open at once (one more is
    RESOURCE_EXHAUSTED; Check is never refused), a name leaves the table with its last
    watcher, and a name longer than MAX_SERVICE_NAME, which no service has, is answered
    SERVICE_UNKNOWN and ended at once (before, every name watched stayed in the table for
    good, whatever its length). A stop ends the Watches of every name, unknown ones too."""

    def __init__(self, threads: int, max_watches: int = MAX_WATCHES) -> None:
        self._lock = threading.Lock()  # the statuses and the watchers
        self._sending = threading.Lock()  # one update at a time, in order, to every watcher
        self._status: dict[str, int] = {"": SERVING}
        self._watchers: dict[str, set[Send]] = {}
        self._watches = 0  # open Watches, every name
        self._max_watches = max_watches
        self._refusals = logs.EveryMinute()  # refused Watches: they need no token
        self._shutting_down = False
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="health")
        check = self._check

        def on_own_threads(request: Any, context: grpc.ServicerContext) -> Any:
            return check(request, context)

        on_own_threads.experimental_thread_pool = self._threads  # type: ignore[attr-defined]
        self.Check = on_own_threads  # type: ignore[method-assign]  # what add_HealthServicer_to_server takes

    def _check(self, request: Any, context: grpc.ServicerContext) -> Any:
        status = self._status.get(request.service)  # one dict read: atomic, no lock needed
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Every service's status, as Check answers each (the base class only raised, logging
        an ERROR with a traceback for any caller, token or not)."""
        statuses = dict(self._status)  # a copy: one call, atomic, no lock needed
        return health_pb2.HealthListResponse(  # type: ignore[attr-defined]  # the stubs predate List
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()
            }
        )

    # The generated base class has no callback: grpcio passes one to a non-blocking handler.
    def Watch(self, request: Any, context: grpc.ServicerContext, send_response_callback: Send) -> None:  # type: ignore[override]
        service = request.service
        with self._sending:
            with self._lock:
                status = self._status.get(service, SERVICE_UNKNOWN)
                ending = self._shutting_down or len(service) > MAX_SERVICE_NAME
                full = not ending and self._watches >= self._max_watches
                if not ending and not full:
                    self._watchers.setdefault(service, set()).add(send_response_callback)
                    self._watches += 1
            if full:
                if count := self._refusals.count():
                    log.warning(
                        "refused %d health Watch(es) in the last minute: %d are open, the most at once "
                        "(clients should use Check, or one Watch per connection)",
                        count,
                        self._max_watches,
                    )
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._max_watches} health Watches are open on this server, the most at once; "
                    "use Check, or retry later",
                )
            if not ending:
                context.add_callback(lambda: self._forget(service, send_response_callback))
            send_response_callback(health_pb2.HealthCheckResponse(status=status))
            if ending:
                send_response_callback(None)  # ends the stream: a drain waits for no watcher

    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]  # answered by callbacks

    def _forget(self, service: str, send: Send) -> None:
        """A Watch ended (its client left, or the server stopped): on gRPC's thread, briefly."""
        with self._lock:
            watchers = self._watchers.get(service)
            if watchers is not None and send in watchers:
                watchers.discard(send)
                self._watches -= 1
                if not watchers:
                    del self._watchers[service]

    def watched_names(self) -> set[str]:
        """The names with an open Watch."""
        with self._lock:
            return set(self._watchers)

    def set(self, service: str, status: int) -> None:
        with self._sending:
            with self._lock:
                if self._shutting_down:
                    return
                self._status[service] = status
                watchers = list(self._watchers.get(service, ()))
            for send in watchers:
                send(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self) -> None:
        """Every name NOT_SERVING, told to every watcher; later `set`s change nothing."""
        with self._sending:
            with self._lock:
                if self._shutting_down:
                    return
                self._shutting_down = True
                self._status = dict.fromkeys(self._status, NOT_SERVING)
                watchers = [
                    (name in self._status, send) for name, sends in self._watchers.items() for send in sends
                ]
            for known, send in watchers:
                if known:  # a name no service has stays SERVICE_UNKNOWN: its Watch just ends
                    send(health_pb2.HealthCheckResponse(status=NOT_SERVING))
                # Then end each stream (grpcio's None): an open Watch, as client-side health
                # checking keeps one, would otherwise hold the drain for the whole grace period.
                send(None)

    def close(self) -> None:
        self._threads.shutdown(wait=False)


class StorageHealth:
    """Keeps the health status of `services` (and of the server, "") in step with the storage."""

    def __init__(
        self, db: Database, servicer: HealthServicer, services: tuple[str, ...], interval: float
    ) -> None:
        self._db = db
        self._servicer = servicer
        self._services = (*services, "")
        self._interval = interval
        self._serving: bool | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-health", daemon=True)

    @property
    def serving(self) -> bool:
        return bool(self._serving)

    def start(self) -> None:
        """SERVING (the storage answered the migrations a moment ago), then probe in the background."""
        self._set(serving=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._db.unavailable.set()  # wakes the probe
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def check(self) -> bool:
        """Probe the storage once and publish the result; True when it answered."""
        try:
            self._db.ping()
        except StorageUnavailable:
            answered = False
        except Exception:  # a bug in the probe must not stop it, nor claim the storage is fine
            log.exception("the storage health probe failed")
            answered = False
        else:
            answered = True
        if not self._stopping.is_set():
            self._set(serving=answered)
        return answered

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._db.unavailable.wait(self._interval)
            self._db.unavailable.clear()
            if self._stopping.is_set():
                return
            self.check()

    def _set(self, *, serving: bool) -> None:
        if serving == self._serving:
            return
        if self._serving is not None:
            if serving:
                log.warning("the database answers again: health is SERVING")
            else:
                log.warning(
                    "the database does not answer: health is NOT_SERVING and calls get "
                    "UNAVAILABLE (STORAGE_UNAVAILABLE) until it does; check that it is running"
                )
        self._serving = serving
        metrics.storage_reachable(serving)
        for name in self._services:
            self._servicer.set(name, SERVING if serving else NOT_SERVING)
