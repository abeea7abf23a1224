"""The SQL of users, methods, backup codes and the audit log, as small functions over a Transaction.

Challenges and their delivery are in outbox.py.

Times are integer milliseconds since the epoch. Statements that must be
atomic under concurrency (replay guards, single-use codes, counters) are single
conditional UPDATEs whose row count says who won. Rows leave this module as
records (records.py); no caller sees a column name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

from twofactor_server.domain.models import AuditEvent
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import (
    BackupCodeRecord,
    MethodRecord,
    NewAuditEvent,
    UserRecord,
    VerifySnapshot,
)

# ---- users -----------------------------------------------------------------


def ensure_user(tx: Transaction, user_id: str, now_ms: int) -> None:
    tx.execute(
        "INSERT INTO users (user_id, created_at) VALUES (%(u)s, %(now)s) ON CONFLICT (user_id) DO NOTHING",
        {"u": user_id, "now": now_ms},
    )


def get_user(tx: Transaction, user_id: str, *, lock: bool = False) -> UserRecord | None:
    """The user's row; with lock=True, other writers of this user wait until commit."""
    suffix = tx.row_lock if lock else ""
    row = tx.one(f"SELECT * FROM users WHERE user_id = %(u)s{suffix}", {"u": user_id})  # noqa: S608
    return None if row is None else UserRecord(**row)


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


def verify_snapshot(tx: Transaction, user_id: str) -> VerifySnapshot | None:
    """The user's lock state and enabled authenticator secret, in one read (None: unknown user)."""
    row = tx.one(
        "SELECT u.failed_attempts, u.locked_until, m.secret AS authenticator_secret FROM users u "
        "LEFT JOIN methods m ON m.user_id = u.user_id AND m.method = 'authenticator' "
        "AND m.enabled_at IS NOT NULL WHERE u.user_id = %(u)s",
        {"u": user_id},
    )
    return None if row is None else VerifySnapshot(**row)


def accept_totp_step(
    tx: Transaction,
    user_id: str,
    step: int,
    seen: VerifySnapshot,
    now_ms: int,
    audit: NewAuditEvent | None = None,
) -> int | None:
    """Accept an authenticator code's time step in one atomic statement; return the unused backup codes.

    The step is the replay guard (RFC 6238 §5.2): it must be newer than every step accepted
    before. The rest is compare-and-swap on what the caller read and judged (`seen`): the lock
    state and the sealed secret. None when anything moved since: the step was used, a failure
    was counted, or the secret was replaced. The caller then decides under the user's row lock.

    With `audit`, the acceptance's audit event is written by the same statement on PostgreSQL
    (a data-modifying CTE: the fast path keeps its statement count); SQLite needs a second
    statement, so its callers pass `audit` only inside a transaction.
    """
    if audit is not None and tx.dialect == "postgres":
        return _accept_totp_step_audited(tx, user_id, step, seen, now_ms, audit)
    row = tx.one(
        "UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, locked_until = NULL, "
        "last_verified_at = %(now)s "
        "WHERE user_id = %(u)s AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
        "AND failed_attempts = %(failures)s "
        "AND COALESCE(locked_until, -1) = COALESCE(%(locked)s, -1) "
        "AND EXISTS (SELECT 1 FROM methods m WHERE m.user_id = %(u)s AND m.method = 'authenticator' "
        "AND m.enabled_at IS NOT NULL AND m.secret = %(sealed)s) "
        "RETURNING (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = %(u)s AND b.used_at IS NULL) "
        "AS backup_left",
        {
            "u": user_id,
            "s": step,
            "now": now_ms,
            "failures": seen.failed_attempts,
            "locked": seen.locked_until,
            "sealed": seen.authenticator_secret,
        },
    )
    if row is not None and audit is not None:
        add_audit_event(tx, **asdict(audit))
    return None if row is None else int(row["backup_left"])


