"""Every SQL statement of the service, as small functions over a Transaction.

Times are integer milliseconds since the epoch. Statements that must be
atomic under concurrency (replay guards, single-use codes, counters) are single
conditional UPDATEs whose row count says who won.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twofactor_server.storage.database import Row, Transaction

# ---- users -----------------------------------------------------------------


def ensure_user(tx: Transaction, user_id: str, now_ms: int) -> None:
    tx.execute(
        "INSERT INTO users (user_id, created_at) VALUES (%(u)s, %(now)s) ON CONFLICT (user_id) DO NOTHING",
        {"u": user_id, "now": now_ms},
    )


def get_user(tx: Transaction, user_id: str, *, lock: bool = False) -> Row | None:
    """The user's row; with lock=True, other writers of this user wait until commit."""
    suffix = tx.row_lock if lock else ""
    return tx.one(f"SELECT * FROM users WHERE user_id = %(u)s{suffix}", {"u": user_id})  # noqa: S608


def set_contact(tx: Transaction, user_id: str, column: str, value: str | None) -> None:
    assert column in ("email", "phone")
    tx.execute(f"UPDATE users SET {column} = %(v)s WHERE user_id = %(u)s", {"u": user_id, "v": value})  # noqa: S608


def add_failure(tx: Transaction, user_id: str) -> int:
    """Count one more consecutive failure; return the new count."""
    row = tx.one(
        "UPDATE users SET failed_attempts = failed_attempts + 1 WHERE user_id = %(u)s "
        "RETURNING failed_attempts",
        {"u": user_id},
    )
    assert row is not None
    return int(row["failed_attempts"])


def set_locked_until(tx: Transaction, user_id: str, locked_until_ms: int | None) -> None:
    tx.execute(
        "UPDATE users SET locked_until = %(l)s WHERE user_id = %(u)s", {"u": user_id, "l": locked_until_ms}
    )


def record_success(tx: Transaction, user_id: str, now_ms: int) -> None:
    tx.execute(
        "UPDATE users SET failed_attempts = 0, locked_until = NULL, last_verified_at = %(now)s "
        "WHERE user_id = %(u)s",
        {"u": user_id, "now": now_ms},
    )


def advance_totp_step(tx: Transaction, user_id: str, step: int) -> bool:
    """Accept a TOTP time step only if it is newer than every step accepted before."""
    return (
        tx.execute(
            "UPDATE users SET totp_last_step = %(s)s WHERE user_id = %(u)s "
            "AND (totp_last_step IS NULL OR totp_last_step < %(s)s)",
            {"u": user_id, "s": step},
        )
        == 1
    )


def verify_snapshot(tx: Transaction, user_id: str) -> list[Row]:
    """The user's lock state with one row per enabled method and its sealed secret (none: unknown user)."""
    return tx.all(
        "SELECT u.failed_attempts, u.locked_until, m.method, m.secret FROM users u "
        "LEFT JOIN methods m ON m.user_id = u.user_id AND m.enabled_at IS NOT NULL "
        "WHERE u.user_id = %(u)s",
        {"u": user_id},
    )


def accept_totp_step(
    tx: Transaction, user_id: str, step: int, sealed_secret: bytes, now_ms: int, max_failures: int
) -> int | None:
    """Accept an authenticator code's step in one atomic statement; return the unused backup codes.

    None when the statement changed nothing: the step is not newer than the last accepted one,
    the user got locked, or the secret was replaced since it was read. The caller then decides
    under the user's row lock.
    """
    row = tx.one(
        "UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, locked_until = NULL, "
        "last_verified_at = %(now)s "
        "WHERE user_id = %(u)s AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
        "AND (locked_until IS NULL OR locked_until <= %(now)s) AND failed_attempts < %(max)s "
        "AND EXISTS (SELECT 1 FROM methods m WHERE m.user_id = %(u)s AND m.method = 'authenticator' "
        "AND m.enabled_at IS NOT NULL AND m.secret = %(sealed)s) "
        "RETURNING (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = %(u)s AND b.used_at IS NULL) "
        "AS backup_left",
        {"u": user_id, "s": step, "now": now_ms, "max": max_failures, "sealed": sealed_secret},
    )
    return None if row is None else int(row["backup_left"])


def set_totp_step(tx: Transaction, user_id: str, step: int) -> None:
    tx.execute("UPDATE users SET totp_last_step = %(s)s WHERE user_id = %(u)s", {"u": user_id, "s": step})


