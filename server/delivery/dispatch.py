"""How the server hands a committed challenge to delivery.

With a broker configured, a Celery task message carrying only the challenge
id goes to Redis, published by task name (the server never imports the worker
package): one LPUSH of the message Celery would write (task_queue.py), on a Redis
connection each thread keeps. The embedded default runs the
same delivery code on a thread pool inside the server.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeAlias, cast

import redis

from twofactor_server.delivery.deliverer import Deliverer
from twofactor_server.delivery.providers import EmailSender, SmsSender, build_email_sender, build_sms_sender
from twofactor_server.delivery.recovery import OutboxRecovery, report_oldest_waiting
from twofactor_server.delivery.task_queue import deliver_message, redis_bulk
from twofactor_server.domain.clock import Clock, system_clock
from twofactor_server.domain.errors import Unavailable
from twofactor_server.domain.keyring import Keyring
from twofactor_server.observability import logs
from twofactor_server.periodic import Periodic
from twofactor_server.setting_values import mask_url
from twofactor_server.settings import Settings
from twofactor_server.storage.database import Database

log = logging.getLogger(__name__)


class _KeptConnection(Protocol):
    """What the dispatcher uses of a redis-py connection (its methods carry no annotations)."""

    def send_packed_command(self, command: list[bytes]) -> None: ...

    def read_response(self) -> Any: ...

    def disconnect(self) -> None: ...


class CeleryDispatcher:
    """Publishes the Celery deliver task to the Redis broker, by name, without Celery.

    Each thread keeps one Redis connection of its own and sends its LPUSH on it directly:
    redis-py's client checks a connection out of its pool and back for every command
    (locks, a readability poll, retry and metrics wrappers), about 3 times the CPU of
    the LPUSH itself (docs/benchmarks.md, SendCode).
    """

    def __init__(self, settings: Settings) -> None:
        timeout = settings.broker_timeout_seconds
        # Publishing fails fast: a kept connection the broker dropped is replaced once, at
        # once; a broker that does not answer within the timeout is UNAVAILABLE for the RPC.
        self._pool = redis.ConnectionPool.from_url(
            settings.broker_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._queue = settings.delivery_queue
        self._masked_url = mask_url(settings.broker_url)
        # LPUSH <queue> <message> in Redis's protocol up to the message's length: written once,
        # where redis-py's packer would encode the whole command again for every publish.
        self._lpush_head = b"*3\r\n" + redis_bulk(b"LPUSH") + redis_bulk(self._queue.encode())
        self._kept = threading.local()
        self._connections: list[_KeptConnection] = []  # every thread's, for close()
        self._lock = threading.Lock()

    def dispatch(self, challenge_id: str, generation: int = 0, *, method: str = "") -> None:
        """Queue the delivery (every channel on the one queue: a worker's task time limit keeps
        a hung send from holding its process)."""
        message = deliver_message(challenge_id, generation, self._queue)
        try:
            try:
                self._lpush(message)
            except (redis.ConnectionError, OSError) as error:
                if isinstance(error, TimeoutError):
                    raise  # no answer within the timeout: another try would wait as long again
                self._lpush(message)  # once more, on a new connection: the kept one was dropped
        except (redis.RedisError, OSError) as error:
            # PING may still answer (a Redis out of memory, without its replicas, or whose snapshot
            # failed refuses writes only): this line says what Redis said (health's next write
            # probe turns twofactor.v1.Delivery NOT_SERVING).
            log.warning(
                "could not queue delivery of %s: the delivery broker at %s refused it (%s: %s); codes "
                "can't be sent (BROKER_UNAVAILABLE) until it takes writes again: check that Redis is "
                "running and writable (memory, disk, replicas) and TWOFACTOR_BROKER_URL points at it",
                challenge_id,
                self._masked_url,
                type(error).__name__,
                logs.said(error),
            )
            raise Unavailable(
                "BROKER_UNAVAILABLE", "the delivery queue can't be reached; retry later", retry_after=1.0
            ) from None

    def _lpush(self, message: bytes) -> None:
        connection = self._connection()
        try:
            connection.send_packed_command([self._lpush_head + redis_bulk(message)])
            connection.read_response()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            # Its state is unknown (a reply may still come): the next command connects afresh.
            connection.disconnect()
            raise

    def _connection(self) -> _KeptConnection:
        """This thread's connection (connected on first use; a forked child makes its own)."""
        kept: tuple[int, _KeptConnection] | None = getattr(self._kept, "connection", None)
        if kept is not None and kept[0] == os.getpid():
            return kept[1]
        connection = cast(_KeptConnection, self._pool.make_connection())
        self._kept.connection = (os.getpid(), connection)
        with self._lock:
            self._connections.append(connection)
        return connection

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.disconnect()
        self._pool.disconnect()


