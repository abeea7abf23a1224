"""The worker stops taking delivery tasks while its storage is down, and takes them again when
it answers: a task it can't run would only be retried, and the broker keeps it safer meanwhile.

A consumer bootstep in the worker's main process: a thread pings the database every
TWOFACTOR_STORAGE_PROBE_SECONDS (within the storage timeout), and a timer on the consumer's
own loop cancels or resumes consuming the delivery queue when the answer changes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from celery import bootsteps

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.settings import Settings
from twofactor_server.storage.database import Database, open_database

log = logging.getLogger(__name__)


class StorageProbe:
    """Whether the database answered its last ping; pings on a thread of its own."""

    def __init__(self, db: Database, interval: float) -> None:
        self._db = db
        self._interval = interval
        self.available = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storage-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._db.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._db.ping()
                self.available = True
            except StorageUnavailable:
                self.available = False
            self._stop.wait(self._interval)


class StoragePause(bootsteps.StartStopStep):  # type: ignore[misc]
    requires: ClassVar[frozenset[str]] = frozenset({"celery.worker.consumer.tasks:Tasks"})

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._settings = Settings.from_env()
        self._probe: StorageProbe | None = None
        self._timer: Any = None
        self._paused = False
        self._announced = False  # the pause logged (after the last receive in flight returned)

    def start(self, c: Any) -> None:
        settings = self._settings
        db = open_database(
            settings.database_url,
            data_dir=settings.data_dir,
            pool_size=1,
            timeout=settings.storage_timeout_seconds,
        )
        self._probe = StorageProbe(db, settings.storage_probe_seconds)
        self._probe.start()
        self._timer = c.timer.call_repeatedly(settings.storage_probe_seconds / 2, self._follow, (c,))

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._probe is not None:
            self._probe.stop()

    def _follow(self, c: Any) -> None:
        """On the consumer's loop: consume the delivery queue only while storage answers."""
        assert self._probe is not None
        queue = self._settings.delivery_queue
        if not self._probe.available and not self._paused:
            c.cancel_task_queue(queue)
            self._paused = True
            self._announced = False
        elif self._probe.available and self._paused:
            c.add_task_queue(queue)
            self._paused = False
            if self._announced:
                log.warning("storage answers again: taking delivery tasks from %s", queue)
        if self._paused and not self._announced and not _receiving(c):
            # Said once no receive is in flight: a BRPOP sent before the cancel can still
            # return a message for up to its timeout (kombu then puts it back in the queue).
            self._announced = True
            log.warning("storage unavailable: not taking delivery tasks from %s until it answers", queue)


def _receiving(c: Any) -> bool:
    """Whether the consumer's channel waits on a receive (a Redis BRPOP) sent earlier."""
    channel = getattr(c.task_consumer, "channel", None)
    return bool(getattr(channel, "_in_poll", False))  # kombu's Redis channel; other brokers: never
