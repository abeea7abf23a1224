"""The outbox's recovery SQL: every worker and the embedded server run these; none needs to be the
only one (delivery/recovery.py). What the states mean: storage/outbox.py."""

from __future__ import annotations

from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import ChallengeRecord, select_list
from twofactor_server.storage.units import in_list

EXPIRED_REASON = "the code expired before it could be delivered"
_CHALLENGE_COLUMNS = select_list(ChallengeRecord)


def _skip_locked(tx: Transaction) -> str:
    """PostgreSQL: lock the picked rows, skipping those another recoverer holds. SQLite: serialized."""
    return f"{tx.row_lock} SKIP LOCKED" if tx.row_lock else ""


def expire_undelivered(tx: Transaction, now_ms: int) -> list[str]:
    """Close out queued (or abandoned 'sending') rows whose code expired: EXPIRED, code wiped.
    Returns the method (email or sms) of each row closed that no later code had replaced: a
    message its user waited for in vain."""
    rows = tx.all(
        "UPDATE challenges SET delivery_status = 'expired', code_ciphertext = NULL, lease_until = NULL, "
        "failure_reason = COALESCE(failure_reason, %(why)s), updated_at = %(now)s "
        "WHERE expires_at <= %(now)s AND (delivery_status = 'queued' "
        "OR (delivery_status = 'sending' AND (lease_until IS NULL OR lease_until <= %(now)s))) "
        "RETURNING method, superseded_at",
        {"now": now_ms, "why": EXPIRED_REASON},
    )
    return [row["method"] for row in rows if row["superseded_at"] is None]


# A row is published again after as long as it has waited since its first publish (at least
# one interval, at most 32): a message that was only late in a long queue adds copies to it
# that halve in number each time, where one copy per interval for every waiting row would grow
# the queue faster than a worker drains it. By its age, not by how many republishes there
# were: a publish that failed (the broker down) doesn't lengthen the wait (recovery.py makes
# such a row due again at once).
_MAX_WAIT_INTERVALS = 32
_AGE = "(%(now)s - COALESCE(published_at, created_at))"


def take_for_republish(
    tx: Transaction, now_ms: int, *, stale_before: int, interval_ms: int, limit: int
) -> list[ChallengeRecord]:
    """Rows whose message may be lost, moved to a new generation, and each due again after as
    long as it has waited since its first publish (between `interval_ms` and 32 times it):
    outbox.claim_delivery lets a late first message still deliver.

    Three kinds: never published though created before `stale_before` (the server
    died between commit and publish), and not taken by another round since (its publish is
    under way: it records published_at only after it); published before `stale_before` or due for a
    republish, and still queued (the broker lost the message, or a retry went
    missing); 'sending' with a lease that ran out (the worker died).
    """
    rows = tx.all(
        "UPDATE challenges SET publish_generation = publish_generation + 1, delivery_status = 'queued', "  # noqa: S608 - no input in the SQL text
        "lease_until = NULL, updated_at = %(now)s, next_publish_at = %(now)s + CASE "
        f"WHEN {_AGE} < %(interval)s THEN %(interval)s "
        f"WHEN {_AGE} > %(interval)s * {_MAX_WAIT_INTERVALS} THEN %(interval)s * {_MAX_WAIT_INTERVALS} "
        f"ELSE {_AGE} END "
        "WHERE challenge_id IN (SELECT challenge_id FROM challenges "
        "WHERE expires_at > %(now)s AND code_ciphertext IS NOT NULL AND ("
        "(delivery_status = 'queued' AND published_at IS NULL AND created_at <= %(before)s "
        "AND (next_publish_at IS NULL OR next_publish_at <= %(now)s)) "
        "OR (delivery_status = 'queued' AND published_at IS NOT NULL AND (next_publish_at <= %(now)s "
        "OR (next_publish_at IS NULL AND published_at <= %(before)s))) "
        "OR (delivery_status = 'sending' AND (lease_until IS NULL OR lease_until <= %(now)s))) "
        f"ORDER BY expires_at LIMIT %(limit)s{_skip_locked(tx)}) RETURNING {_CHALLENGE_COLUMNS}",
        {"now": now_ms, "before": stale_before, "interval": interval_ms, "limit": limit},
    )
    return [ChallengeRecord(**row) for row in rows]


def due_again(tx: Transaction, challenge_ids: list[str], now_ms: int) -> None:
    """Rows taken for a republish whose publish failed: due at the next round, not after a wait.
    One statement for the batch (up to recovery's BATCH ids)."""
    if not challenge_ids:
        return
    placeholders, params = in_list("c", challenge_ids)
    tx.execute(
        "UPDATE challenges SET next_publish_at = %(now)s "  # noqa: S608 - placeholders only
        f"WHERE challenge_id IN ({placeholders}) AND delivery_status = 'queued'",
        {"now": now_ms, **params},
    )


def claimed_but_unpublished(tx: Transaction, *, created_before: int, limit: int) -> list[ChallengeRecord]:
    """Rows a worker took though the server never recorded the publish (it died right after it)."""
    rows = tx.all(
        f"SELECT {_CHALLENGE_COLUMNS} FROM challenges "  # noqa: S608
        "WHERE published_at IS NULL AND created_at <= %(before)s "
        "AND delivery_status IN ('sending', 'sent') "
        f"ORDER BY created_at LIMIT %(limit)s{_skip_locked(tx)}",
        {"before": created_before, "limit": limit},
    )
    return [ChallengeRecord(**row) for row in rows]


def oldest_waiting_created_at(tx: Transaction) -> int | None:
    """When the oldest challenge still waiting for delivery (queued or sending) was created."""
    row = tx.one(
        "SELECT MIN(created_at) AS oldest FROM challenges WHERE delivery_status IN ('queued', 'sending')"
    )
    return None if row is None or row["oldest"] is None else int(row["oldest"])
