"""The SQL of retention: delete audit events and challenges past their keeping time."""

from __future__ import annotations

from twofactor_server.storage.database import Database

_RETENTION_LOCK_ID = 0x2FAC8  # pg_try_advisory_xact_lock key: one retention run at a time, fleet-wide


def purge(db: Database, *, audit_before_ms: int, challenges_before_ms: int) -> tuple[int, int] | None:
    """Delete audit events older than `audit_before_ms` and challenges that expired before
    `challenges_before_ms`, in one transaction. None when another process holds the retention
    lock (PostgreSQL): it is doing the same work right now."""
    with db.transaction() as tx:
        if db.dialect == "postgres":
            row = tx.one("SELECT pg_try_advisory_xact_lock(%(key)s) AS got", {"key": _RETENTION_LOCK_ID})
            if row is None or not row["got"]:
                return None
        audit = tx.execute("DELETE FROM audit_events WHERE at < %(before)s", {"before": audit_before_ms})
        challenges = tx.execute(
            "DELETE FROM challenges WHERE expires_at < %(before)s", {"before": challenges_before_ms}
        )
    return audit, challenges
