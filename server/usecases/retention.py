"""Retention: audit events are kept TWOFACTOR_AUDIT_RETENTION_DAYS, expired challenges one day."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.storage import retention
from twofactor_server.storage.database import Database

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
CHALLENGE_KEEP_MS = DAY_MS  # past its expiry, a challenge only serves the send limits (an hour)


@dataclass(frozen=True)
class Purged:
    audit_events: int
    challenges: int


class Retention:
    def __init__(self, db: Database, audit_retention_days: int, clock: Clock) -> None:
        self._db = db
        self._audit_keep_ms = audit_retention_days * DAY_MS
        self._clock = clock

    def run_once(self) -> Purged | None:
        """Delete what is past its keeping time; None when another process is running it.

        Invariant: only rows strictly older than the limit go (an audit event exactly
        TWOFACTOR_AUDIT_RETENTION_DAYS old stays); one run at a time across the fleet.
        """
        now = now_ms(self._clock)
        counts = retention.purge(
            self._db, audit_before_ms=now - self._audit_keep_ms, challenges_before_ms=now - CHALLENGE_KEEP_MS
        )
        if counts is None:
            log.info("retention: another process is running it")
            return None
        purged = Purged(*counts)
        if purged.audit_events or purged.challenges:
            log.info(
                "retention: deleted %d audit events and %d expired challenges",
                purged.audit_events,
                purged.challenges,
            )
        return purged
