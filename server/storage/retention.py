"""The SQL of retention: delete audit events and challenges past their keeping time, in batches."""

from __future__ import annotations

from twofactor_server.storage.database import Database, Transaction

_RETENTION_LOCK_ID = 0x2FAC8  # pg_try_advisory_xact_lock key: one retention batch at a time, fleet-wide
# Rows per transaction: each batch is short (its locks, its WAL, the storage timeout it runs
# under), however large the backlog. One DELETE for everything failed for good past a few
# million rows: the storage timeout abandoned it, and every later run did the same.
BATCH = 5_000
_AUDIT = (
    "DELETE FROM audit_events WHERE event_id IN "
    "(SELECT event_id FROM audit_events WHERE at < %(before)s LIMIT %(n)s)"
)
_CHALLENGES = (
    "DELETE FROM challenges WHERE challenge_id IN "
    "(SELECT challenge_id FROM challenges WHERE expires_at < %(before)s LIMIT %(n)s)"
)


def purge(
    db: Database, *, audit_before_ms: int, challenges_before_ms: int, batch: int = BATCH
) -> tuple[int, int] | None:
    """Delete audit events older than `audit_before_ms` and challenges that expired before
    `challenges_before_ms`, `batch` rows per transaction until none is left; how many of each.
    None when another process holds the retention lock (PostgreSQL) at the first batch: it is
    doing the same work right now (one that takes it between batches shares the work out)."""
    deleted = [0, 0]
    for index, (statement, before) in enumerate(
        ((_AUDIT, audit_before_ms), (_CHALLENGES, challenges_before_ms))
    ):
        while True:
            with db.transaction() as tx:
                if not _locked(tx):  # another process is purging: it goes on from here
                    return None if deleted == [0, 0] else (deleted[0], deleted[1])
                count = tx.execute(statement, {"before": before, "n": batch})
            deleted[index] += count
            if count < batch:
                break
    return deleted[0], deleted[1]


def _locked(tx: Transaction) -> bool:
    if tx.dialect != "postgres":
        return True  # SQLite: one process owns the file, its transactions run one at a time
    row = tx.one("SELECT pg_try_advisory_xact_lock(%(key)s) AS got", {"key": _RETENTION_LOCK_ID})
    return row is not None and bool(row["got"])
