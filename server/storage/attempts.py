"""The statements of a Verify attempt with an authenticator code, as small functions over a Transaction.

The accepted path is one statement: accept_totp_step_unlocked decides, in one conditional
UPDATE serialized by the user's row lock, that the user is not locked, that the time step is
newer than every step accepted before and that the user's methods are still as they were when
the sealed secret the code was checked against was read (verify_state.secret_version, which
triggers move on with every change of them: migration 0008); it clears the failure count and
returns what the answer needs. The rest (the snapshot read, the attempt counted before a wrong
code is settled, the decision under the row lock) is the path of wrong codes, locks and stale
caches.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache

from twofactor_server.storage.audit_rows import INSERT_AUDIT_EVENT, audit_params, audit_placeholders
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.hot_statements import HotStatement
from twofactor_server.storage.records import AcceptedStep, NewAuditEvent, VerifySnapshot
from twofactor_server.storage.store import add_audit_event

# The sealed secret a code was checked against is still the user's enabled one (under the row
# lock, where the caller read the methods rows in the same transaction).
_STILL_ENABLED = (
    "AND EXISTS (SELECT 1 FROM methods m WHERE m.user_id = %(u)s AND m.method = 'authenticator' "
    "AND m.enabled_at IS NOT NULL AND m.secret = %(sealed)s) "
)
# The lock rule of domain/lockout.lock_of, for a statement that decides without the row lock held.
_UNLOCKED = "AND failed_attempts < %(max_failures)s AND (locked_until IS NULL OR locked_until <= %(now)s) "
# Without the row lock: the user's methods rows are as they were when the secret was read with
# this version (one key probe of verify_state instead of the methods row and its ciphertext).
_SAME_METHODS = (
    "AND EXISTS (SELECT 1 FROM verify_state v WHERE v.user_id = %(u)s AND v.secret_version = %(version)s) "
)
# ... and the users row's credential epoch is the one read with it. The version alone is not
# enough: an UPDATE that waited for the row lock of a reset, enrollment or disable re-checks its
# WHERE clause on the newest users row only (READ COMMITTED's EvalPlanQual), while verify_state,
# joined or sub-selected, is still read as the statement's snapshot saw it, before the change
# committed. Every such change moves the epoch on in its own transaction (store.py), so this
# condition, on the locked row itself, fails once it committed.
_SAME_EPOCH = "AND credential_epoch = %(epoch)s "
# Fixed SQL text below: every value is a bound parameter.
_SET_ACCEPTED = (
    "UPDATE users SET totp_last_step = %(s)s, failed_attempts = 0, locked_until = NULL, "
    "last_verified_at = %(now)s "
)
_NEWER_STEP = "AND (totp_last_step IS NULL OR totp_last_step < %(s)s) "
_ACCEPT = f"{_SET_ACCEPTED}WHERE user_id = %(u)s {_NEWER_STEP}{_STILL_ENABLED}"
# PostgreSQL: the version checked and the backup codes returned from one probe of verify_state.
# (SQLite's RETURNING can't name a table of UPDATE ... FROM: there, an EXISTS and a sub-select.)
_ACCEPT_UNLOCKED_POSTGRES = (
    f"{_SET_ACCEPTED}FROM verify_state v WHERE users.user_id = %(u)s AND v.user_id = %(u)s "
    f"AND v.secret_version = %(version)s {_SAME_EPOCH}{_NEWER_STEP}{_UNLOCKED}"
)
_ACCEPT_UNLOCKED_SQLITE = (
    f"{_SET_ACCEPTED}WHERE user_id = %(u)s {_NEWER_STEP}{_SAME_METHODS}{_SAME_EPOCH}{_UNLOCKED}"
)


def _audited(accepting: str) -> str:
    """An accepting UPDATE (returning backup_left and credential_epoch) that writes its audit
    event in the same statement, a data-modifying CTE: only when it accepted."""
    return (  # the f-string part is fixed SQL text; every value is a bound parameter
        f"WITH accepted AS ({accepting}), "  # noqa: S608
        f"logged AS ({INSERT_AUDIT_EVENT}SELECT {audit_placeholders('audit_')} FROM accepted) "
        "SELECT backup_left, credential_epoch FROM accepted"
    )


_ACCEPTING_UNLOCKED_POSTGRES = (
    f"{_ACCEPT_UNLOCKED_POSTGRES}RETURNING v.backup_codes_unused AS backup_left, credential_epoch"
)
_ACCEPT_UNLOCKED_HOT = HotStatement("twofactor_accept_unlocked", _ACCEPTING_UNLOCKED_POSTGRES)
_ACCEPT_UNLOCKED_AUDITED_HOT = HotStatement(
    "twofactor_accept_unlocked_audited", _audited(_ACCEPTING_UNLOCKED_POSTGRES)
)


def verify_snapshot(tx: Transaction, user_id: str) -> VerifySnapshot | None:
    """The user's lock state, last accepted step and enabled authenticator secret, in one read
    (None: unknown user)."""
    row = tx.one(
        "SELECT u.failed_attempts, u.locked_until, u.totp_last_step, u.credential_epoch, "
        "m.secret AS authenticator_secret, v.secret_version FROM users u "
        "LEFT JOIN methods m ON m.user_id = u.user_id AND m.method = 'authenticator' "
        "AND m.enabled_at IS NOT NULL LEFT JOIN verify_state v ON v.user_id = u.user_id "
        "WHERE u.user_id = %(u)s",
        {"u": user_id},
    )
    return None if row is None else VerifySnapshot(**row)


def reserve_attempt(
    tx: Transaction, user_id: str, seen: VerifySnapshot, *, failed_attempts: int, locked_until: int | None
) -> bool:
    """Count an attempt before its code is settled: set the counters to what one more failure
    makes of `seen`, if they are still what was read (the credential epoch too: a reset or new
    enrollment in between is not this code's to count against). False when something moved them."""
    return (
        tx.execute(
            "UPDATE users SET failed_attempts = %(f)s, locked_until = %(l)s "
            "WHERE user_id = %(u)s AND failed_attempts = %(seen_f)s "
            "AND COALESCE(locked_until, -1) = COALESCE(%(seen_l)s, -1) AND credential_epoch = %(seen_e)s",
            {
                "u": user_id,
                "f": failed_attempts,
                "l": locked_until,
                "seen_f": seen.failed_attempts,
                "seen_l": seen.locked_until,
                "seen_e": seen.credential_epoch,
            },
        )
        == 1
    )


def count_failure_unlocked(
    tx: Transaction,
    user_id: str,
    secret_version: int,
    epoch: int,
    now_ms: int,
    *,
    unlocked_below: int,
    threshold: int,
    schedule: tuple[tuple[int, int | None], ...],
    later: int | None,
) -> tuple[int, int | None] | None:
    """Count a wrong authenticator code in one statement, under the same conditions as
    accept_totp_step_unlocked accepts a right one: the user is not locked and the user's methods
    and credential epoch are still at `secret_version` and `epoch` (as when the secret the code
    was checked against was read).
    The new count sets locked_until as
    count_failure would (domain/lockout.lock_schedule: `schedule` pairs, `later` past them;
    None keeps it; a count at `unlocked_below` locks for good and clears it).

    Returns the new (failed_attempts, locked_until), or None when nothing was counted (locked,
    secret replaced, unknown user): the caller reads the user afresh.
    """
    params: dict[str, object] = {
        "u": user_id,
        "now": now_ms,
        "version": secret_version,
        "epoch": epoch,
        "max_failures": unlocked_below,
        "threshold": threshold,
        "later": later,
    }
    for i, (failures, until) in enumerate(schedule):
        params[f"k{i}"], params[f"l{i}"] = failures, until
    row = tx.hot_row(_count_statement(len(schedule)), params)
    return None if row is None else (int(row[0]), None if row[1] is None else int(row[1]))


@lru_cache(maxsize=8)
def _count_statement(steps: int) -> HotStatement:
    """The counting UPDATE for a schedule of `steps` pairs (fixed per policy: one prepared statement)."""
    return HotStatement(f"twofactor_count_failure_{steps}", _count_sql(steps))


def _count_sql(steps: int) -> str:
    grows = "".join(
        f"WHEN failed_attempts + 1 = %(k{i})s THEN COALESCE(%(l{i})s, locked_until) " for i in range(steps)
    )
    return (  # fixed SQL text: every value is a bound parameter
        "UPDATE users SET failed_attempts = failed_attempts + 1, locked_until = CASE "  # noqa: S608
        "WHEN failed_attempts + 1 >= %(max_failures)s THEN NULL "
        "WHEN failed_attempts + 1 < %(threshold)s THEN locked_until "
        f"{grows}ELSE COALESCE(%(later)s, locked_until) END "
        f"WHERE user_id = %(u)s {_UNLOCKED}{_SAME_METHODS}{_SAME_EPOCH}"
        "RETURNING failed_attempts, locked_until"
    )


def set_attempts(tx: Transaction, user_id: str, failed_attempts: int, locked_until: int | None) -> None:
    tx.execute(
        "UPDATE users SET failed_attempts = %(f)s, locked_until = %(l)s WHERE user_id = %(u)s",
        {"u": user_id, "f": failed_attempts, "l": locked_until},
    )


# The user's unused backup codes: one key probe of the count the database keeps (migration
# 0008: triggers on backup_codes, whoever writes them), not a count of backup_codes.
_BACKUP_LEFT = "COALESCE((SELECT c.backup_codes_unused FROM verify_state c WHERE c.user_id = %(u)s), 0)"


def accept_totp_step(
    tx: Transaction,
    user_id: str,
    step: int,
    sealed_secret: bytes,
    now_ms: int,
    audit: NewAuditEvent | None = None,
) -> AcceptedStep | None:
    """Accept an authenticator code's time step under the user's row lock (the caller checked
    the lock and read the methods in this transaction), clearing the failure count; return the
    unused backup codes and the credential epoch.

    The step is the replay guard (RFC 6238 §5.2): it must be newer than every step accepted
    before. The sealed secret must still be the enabled one the code was checked against (a
    key rotation takes no user lock). None when the step was used or the secret replaced.
    With `audit`, PostgreSQL writes the audit event in the same statement; SQLite in a second.
    """
    params = {"u": user_id, "s": step, "now": now_ms, "sealed": sealed_secret}
    return _accepted(tx, _ACCEPT, params, audit, f"RETURNING {_BACKUP_LEFT} AS backup_left, ")


def accept_totp_step_unlocked(
    tx: Transaction,
    user_id: str,
    step: int,
    secret_version: int,
    epoch: int,
    now_ms: int,
    audit: NewAuditEvent | None = None,
    *,
    unlocked_below: int,
) -> AcceptedStep | None:
    """Accept an authenticator code's time step in one atomic statement, for a caller that holds
    no row lock (the Verify fast path): the step is newer than every step accepted before, the
    user is not locked (failures below `unlocked_below`, the policy's max_consecutive_failures,
    and no lock in force), and the user's methods and credential epoch are still at
    `secret_version` and `epoch`, as read with the sealed secret the code was checked against (a
    reset, a new enrollment, a disabled method or a key rotation moves the version on, and all
    but the rotation the epoch: a stale cache touches no row, even in a statement that waited
    for the changing transaction's row lock). Clears the failure count; returns the unused
    backup codes and the credential epoch, or None.

    PostgreSQL re-checks the condition on the newest row version once a concurrent UPDATE that
    counts a wrong code commits, so a right code is accepted only if no count that locks the
    user came first. With `audit`, PostgreSQL writes the audit event in that same statement (a
    data-modifying CTE); SQLite needs a second one, so its callers pass `audit` only inside a
    transaction.
    """
    params = {
        "u": user_id,
        "s": step,
        "now": now_ms,
        "version": secret_version,
        "epoch": epoch,
        "max_failures": unlocked_below,
    }
    if tx.dialect == "postgres":  # the one statement of the common login: run as a HotStatement
        if audit is None:
            row = tx.hot_row(_ACCEPT_UNLOCKED_HOT, params)
        else:
            row = tx.hot_row(_ACCEPT_UNLOCKED_AUDITED_HOT, {**params, **audit_params(audit, "audit_")})
        return None if row is None else AcceptedStep(*row)
    return _accepted(tx, _ACCEPT_UNLOCKED_SQLITE, params, audit, f"RETURNING {_BACKUP_LEFT} AS backup_left, ")


def _accepted(
    tx: Transaction, update: str, params: dict[str, object], audit: NewAuditEvent | None, returning: str
) -> AcceptedStep | None:
    """Run an accepting UPDATE (with its audit event) and read what it returns."""
    if audit is not None and tx.dialect == "postgres":
        row = tx.one(
            _audited(f"{update}{returning}credential_epoch"), {**params, **audit_params(audit, "audit_")}
        )
    else:
        row = tx.one(f"{update}{returning}credential_epoch", params)
        if row is not None and audit is not None:
            add_audit_event(tx, **asdict(audit))
    return None if row is None else AcceptedStep(int(row["backup_left"]), int(row["credential_epoch"]))
