"""Outbox recovery: publish again every delivery whose message may be lost.

The database can't tell a lost message from one still waiting in a long queue,
so a republish moves the row to a new generation. Until an attempt is made, a
message of any generation up to the row's claims it (when only the newest could,
a queue slower to drain than R held only stale messages, and every code in it
expired unsent); after one, only the newest generation's does, so a retry chain
that a republish replaced ends there. Republishing never multiplies sends, nor
retry chains. Each republish of a
row waits as long as the row has waited since its first publish before the next
(between R and 32 R), so a long queue is not flooded with copies faster than it
drains; a publish that failed makes the row due again at once. Each worker and
the embedded server run this loop; no process is special. On PostgreSQL the
rows are taken FOR UPDATE SKIP LOCKED, so concurrent recoverers split the work;
SQLite's transactions are serialized anyway.

What a round does, with R = TWOFACTOR_OUTBOX_RECOVERY_SECONDS:
- a row never published R after it was created (the server died between commit
  and publish; its caller got no answer): published, then live;
- a published row still queued R after its publish or after its retry was due
  (the broker lost it, or it waits in a long queue): published again, and again
  after 2 R, 4 R, ... while it stays queued;
- a 'sending' row whose lease ran out (its worker died): published again;
- a queued or abandoned row whose code expired: EXPIRED, code wiped.
Rounds run at start and every R/2, so a lost code is back in the queue within
about 1.5 R.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Protocol

from twofactor_server.domain.clock import Clock, now_ms, system_clock
from twofactor_server.domain.errors import StorageUnavailable, Unavailable
from twofactor_server.observability import metrics
from twofactor_server.storage import outbox, outbox_recovery
from twofactor_server.storage.database import Database

log = logging.getLogger(__name__)
# Jitter from a generator of our own: the global one belongs to the embedding program (and tests).
_jitter = random.Random()  # noqa: S311 - jitter, not a secret


class Publish(Protocol):
    def __call__(self, challenge_id: str, generation: int, *, method: str) -> None:
        """Publish the delivery again (`method`: its channel); raise Unavailable when the queue
        can't be reached."""


BATCH = 200


class OutboxRecovery:
    def __init__(
        self, db: Database, publish: Publish, *, recovery_seconds: float, clock: Clock = system_clock
    ) -> None:
        self._db = db
        self._publish = publish
        self._recovery_ms = int(recovery_seconds * 1000)
        self._interval = recovery_seconds / 2
        self._clock = clock
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """One round; returns how many deliveries were published again."""
        now = now_ms(self._clock)
        stale_before = now - self._recovery_ms
        with self._db.transaction() as tx:
            expired = outbox_recovery.expire_undelivered(tx, now)
            oldest = outbox_recovery.oldest_waiting_created_at(tx)
            # A worker took these though the server died before recording the publish.
            claimed = outbox_recovery.claimed_but_unpublished(tx, created_before=stale_before, limit=BATCH)
        for challenge in claimed:
            # One transaction each: a publish locks its user's row before the user's codes
            # (as SendCode does), so it must hold no other user's row or code meanwhile.
            with self._db.transaction() as tx:
                outbox.mark_published(tx, challenge, now)
        metrics.outbox_oldest_queued(0 if oldest is None else (now - oldest) / 1000)
        if expired:
            for method in expired:
                metrics.outbox_expired(method)
            log.warning(
                "outbox recovery: %d code(s) expired before any delivery sent them (their users can "
                "ask for another); is a worker running and reaching the broker?",
                len(expired),
            )
        republished = 0
        try:
            while not self._stopped.is_set():
                with self._db.transaction() as tx:
                    taken = outbox_recovery.take_for_republish(
                        tx, now, stale_before=stale_before, interval_ms=self._recovery_ms, limit=BATCH
                    )
                for index, challenge in enumerate(taken):
                    try:
                        generation = challenge.publish_generation
                        self._publish(challenge.challenge_id, generation, method=challenge.method)
                    except Unavailable:
                        # Not in the queue: this row and the batch's rest are due again at the next
                        # round (the wait after a republish is for messages that may be only late).
                        with self._db.transaction() as tx:
                            outbox_recovery.due_again(tx, [c.challenge_id for c in taken[index:]], now)
                        raise
                    republished += 1  # in the queue, whatever happens to the rest of the round
                    if challenge.published_at is None:
                        with self._db.transaction() as tx:
                            outbox.mark_published(tx, challenge, now_ms(self._clock))
                if len(taken) < BATCH:
                    break
        finally:  # a round the broker or the database ended midway counts what it published
            if republished:
                metrics.outbox_republished(republished)
                log.warning(
                    "outbox recovery: published %d delivery(ies) again (lost message, dead worker or server)",
                    republished,
                )
        return republished

    def start(self) -> None:
        """Run rounds on a daemon thread: one now, then every half recovery interval."""
        self._thread = threading.Thread(target=self._loop, name="outbox-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.run_once()
            except StorageUnavailable:
                log.warning("outbox recovery: storage unavailable; trying again in %.1fs", self._interval)
            except Unavailable as error:
                log.warning("outbox recovery: %s; trying again in %.1fs", error, self._interval)
            except Exception:
                log.exception("outbox recovery round failed; trying again in %.1fs", self._interval)
            # Jitter spreads the rounds of many workers.
            self._stopped.wait(self._interval * _jitter.uniform(0.8, 1.2))


def report_oldest_waiting(db: Database, clock: Clock = system_clock) -> None:
    """Set twofactor_outbox_oldest_queued_seconds from the database, reading only. With a broker
    the workers run recovery (and set it too); without this, a fleet with no worker running left
    the server's gauge at 0 while codes waited, and "deliveries are stuck" never fired."""
    with db.transaction() as tx:
        oldest = outbox_recovery.oldest_waiting_created_at(tx)
    now = now_ms(clock)
    metrics.outbox_oldest_queued(0 if oldest is None else (now - oldest) / 1000)