class InProcessDispatcher:
    """The embedded default: deliveries run on small thread pools, retries on timers.

    Texts have a pool of their own: a thread can't be stopped, so a gateway that never
    answers holds its threads until the process ends, and it must not hold the emails'.
    Nothing here has to survive a crash: a delivery dropped by a crash or a
    shutdown is still in the outbox, and recovery publishes it again.
    """

    def __init__(self, deliverer: Deliverer, workers: int = 4, sms_workers: int = 2) -> None:
        self._deliverer = deliverer
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delivery")
        self._sms_pool = ThreadPoolExecutor(max_workers=sms_workers, thread_name_prefix="delivery-sms")
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._closed = False

    def dispatch(self, challenge_id: str, generation: int = 0, *, method: str = "") -> None:
        try:
            self._pool_for(method).submit(self._run, challenge_id, generation, 0, method)
        except RuntimeError:  # shut down: recovery publishes it at the next start
            log.info("delivery of %s left to recovery: shutting down", challenge_id)

    def _pool_for(self, method: str) -> ThreadPoolExecutor:
        return self._sms_pool if method == "sms" else self._pool

    def _run(self, challenge_id: str, generation: int, tries: int, method: str = "") -> None:
        try:
            outcome = self._deliverer.deliver(challenge_id, generation, tries=tries)
        except Exception:
            log.exception("delivery of %s crashed; recovery will publish it again", challenge_id)
            return
        if outcome.retry_in is not None:
            with self._lock:
                if self._closed:
                    return
                timer = threading.Timer(
                    outcome.retry_in,
                    self._retry,
                    args=(challenge_id, outcome.retry_generation, tries + 1, method),
                )
                timer.daemon = True
                self._timers.add(timer)
                timer.start()

    def _retry(self, challenge_id: str, generation: int, tries: int, method: str) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
            if self._closed:
                return
            try:
                self._pool_for(method).submit(self._run, challenge_id, generation, tries, method)
            except RuntimeError:
                return

    def close(self) -> None:
        """Stop: the deliveries still waiting for a thread stay in the outbox, and recovery
        publishes them at the next start. Waiting for each would make a stop last the backlog
        times the provider's timeout; an attempt already under way ends within that timeout."""
        with self._lock:
            self._closed = True
            for timer in self._timers:
                timer.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sms_pool.shutdown(wait=True, cancel_futures=True)


Senders: TypeAlias = "tuple[EmailSender, SmsSender]"


def build_senders(settings: Settings) -> Senders:
    """The configured email and SMS senders; ProviderConfigError for a provider setting that
    can't work (an SMS class that doesn't import, console delivery with PostgreSQL)."""
    return build_email_sender(settings), build_sms_sender(settings)


def build_deliverer(
    settings: Settings,
    *,
    db: Database,
    keyring: Keyring,
    clock: Clock = system_clock,
    senders: Senders | None = None,
) -> Deliverer:
    """The delivery core as configured: providers (`senders`, built here when not given), retry
    backoff, lease, recovery interval."""
    email, sms = senders or build_senders(settings)
    return Deliverer(
        db,
        keyring,
        email,
        sms,
        issuer=settings.policy.issuer,
        retry_base_seconds=settings.delivery_retry_base_seconds,
        lease_seconds=settings.delivery_lease_seconds,
        recovery_seconds=settings.outbox_recovery_seconds,
        clock=clock,
    )


def build_dispatcher(
    settings: Settings,
    *,
    db: Database,
    keyring: Keyring,
    clock: Clock = system_clock,
    senders: Senders | None = None,
) -> tuple[CeleryDispatcher | InProcessDispatcher, Callable[[], None]]:
    """The dispatcher and its close function.

    With a broker, the workers run outbox recovery, and this server only reports how long the
    oldest code has waited (every half recovery interval). In-process, this server runs
    recovery: a round at once, then every half recovery interval, stopped by the close function.
    """
    # Built in both modes so a bad provider setting (say, an SMS class that
    # doesn't import) stops the server at start rather than at the first send.
    deliverer = build_deliverer(settings, db=db, keyring=keyring, clock=clock, senders=senders)
    if settings.broker_url:
        celery_dispatcher = CeleryDispatcher(settings)
        watch = Periodic(
            "outbox-watch", settings.outbox_recovery_seconds / 2, lambda: report_oldest_waiting(db, clock)
        )
        watch.start()

        def close_queue() -> None:
            watch.stop()
            celery_dispatcher.close()

        return celery_dispatcher, close_queue
    dispatcher = InProcessDispatcher(deliverer)
    recovery = OutboxRecovery(
        db, dispatcher.dispatch, recovery_seconds=settings.outbox_recovery_seconds, clock=clock
    )
    recovery.start()

    def close() -> None:
        recovery.stop()
        dispatcher.close()

    return dispatcher, close