def unlock(tx: Transaction, user_id: str) -> None:
    tx.execute(
        "UPDATE users SET failed_attempts = 0, locked_until = NULL WHERE user_id = %(u)s", {"u": user_id}
    )


def reset_user(tx: Transaction, user_id: str) -> None:
    """Forget everything enrolled; keep the contacts and the history."""
    params = {"u": user_id}
    tx.execute("DELETE FROM methods WHERE user_id = %(u)s", params)
    tx.execute("DELETE FROM backup_codes WHERE user_id = %(u)s", params)
    tx.execute(
        "UPDATE challenges SET superseded_at = COALESCE(superseded_at, updated_at), code_ciphertext = NULL "
        "WHERE user_id = %(u)s AND consumed_at IS NULL",
        params,
    )
    tx.execute(
        "UPDATE users SET failed_attempts = 0, locked_until = NULL, totp_last_step = NULL, "
        "backup_codes_generated_at = NULL WHERE user_id = %(u)s",
        params,
    )


def list_users(tx: Transaction, *, after: str, limit: int, enabled: bool | None) -> list[Row]:
    condition = ""
    if enabled is not None:
        exists = "EXISTS (SELECT 1 FROM methods m WHERE m.user_id = u.user_id AND m.enabled_at IS NOT NULL)"
        condition = f"AND {'' if enabled else 'NOT '}{exists}"
    return tx.all(
        f"SELECT * FROM users u WHERE u.user_id > %(after)s {condition} ORDER BY u.user_id LIMIT %(n)s",  # noqa: S608
        {"after": after, "n": limit},
    )


# ---- methods ---------------------------------------------------------------


def methods_of(tx: Transaction, user_id: str) -> list[Row]:
    return tx.all("SELECT * FROM methods WHERE user_id = %(u)s ORDER BY method", {"u": user_id})


def methods_of_users(tx: Transaction, user_ids: Iterable[str]) -> dict[str, list[Row]]:
    ids = list(user_ids)
    found: dict[str, list[Row]] = {u: [] for u in ids}
    if ids:
        placeholders = ", ".join(f"%(u{i})s" for i in range(len(ids)))
        rows = tx.all(
            f"SELECT * FROM methods WHERE user_id IN ({placeholders}) ORDER BY method",  # noqa: S608
            {f"u{i}": u for i, u in enumerate(ids)},
        )
        for row in rows:
            found[row["user_id"]].append(row)
    return found


def start_method_enrollment(
    tx: Transaction, user_id: str, method: str, now_ms: int, pending_secret: bytes | None = None
) -> None:
    tx.execute(
        "INSERT INTO methods (user_id, method, pending_since, pending_secret) "
        "VALUES (%(u)s, %(m)s, %(now)s, %(ps)s) "
        "ON CONFLICT (user_id, method) DO UPDATE SET pending_since = %(now)s, pending_secret = %(ps)s",
        {"u": user_id, "m": method, "now": now_ms, "ps": pending_secret},
    )


def enable_method(tx: Transaction, user_id: str, method: str, now_ms: int) -> bool:
    """Turn a pending enrollment into an enabled method (the pending secret becomes the secret)."""
    return (
        tx.execute(
            "UPDATE methods SET enabled_at = %(now)s, pending_since = NULL, "
            "secret = COALESCE(pending_secret, secret), pending_secret = NULL "
            "WHERE user_id = %(u)s AND method = %(m)s AND pending_since IS NOT NULL",
            {"u": user_id, "m": method, "now": now_ms},
        )
        == 1
    )


def delete_method(tx: Transaction, user_id: str, method: str) -> None:
    tx.execute("DELETE FROM methods WHERE user_id = %(u)s AND method = %(m)s", {"u": user_id, "m": method})


# ---- backup codes ----------------------------------------------------------


def replace_backup_codes(
    tx: Transaction, user_id: str, codes: list[tuple[bytes, bytes]], now_ms: int
) -> None:
    """Store a new set of (hash, ciphertext); the old set is gone in the same transaction."""
    tx.execute("DELETE FROM backup_codes WHERE user_id = %(u)s", {"u": user_id})
    for position, (code_hash, ciphertext) in enumerate(codes):
        tx.execute(
            "INSERT INTO backup_codes (user_id, position, code_hash, code_ciphertext) "
            "VALUES (%(u)s, %(p)s, %(h)s, %(c)s)",
            {"u": user_id, "p": position, "h": code_hash, "c": ciphertext},
        )
    tx.execute(
        "UPDATE users SET backup_codes_generated_at = %(now)s WHERE user_id = %(u)s",
        {"u": user_id, "now": now_ms},
    )


