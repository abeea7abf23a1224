"""The SQL of challenges: codes sent by email or SMS, and their delivery (the outbox the workers read).

Times are integer milliseconds since the epoch. Single-use and counting rules
are single conditional UPDATEs whose row count says who won.
"""

from __future__ import annotations

import dataclasses

from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import ChallengeRecord, NewChallenge

_NEW_CHALLENGE_COLUMNS = [f.name for f in dataclasses.fields(NewChallenge)]
_INSERT_CHALLENGE = (
    f"INSERT INTO challenges ({', '.join(_NEW_CHALLENGE_COLUMNS)}, delivery_status, updated_at) "  # noqa: S608
    f"VALUES ({', '.join(f'%({c})s' for c in _NEW_CHALLENGE_COLUMNS)}, 'queued', %(created_at)s)"
)


def insert_challenge(tx: Transaction, challenge: NewChallenge) -> None:
    """Store a new challenge, queued for delivery."""
    tx.execute(_INSERT_CHALLENGE, dataclasses.asdict(challenge))


def get_challenge(tx: Transaction, challenge_id: str) -> ChallengeRecord | None:
    row = tx.one("SELECT * FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id})
    return None if row is None else ChallengeRecord(**row)


def challenge_by_idempotency_key(tx: Transaction, user_id: str, key: str) -> ChallengeRecord | None:
    row = tx.one(
        "SELECT * FROM challenges WHERE user_id = %(u)s AND idempotency_key = %(k)s",
        {"u": user_id, "k": key},
    )
    return None if row is None else ChallengeRecord(**row)


def forget_idempotency_key(tx: Transaction, challenge_id: str) -> None:
    tx.execute("UPDATE challenges SET idempotency_key = NULL WHERE challenge_id = %(c)s", {"c": challenge_id})


def supersede_challenges(
    tx: Transaction, user_id: str, purpose: str, method: str | None, now_ms: int
) -> None:
    """Older codes stop working when a new one is sent."""
    method_clause = "" if method is None else "AND method = %(m)s"
    tx.execute(
        "UPDATE challenges SET superseded_at = %(now)s, updated_at = %(now)s "  # noqa: S608
        f"WHERE user_id = %(u)s AND purpose = %(p)s {method_clause} "
        "AND superseded_at IS NULL AND consumed_at IS NULL",
        {"u": user_id, "p": purpose, "m": method, "now": now_ms},
    )


def live_challenges(
    tx: Transaction, user_id: str, purpose: str, now_ms: int, max_attempts: int
) -> list[ChallengeRecord]:
    """Codes that can still be accepted, newest first."""
    rows = tx.all(
        "SELECT * FROM challenges WHERE user_id = %(u)s AND purpose = %(p)s AND consumed_at IS NULL "
        "AND superseded_at IS NULL AND expires_at > %(now)s AND attempts < %(max)s "
        "AND delivery_status <> 'failed' ORDER BY created_at DESC",
        {"u": user_id, "p": purpose, "now": now_ms, "max": max_attempts},
    )
    return [ChallengeRecord(**row) for row in rows]


def consume_challenge(tx: Transaction, challenge_id: str, now_ms: int) -> bool:
    return (
        tx.execute(
            "UPDATE challenges SET consumed_at = %(now)s, updated_at = %(now)s "
            "WHERE challenge_id = %(c)s AND consumed_at IS NULL AND superseded_at IS NULL",
            {"c": challenge_id, "now": now_ms},
        )
        == 1
    )


def count_challenge_attempt(tx: Transaction, challenge_id: str, now_ms: int) -> None:
    tx.execute(
        "UPDATE challenges SET attempts = attempts + 1, updated_at = %(now)s WHERE challenge_id = %(c)s",
        {"c": challenge_id, "now": now_ms},
    )


def last_send_ms(tx: Transaction, user_id: str) -> int | None:
    row = tx.one(
        "SELECT MAX(created_at) AS last FROM challenges "
        "WHERE user_id = %(u)s AND delivery_status <> 'failed'",
        {"u": user_id},
    )
    return None if row is None or row["last"] is None else int(row["last"])


def count_sends_since(
    tx: Transaction, *, since_ms: int, user_id: str | None = None, destination: str | None = None
) -> int:
    column, value = ("user_id", user_id) if user_id is not None else ("destination", destination)
    row = tx.one(
        f"SELECT COUNT(*) AS n FROM challenges WHERE {column} = %(v)s AND created_at > %(since)s",  # noqa: S608
        {"v": value, "since": since_ms},
    )
    return int(row["n"]) if row else 0


def claim_delivery(tx: Transaction, challenge_id: str, now_ms: int) -> ChallengeRecord | None:
    """Take a challenge's delivery for one attempt; None when there is nothing to send.

    A delivery left in 'sending' by a worker that died is claimed again: the
    message was not recorded as sent, so sending it is the only way it arrives.
    """
    row = tx.one(
        "UPDATE challenges SET delivery_status = 'sending', delivery_attempts = delivery_attempts + 1, "
        "updated_at = %(now)s WHERE challenge_id = %(c)s AND delivery_status IN ('queued', 'sending') "
        "AND code_ciphertext IS NOT NULL RETURNING *",
        {"c": challenge_id, "now": now_ms},
    )
    return None if row is None else ChallengeRecord(**row)


def mark_delivery(
    tx: Transaction,
    challenge_id: str,
    status: str,
    now_ms: int,
    *,
    provider_message_id: str | None = None,
    failure_reason: str | None = None,
    wipe_code: bool,
) -> None:
    tx.execute(
        "UPDATE challenges SET delivery_status = %(s)s, updated_at = %(now)s, "
        "provider_message_id = COALESCE(%(pid)s, provider_message_id), failure_reason = %(why)s, "
        "code_ciphertext = CASE WHEN %(wipe)s THEN NULL ELSE code_ciphertext END "
        "WHERE challenge_id = %(c)s",
        {
            "c": challenge_id,
            "s": status,
            "now": now_ms,
            "pid": provider_message_id,
            "why": failure_reason,
            "wipe": wipe_code,
        },
    )