def _accept_totp_step_audited(
    tx: Transaction,
    user_id: str,
    step: int,
    seen: VerifySnapshot,
    now_ms: int,
    audit: NewAuditEvent,
) -> int | None:
    row = tx.one(
        "WITH accepted AS (UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, "
        "locked_until = NULL, last_verified_at = %(now)s "
        "WHERE user_id = %(u)s AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
        "AND failed_attempts = %(failures)s "
        "AND COALESCE(locked_until, -1) = COALESCE(%(locked)s, -1) "
        "AND EXISTS (SELECT 1 FROM methods m WHERE m.user_id = %(u)s AND m.method = 'authenticator' "
        "AND m.enabled_at IS NOT NULL AND m.secret = %(sealed)s) RETURNING user_id), "
        "logged AS (INSERT INTO audit_events (at, actor, user_id, action, request_id, outcome, detail) "
        "SELECT %(at)s, %(actor)s, user_id, %(action)s, %(request_id)s, %(outcome)s, %(detail)s "
        "FROM accepted) "
        "SELECT (SELECT COUNT(*) FROM backup_codes b WHERE b.user_id = %(u)s AND b.used_at IS NULL) "
        "AS backup_left FROM accepted",
        {
            "u": user_id,
            "s": step,
            "now": now_ms,
            "failures": seen.failed_attempts,
            "locked": seen.locked_until,
            "sealed": seen.authenticator_secret,
            **{k: v for k, v in asdict(audit).items() if k != "user_id"},
        },
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


def list_users(tx: Transaction, *, after: str, limit: int, enabled: bool | None) -> list[UserRecord]:
    condition = ""
    if enabled is not None:
        exists = "EXISTS (SELECT 1 FROM methods m WHERE m.user_id = u.user_id AND m.enabled_at IS NOT NULL)"
        condition = f"AND {'' if enabled else 'NOT '}{exists}"
    rows = tx.all(
        f"SELECT * FROM users u WHERE u.user_id > %(after)s {condition} ORDER BY u.user_id LIMIT %(n)s",  # noqa: S608
        {"after": after, "n": limit},
    )
    return [UserRecord(**row) for row in rows]


# ---- methods ---------------------------------------------------------------


def methods_of(tx: Transaction, user_id: str) -> list[MethodRecord]:
    rows = tx.all("SELECT * FROM methods WHERE user_id = %(u)s ORDER BY method", {"u": user_id})
    return [MethodRecord(**row) for row in rows]


def methods_of_users(tx: Transaction, user_ids: Iterable[str]) -> dict[str, list[MethodRecord]]:
    ids = list(user_ids)
    found: dict[str, list[MethodRecord]] = {u: [] for u in ids}
    if ids:
        placeholders = ", ".join(f"%(u{i})s" for i in range(len(ids)))
        rows = tx.all(
            f"SELECT * FROM methods WHERE user_id IN ({placeholders}) ORDER BY method",  # noqa: S608
            {f"u{i}": u for i, u in enumerate(ids)},
        )
        for row in rows:
            found[row["user_id"]].append(MethodRecord(**row))
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


def unused_backup_codes(tx: Transaction, user_id: str) -> list[BackupCodeRecord]:
    rows = tx.all(
        "SELECT position, code_hash, code_ciphertext FROM backup_codes "
        "WHERE user_id = %(u)s AND used_at IS NULL ORDER BY position",
        {"u": user_id},
    )
    return [BackupCodeRecord(**row) for row in rows]


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


# ---- audit -----------------------------------------------------------------


def add_audit_event(
    tx: Transaction,
    *,
    at: int,
    actor: str,
    user_id: str,
    action: str,
    request_id: str,
    outcome: str,
    detail: str,
) -> None:
    tx.execute(
        "INSERT INTO audit_events (at, actor, user_id, action, request_id, outcome, detail) "
        "VALUES (%(at)s, %(actor)s, %(user_id)s, %(action)s, %(request_id)s, %(outcome)s, %(detail)s)",
        {
            "at": at,
            "actor": actor,
            "user_id": user_id,
            "action": action,
            "request_id": request_id,
            "outcome": outcome,
            "detail": detail,
        },
    )


def list_audit_events(
    tx: Transaction,
    *,
    user_id: str,
    before_id: int | None,
    limit: int,
    actions: tuple[str, ...] = (),
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> list[AuditEvent]:
    """Newest first; every filter is a bound parameter (the clauses themselves are fixed text)."""
    clauses = []
    params: dict[str, object] = {"u": user_id, "before": before_id, "n": limit}
    if user_id:
        clauses.append("user_id = %(u)s")
    if before_id is not None:
        clauses.append("event_id < %(before)s")
    if actions:
        names = {f"a{i}": action for i, action in enumerate(actions)}
        clauses.append(f"action IN ({', '.join(f'%({name})s' for name in names)})")
        params.update(names)
    if since_ms is not None:
        clauses.append("at >= %(since)s")
        params["since"] = since_ms
    if until_ms is not None:
        clauses.append("at < %(until)s")
        params["until"] = until_ms
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = tx.all(
        f"SELECT * FROM audit_events {where} ORDER BY event_id DESC LIMIT %(n)s",  # noqa: S608
        params,
    )
    return [AuditEvent(**row) for row in rows]
