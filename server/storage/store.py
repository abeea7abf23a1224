"""The SQL of users, methods, backup codes and the audit log, as small functions over a Transaction.

Challenges and their delivery are in outbox.py.

Times are integer milliseconds since the epoch. Statements that must be
atomic under concurrency (replay guards, single-use codes, counters) are single
conditional UPDATEs whose row count says who won. Rows leave this module as
records (records.py); no caller sees a column name.
"""

from __future__ import annotations

from collections.abc import Iterable

from twofactor_server.domain.models import AuditEvent
from twofactor_server.storage.audit_rows import INSERT_AUDIT_EVENT, audit_params, audit_placeholders
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.enrollments import (
    delete_backup_code_rows,
    enable_pending_method,
    store_backup_code_rows,
)
from twofactor_server.storage.hot_statements import HotStatement
from twofactor_server.storage.records import (
    BackupCodeRecord,
    MethodRecord,
    NewAuditEvent,
    UserRecord,
    select_list,
)
from twofactor_server.storage.units import in_list

# ---- users -----------------------------------------------------------------

# Every statement that changes a credential (a method, a contact, the backup codes, a reset)
# moves the user's credential epoch on, so step-up proofs issued before it stop working.
_NEW_EPOCH = "credential_epoch = credential_epoch + 1"
WITHDRAWN_REASON = "withdrawn before delivery: the user was reset or the address changed"
# A withdrawn code still waiting in the queue is closed out at once: no worker takes a row whose
# code is wiped, so it would read 'queued' (and count in the backlog) until it expired.
_CLOSE_QUEUED = (
    "delivery_status = CASE WHEN delivery_status = 'queued' THEN 'expired' ELSE delivery_status END, "
    "failure_reason = CASE WHEN delivery_status = 'queued' THEN %(why)s ELSE failure_reason END"
)
_INSERT_AUDIT_EVENT = f"{INSERT_AUDIT_EVENT}VALUES ({audit_placeholders('')})"
# Statements that most calls run (every rejected Verify: the user's row, its audit event, the
# backup codes left), prepared by name and run through libpq on PostgreSQL (hot_statements.py).
_USER_COLUMNS = select_list(UserRecord)
_METHOD_COLUMNS = select_list(MethodRecord)
_GET_USER = {
    lock: HotStatement(
        f"twofactor_get_user{'_locked' if lock else ''}",
        f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = %(u)s{' FOR UPDATE' if lock else ''}",  # noqa: S608
    )
    for lock in (False, True)
}
_METHODS_OF = HotStatement(
    "twofactor_methods_of",
    f"SELECT {_METHOD_COLUMNS} FROM methods "  # noqa: S608
    "WHERE user_id = %(u)s ORDER BY method",
)
_INSERT_AUDIT_EVENT_HOT = HotStatement("twofactor_insert_audit_event", _INSERT_AUDIT_EVENT)
_COUNT_UNUSED_BACKUP_CODES = HotStatement(
    "twofactor_count_unused_backup_codes",
    "SELECT COUNT(*) AS n FROM backup_codes WHERE user_id = %(u)s AND used_at IS NULL",
)


def bump_credential_epoch(tx: Transaction, user_id: str) -> None:
    tx.execute(f"UPDATE users SET {_NEW_EPOCH} WHERE user_id = %(u)s", {"u": user_id})  # noqa: S608


def ensure_user(tx: Transaction, user_id: str, now_ms: int) -> None:
    tx.execute(
        "INSERT INTO users (user_id, created_at) VALUES (%(u)s, %(now)s) ON CONFLICT (user_id) DO NOTHING",
        {"u": user_id, "now": now_ms},
    )


def get_user(tx: Transaction, user_id: str, *, lock: bool = False) -> UserRecord | None:
    """The user's row; with lock=True, other writers of this user wait until commit."""
    row = tx.hot_row(_GET_USER[lock and bool(tx.row_lock)], {"u": user_id})  # SQLite has no row locks
    return None if row is None else UserRecord(*row)


def set_contact(tx: Transaction, user_id: str, column: str, value: str | None) -> None:
    assert column in ("email", "phone")
    tx.execute(
        f"UPDATE users SET {column} = %(v)s, {_NEW_EPOCH} WHERE user_id = %(u)s",  # noqa: S608
        {"u": user_id, "v": value},
    )


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


def unlock(tx: Transaction, user_id: str) -> None:
    tx.execute(
        "UPDATE users SET failed_attempts = 0, locked_until = NULL WHERE user_id = %(u)s", {"u": user_id}
    )


def reset_user(tx: Transaction, user_id: str) -> None:
    """Forget everything enrolled; keep the contacts and the history."""
    params = {"u": user_id, "why": WITHDRAWN_REASON}
    tx.execute("DELETE FROM methods WHERE user_id = %(u)s", params)
    delete_backup_code_rows(tx, user_id)
    tx.execute(
        "UPDATE challenges SET superseded_at = COALESCE(superseded_at, updated_at), code_ciphertext = NULL, "  # noqa: S608
        f"{_CLOSE_QUEUED} WHERE user_id = %(u)s AND consumed_at IS NULL AND purpose <> 'notice'",
        params,
    )
    tx.execute(
        "UPDATE users SET failed_attempts = 0, locked_until = NULL, totp_last_step = NULL, "  # noqa: S608
        f"backup_codes_generated_at = NULL, {_NEW_EPOCH} WHERE user_id = %(u)s",
        params,
    )


