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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from grpc_health.v1 import health, health_pb2

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.observability import metrics
from twofactor_server.storage.database import Database

log = logging.getLogger(__name__)


class HealthServicer(health.HealthServicer):
    """grpc_health's servicer, whose Check answers on threads of its own.

    With the database frozen, every handler thread may wait out the storage timeout, and more
    calls queue behind them: a Check queued there passed its deadline, and a liveness probe
    took a live server for dead (a restart then lost the calls in flight). Check only reads a
    status in memory. As many threads as the handler pool: a Check costs what it cost there
    (fewer threads contend less for the GIL, and the empty call that `make bench` measures
    Verify against would get cheaper by the pool's shape, not by the work). (grpcio runs a
    handler on the pool its `experimental_thread_pool` names; the monitoring interceptor
    keeps it.)"""

    def __init__(self, threads: int) -> None:
        super().__init__()
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="health")
        check = super().Check

        def on_own_threads(request: Any, context: Any) -> Any:
            return check(request, context)

        on_own_threads.experimental_thread_pool = self._threads  # type: ignore[attr-defined]
        self.Check = on_own_threads  # type: ignore[method-assign]  # what add_HealthServicer_to_server takes

    def close(self) -> None:
        self._threads.shutdown(wait=False)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StorageHealth:
    """Keeps the health status of `services` (and of the server, "") in step with the storage."""

    def __init__(
        self, db: Database, servicer: health.HealthServicer, services: tuple[str, ...], interval: float
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