def delete_backup_codes(tx: Transaction, user_id: str) -> None:
    tx.execute("DELETE FROM backup_codes WHERE user_id = %(u)s", {"u": user_id})
    tx.execute("UPDATE users SET backup_codes_generated_at = NULL WHERE user_id = %(u)s", {"u": user_id})


def unused_backup_codes(tx: Transaction, user_id: str) -> list[Row]:
    return tx.all(
        "SELECT position, code_hash, code_ciphertext FROM backup_codes "
        "WHERE user_id = %(u)s AND used_at IS NULL ORDER BY position",
        {"u": user_id},
    )


def count_unused_backup_codes(tx: Transaction, user_id: str) -> int:
    row = tx.one(
        "SELECT COUNT(*) AS n FROM backup_codes WHERE user_id = %(u)s AND used_at IS NULL", {"u": user_id}
    )
    return int(row["n"]) if row else 0


def use_backup_code(tx: Transaction, user_id: str, position: int, now_ms: int) -> bool:
    """Mark a code used; False when another call used it first."""
    return (
        tx.execute(
            "UPDATE backup_codes SET used_at = %(now)s "
            "WHERE user_id = %(u)s AND position = %(p)s AND used_at IS NULL",
            {"u": user_id, "p": position, "now": now_ms},
        )
        == 1
    )


# ---- challenges (codes sent by email or SMS) and their delivery ------------


def insert_challenge(tx: Transaction, **columns: Any) -> None:
    names = ", ".join(columns)
    values = ", ".join(f"%({name})s" for name in columns)
    tx.execute(f"INSERT INTO challenges ({names}) VALUES ({values})", columns)  # noqa: S608


def get_challenge(tx: Transaction, challenge_id: str) -> Row | None:
    return tx.one("SELECT * FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id})


def challenge_by_idempotency_key(tx: Transaction, user_id: str, key: str) -> Row | None:
    return tx.one(
        "SELECT * FROM challenges WHERE user_id = %(u)s AND idempotency_key = %(k)s",
        {"u": user_id, "k": key},
    )


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


def live_challenges(tx: Transaction, user_id: str, purpose: str, now_ms: int, max_attempts: int) -> list[Row]:
    """Codes that can still be accepted, newest first."""
    return tx.all(
        "SELECT * FROM challenges WHERE user_id = %(u)s AND purpose = %(p)s AND consumed_at IS NULL "
        "AND superseded_at IS NULL AND expires_at > %(now)s AND attempts < %(max)s "
        "AND delivery_status <> 'failed' ORDER BY created_at DESC",
        {"u": user_id, "p": purpose, "now": now_ms, "max": max_attempts},
    )


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


def claim_delivery(tx: Transaction, challenge_id: str, now_ms: int) -> Row | None:
    """Take a challenge's delivery for one attempt; None when there is nothing to send.

    A delivery left in 'sending' by a worker that died is claimed again: the
    message was not recorded as sent, so sending it is the only way it arrives.
    """
    return tx.one(
        "UPDATE challenges SET delivery_status = 'sending', delivery_attempts = delivery_attempts + 1, "
        "updated_at = %(now)s WHERE challenge_id = %(c)s AND delivery_status IN ('queued', 'sending') "
        "AND code_ciphertext IS NOT NULL RETURNING *",
        {"c": challenge_id, "now": now_ms},
    )


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


# ---- audit -----------------------------------------------------------------


def add_audit_event(tx: Transaction, **columns: Any) -> None:
    tx.execute(
        "INSERT INTO audit_events (at, actor, user_id, action, request_id, outcome, detail) "
        "VALUES (%(at)s, %(actor)s, %(user_id)s, %(action)s, %(request_id)s, %(outcome)s, %(detail)s)",
        columns,
    )


def list_audit_events(tx: Transaction, *, user_id: str, before_id: int | None, limit: int) -> list[Row]:
    clauses = []
    if user_id:
        clauses.append("user_id = %(u)s")
    if before_id is not None:
        clauses.append("event_id < %(before)s")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return tx.all(
        f"SELECT * FROM audit_events {where} ORDER BY event_id DESC LIMIT %(n)s",  # noqa: S608
        {"u": user_id, "before": before_id, "n": limit},
    )