def withdraw_codes_sent_elsewhere(
    tx: Transaction, user_id: str, method: str, destination: str, now_ms: int
) -> None:
    """The user's unused codes of `method` that went to another address than `destination`
    stop working (as at a reset): whoever holds the old mailbox or SIM, often the reason for
    the change, can't finish a login or enrollment with them. An empty `destination` withdraws
    them all (the method turned off, or its address removed). Notices still go."""
    tx.execute(
        "UPDATE challenges SET superseded_at = COALESCE(superseded_at, %(now)s), code_ciphertext = NULL, "  # noqa: S608
        f"{_CLOSE_QUEUED}, updated_at = %(now)s WHERE user_id = %(u)s AND method = %(m)s "
        "AND consumed_at IS NULL AND purpose <> 'notice' AND destination <> %(d)s",
        {"u": user_id, "m": method, "d": destination, "now": now_ms, "why": WITHDRAWN_REASON},
    )


def count_notices_to(tx: Transaction, destination: str, *, since_ms: int) -> int:
    """Notices written to `destination` after `since_ms` (challenges_by_destination)."""
    row = tx.one(
        "SELECT COUNT(*) AS n FROM challenges WHERE destination = %(d)s AND created_at > %(since)s "
        "AND purpose = 'notice'",
        {"d": destination, "since": since_ms},
    )
    assert row is not None
    return int(row["n"])


def list_users(tx: Transaction, *, after: str, limit: int, enabled: bool | None) -> list[UserRecord]:
    condition = ""
    if enabled is not None:
        exists = "EXISTS (SELECT 1 FROM methods m WHERE m.user_id = u.user_id AND m.enabled_at IS NOT NULL)"
        condition = f"AND {'' if enabled else 'NOT '}{exists}"
    rows = tx.all(
        f"SELECT {_USER_COLUMNS} FROM users u "  # noqa: S608
        f"WHERE u.user_id > %(after)s {condition} ORDER BY u.user_id LIMIT %(n)s",
        {"after": after, "n": limit},
    )
    return [UserRecord(**row) for row in rows]


# ---- methods ---------------------------------------------------------------


def methods_of(tx: Transaction, user_id: str) -> list[MethodRecord]:
    return [MethodRecord(*row) for row in tx.hot_rows(_METHODS_OF, {"u": user_id})]


def methods_of_users(tx: Transaction, user_ids: Iterable[str]) -> dict[str, list[MethodRecord]]:
    ids = list(user_ids)
    found: dict[str, list[MethodRecord]] = {u: [] for u in ids}
    if ids:
        placeholders, params = in_list("u", ids)
        rows = tx.all(
            f"SELECT {_METHOD_COLUMNS} FROM methods "  # noqa: S608
            f"WHERE user_id IN ({placeholders}) ORDER BY method",
            params,
        )
        for row in rows:
            found[row["user_id"]].append(MethodRecord(**row))
    return found


def start_method_enrollment(
    tx: Transaction,
    user_id: str,
    method: str,
    now_ms: int,
    *,
    with_proof: bool,
    pending_secret: bytes | None = None,
) -> None:
    """A pending enrollment of `method` (replacing a pending one), started with a step-up proof
    or without one (the user had no usable method): decided under the user's row lock, and
    recorded beside it (migrations 0009, 0011: with the user's credential epoch) for
    ConfirmEnrollment (enrollments.enrollment_start)."""
    params = {"u": user_id, "m": method, "now": now_ms, "ps": pending_secret, "proof": with_proof}
    tx.execute(
        "INSERT INTO methods (user_id, method, pending_since, pending_secret) "
        "VALUES (%(u)s, %(m)s, %(now)s, %(ps)s) "
        "ON CONFLICT (user_id, method) DO UPDATE SET pending_since = %(now)s, pending_secret = %(ps)s",
        params,
    )
    tx.execute(
        "INSERT INTO enrollment_starts (user_id, method, pending_since, with_proof, credential_epoch) "
        "VALUES (%(u)s, %(m)s, %(now)s, %(proof)s, "
        "(SELECT credential_epoch FROM users WHERE user_id = %(u)s)) "
        "ON CONFLICT (user_id, method) DO UPDATE SET pending_since = %(now)s, with_proof = %(proof)s, "
        "credential_epoch = excluded.credential_epoch",
        params,
    )


def enable_method(tx: Transaction, user_id: str, method: str, now_ms: int) -> bool:
    """Turn a pending enrollment into an enabled method (the pending secret becomes the secret)."""
    bump_credential_epoch(tx, user_id)
    return enable_pending_method(tx, user_id, method, now_ms)


