"""The writes of a confirmed enrollment, in as few statements as its invariants allow.

A first confirmation ran 21 statements (four UPDATEs of the user's row, an INSERT per backup
code, two audit rows apart, a read of the epoch at the end); these write the same rows in 5:
the method, the backup-code set (its DELETE and one INSERT), one UPDATE of the user that
returns the new credential epoch, and the audit rows in one INSERT. With its three reads (the
user, locked, the methods, and how the enrollment started) a first confirmation runs 8. Each
write is a HotStatement (prepared by name, run through libpq on PostgreSQL): a morning that
enrolls a whole company runs them all.
"""

from __future__ import annotations

from functools import lru_cache

from twofactor_server.storage.audit_rows import INSERT_AUDIT_EVENT, audit_params, audit_placeholders
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.hot_statements import HotStatement
from twofactor_server.storage.records import EnrollmentStartRecord, NewAuditEvent

_ENABLE_PENDING_METHOD = HotStatement(
    "twofactor_enable_pending_method",
    "UPDATE methods SET enabled_at = %(now)s, pending_since = NULL, "
    "secret = COALESCE(pending_secret, secret), pending_secret = NULL "
    "WHERE user_id = %(u)s AND method = %(m)s AND pending_since IS NOT NULL RETURNING 1",
)
_DELETE_BACKUP_CODES = HotStatement(
    "twofactor_delete_backup_codes", "DELETE FROM backup_codes WHERE user_id = %(u)s"
)
_CONFIRM_USER = HotStatement(
    "twofactor_confirm_user",
    "UPDATE users SET failed_attempts = 0, locked_until = NULL, last_verified_at = %(now)s, "
    "totp_last_step = COALESCE(%(step)s, totp_last_step), "
    "backup_codes_generated_at = CASE WHEN %(codes)s = 1 THEN %(now)s ELSE backup_codes_generated_at END, "
    "credential_epoch = credential_epoch + 1 WHERE user_id = %(u)s RETURNING credential_epoch",
)


def enable_pending_method(tx: Transaction, user_id: str, method: str, now_ms: int) -> bool:
    """The pending enrollment becomes the enabled method (the pending secret the secret).
    The caller moves the credential epoch on in the same transaction (confirm_user)."""
    return tx.hot_row(_ENABLE_PENDING_METHOD, {"u": user_id, "m": method, "now": now_ms}) is not None


def store_backup_code_rows(tx: Transaction, user_id: str, codes: list[tuple[bytes, bytes]]) -> None:
    """The user's backup codes become `codes`, (keyed hash, ciphertext) each, in one INSERT;
    the old set is gone in the same transaction. At least one code (settings: 1 to 100)."""
    delete_backup_code_rows(tx, user_id)
    params: dict[str, object] = {"u": user_id}
    for position, (code_hash, ciphertext) in enumerate(codes):
        params |= {f"h{position}": code_hash, f"c{position}": ciphertext}
    tx.hot_last(_insert_backup_codes(len(codes)), params)  # with COMMIT, when the last


def delete_backup_code_rows(tx: Transaction, user_id: str) -> None:
    """Every backup code of the user, used or not."""
    tx.hot_row(_DELETE_BACKUP_CODES, {"u": user_id})


@lru_cache(maxsize=8)
def _insert_backup_codes(count: int) -> HotStatement:
    """The INSERT of a set of `count` codes (fixed per policy: one prepared statement)."""
    values = ", ".join(f"(%(u)s, {p}, %(h{p})s, %(c{p})s)" for p in range(count))
    return HotStatement(
        f"twofactor_insert_backup_codes_{count}",
        f"INSERT INTO backup_codes (user_id, position, code_hash, code_ciphertext) VALUES {values}",  # noqa: S608
        binary=frozenset(f"{column}{p}" for p in range(count) for column in ("h", "c")),
    )


def confirm_user(
    tx: Transaction, user_id: str, now_ms: int, *, totp_step: int | None, new_backup_codes: bool
) -> int:
    """One UPDATE of the user who just proved a new method: failures and lock cleared, last
    verified now, the authenticator's accepted step recorded (it can't log in again), the
    backup set's time when a new set was stored, and the credential epoch moved on, so step-up
    proofs from before stop working. Returns the new epoch."""
    row = tx.hot_row(
        _CONFIRM_USER, {"u": user_id, "now": now_ms, "step": totp_step, "codes": int(new_backup_codes)}
    )
    assert row is not None, "the caller holds the user's row lock"
    return int(row[0])


def add_audit_events(tx: Transaction, events: list[NewAuditEvent]) -> None:
    """The events in one INSERT, sent with COMMIT when it is the transaction's last statement."""
    params: dict[str, object] = {}
    for i, event in enumerate(events):
        params |= audit_params(event, f"e{i}_")
    tx.hot_last(_insert_audit_events(len(events)), params)


@lru_cache(maxsize=8)
def _insert_audit_events(count: int) -> HotStatement:
    rows = ", ".join(f"({audit_placeholders(f'e{i}_')})" for i in range(count))
    return HotStatement(f"twofactor_insert_audit_events_{count}", f"{INSERT_AUDIT_EVENT}VALUES {rows}")


def enrollment_start(
    tx: Transaction, user_id: str, method: str, pending_since: int
) -> EnrollmentStartRecord | None:
    """How the pending enrollment that started at `pending_since` started, as its start recorded;
    None when it recorded nothing (the previous release started it)."""
    row = tx.one(
        "SELECT with_proof, credential_epoch FROM enrollment_starts "
        "WHERE user_id = %(u)s AND method = %(m)s AND pending_since = %(t)s",
        {"u": user_id, "m": method, "t": pending_since},
    )
    if row is None:
        return None
    epoch = row["credential_epoch"]
    return EnrollmentStartRecord(bool(row["with_proof"]), None if epoch is None else int(epoch))