def delete_method(tx: Transaction, user_id: str, method: str) -> None:
    bump_credential_epoch(tx, user_id)
    tx.execute("DELETE FROM methods WHERE user_id = %(u)s AND method = %(m)s", {"u": user_id, "m": method})


# ---- backup codes ----------------------------------------------------------


def replace_backup_codes(
    tx: Transaction, user_id: str, codes: list[tuple[bytes, bytes]], now_ms: int
) -> None:
    """Store a new set of (hash, ciphertext); the old set is gone in the same transaction."""
    store_backup_code_rows(tx, user_id, codes)
    tx.execute(
        f"UPDATE users SET backup_codes_generated_at = %(now)s, {_NEW_EPOCH} WHERE user_id = %(u)s",  # noqa: S608
        {"u": user_id, "now": now_ms},
    )


def delete_backup_codes(tx: Transaction, user_id: str) -> None:
    delete_backup_code_rows(tx, user_id)
    tx.execute(
        f"UPDATE users SET backup_codes_generated_at = NULL, {_NEW_EPOCH} WHERE user_id = %(u)s",  # noqa: S608
        {"u": user_id},
    )


def unused_backup_codes(tx: Transaction, user_id: str) -> list[BackupCodeRecord]:
    rows = tx.all(
        "SELECT position, code_hash, code_ciphertext FROM backup_codes "
        "WHERE user_id = %(u)s AND used_at IS NULL ORDER BY position",
        {"u": user_id},
    )
    return [BackupCodeRecord(**row) for row in rows]


def count_unused_backup_codes(tx: Transaction, user_id: str) -> int:
    row = tx.hot_row(_COUNT_UNUSED_BACKUP_CODES, {"u": user_id})
    return int(row[0]) if row else 0


def count_unused_backup_codes_of_users(tx: Transaction, user_ids: Iterable[str]) -> dict[str, int]:
    """count_unused_backup_codes for a page of users, in one statement (ListUsers)."""
    ids = list(user_ids)
    counts = dict.fromkeys(ids, 0)
    if ids:
        placeholders, params = in_list("u", ids)
        rows = tx.all(
            "SELECT user_id, COUNT(*) AS n FROM backup_codes "  # noqa: S608
            f"WHERE user_id IN ({placeholders}) AND used_at IS NULL GROUP BY user_id",
            params,
        )
        counts.update((row["user_id"], int(row["n"])) for row in rows)
    return counts


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


# ---- SMS send counts -------------------------------------------------------


def take_sms_send(tx: Transaction, hour: int, country: str, cap: int) -> bool:
    """Count one text in (hour, country) if fewer than `cap` were counted; False at the cap.

    One conditional UPDATE decides, so concurrent senders can't pass the cap; hours before the
    previous one are dropped on the way. The previous hour stays: another server whose clock is
    a little behind this one's is still counting in it."""
    tx.execute("DELETE FROM sms_send_counts WHERE hour < %(h)s", {"h": hour - 1})
    tx.execute(
        "INSERT INTO sms_send_counts (hour, country, sends) VALUES (%(h)s, %(c)s, 0) "
        "ON CONFLICT (hour, country) DO NOTHING",
        {"h": hour, "c": country},
    )
    return (
        tx.execute(
            "UPDATE sms_send_counts SET sends = sends + 1 "
            "WHERE hour = %(h)s AND country = %(c)s AND sends < %(cap)s",
            {"h": hour, "c": country, "cap": cap},
        )
        == 1
    )


def give_back_sms_send(tx: Transaction, hour: int, country: str) -> None:
    """Uncount one text of (hour, country): a send that was counted, then voided."""
    tx.execute(
        "UPDATE sms_send_counts SET sends = sends - 1 WHERE hour = %(h)s AND country = %(c)s AND sends > 0",
        {"h": hour, "c": country},
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
    event = NewAuditEvent(
        at=at,
        actor=actor,
        user_id=user_id,
        action=action,
        request_id=request_id,
        outcome=outcome,
        detail=detail,
    )
    tx.hot_last(_INSERT_AUDIT_EVENT_HOT, audit_params(event, ""))  # with COMMIT, when the last


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
    names = {f"a{i}": action for i, action in enumerate(actions)}
    params = {"u": user_id, "before": before_id, "n": limit, "since": since_ms, "until": until_ms, **names}
    clauses = [
        clause
        for clause, wanted in (
            ("user_id = %(u)s", user_id),
            ("event_id < %(before)s", before_id is not None),
            (f"action IN ({', '.join(f'%({name})s' for name in names)})", names),
            ("at >= %(since)s", since_ms is not None),
            ("at < %(until)s", until_ms is not None),
        )
        if wanted
    ]
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = tx.all(
        f"SELECT {select_list(AuditEvent)} FROM audit_events {where} "  # noqa: S608
        "ORDER BY event_id DESC LIMIT %(n)s",
        params,
    )
    return [AuditEvent(**row) for row in rows]
