"""The SQL of challenges: codes sent by email or SMS, and their delivery (the outbox).

Times are integer milliseconds since the epoch. Single-use and counting rules
are single conditional UPDATEs whose row count says who won.

Purposes: 'login' and 'enrollment' codes; 'contact', a code to a new address that takes
effect once confirmed; 'notice', an email telling the user of a change (no code: it
counts toward no send limit and supersedes nothing).

A challenge's delivery: inserted 'queued' and unpublished; published (its message is known to
be in the queue: only then is its code live and does it supersede older codes) or 'void' (the
publish failed and the caller was told UNAVAILABLE); claimed 'sending' by one worker under a
lease; then 'sent', 'failed' or 'expired'. Recovery republishes what may be lost, with a new
generation; a late first message still delivers it (claim_delivery).
"""

from __future__ import annotations

import dataclasses

from twofactor_server.storage import store
from twofactor_server.storage.audit_rows import INSERT_AUDIT_EVENT, audit_params, audit_placeholders
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.hot_statements import HotStatement
from twofactor_server.storage.records import (
    ChallengeRecord,
    ChallengeStatus,
    NewAuditEvent,
    NewChallenge,
    Sender,
    columns,
    select_list,
)
from twofactor_server.storage.send_history import LAST_SEND_OF_METHOD
from twofactor_server.storage.units import in_list

_NEW_CHALLENGE_COLUMNS = columns(NewChallenge)
_CHALLENGE_COLUMNS = select_list(ChallengeRecord)
_STATUS_COLUMNS = columns(ChallengeStatus)
_INSERT_CHALLENGE = (
    f"INSERT INTO challenges ({', '.join(_NEW_CHALLENGE_COLUMNS)}, delivery_status, updated_at, "  # noqa: S608
    "publish_generation) "
    f"VALUES ({', '.join(f'%({c})s' for c in _NEW_CHALLENGE_COLUMNS)}, 'queued', %(created_at)s, 0)"
)
_INSERT_CHALLENGE_AUDITED = (  # the challenge and its audit event in one statement (PostgreSQL)
    f"WITH inserted AS ({_INSERT_CHALLENGE}) {INSERT_AUDIT_EVENT}VALUES ({audit_placeholders('audit_')})"
)
# Published: the message is known to be in the queue (%(c)s: the challenge, %(u)s: its user).
# The user's row is locked first, in the same statement (an uncorrelated sub-select runs
# before any challenge row is locked): a publish then supersedes the user's older codes
# under the same lock SendCode takes first. Without it two publishes for one user lock
# each other's older rows in scan order, and PostgreSQL aborts one as a deadlock.
_PUBLISH = (
    "published_at = %(now)s, updated_at = %(now)s "
    "WHERE challenge_id = %(c)s AND published_at IS NULL AND delivery_status <> 'void' "
    "AND EXISTS (SELECT 1 FROM users WHERE user_id = %(u)s{row_lock})"
)
_PUBLISH_BY_ROW_LOCK = {lock: _PUBLISH.format(row_lock=lock) for lock in ("", " FOR UPDATE")}
# publish_new on PostgreSQL: the publish and the superseding in one statement. The same lock
# order as mark_published: the publish UPDATE locks the user's row (its sub-select, an InitPlan,
# runs before its scan), then the new row; the superseding UPDATE, which no part of the main
# query reads, runs to completion after it (PostgreSQL runs such a CTE once the main query is
# done) and only then locks the older rows. Same login / purpose and method rules as
# _supersede_older. Only the status columns come back: the whole row (24 columns, the code's
# hash and seal among them) cost its decoding on every send.
_PUBLISH_AND_SUPERSEDE = (
    f"WITH published AS (UPDATE challenges SET {_PUBLISH_BY_ROW_LOCK[' FOR UPDATE']} RETURNING *), "  # noqa: S608
    "superseded AS (UPDATE challenges AS older SET superseded_at = %(now)s, updated_at = %(now)s "
    "FROM published WHERE published.purpose <> 'notice' AND older.user_id = published.user_id "
    "AND older.purpose = published.purpose "
    "AND (published.purpose = 'login' OR older.method = published.method) "
    "AND older.challenge_id <> published.challenge_id AND (older.created_at < published.created_at "
    "OR (older.created_at = published.created_at AND older.challenge_id < published.challenge_id)) "
    "AND older.superseded_at IS NULL AND older.consumed_at IS NULL) "
    f"SELECT {select_list(ChallengeStatus, 'published')}, ({LAST_SEND_OF_METHOD}) AS last_send "
    "FROM published"
)
_PUBLISH_RETURNING_LAST_SEND = (  # publish_new on SQLite, before _supersede_older
    f"UPDATE challenges SET {_PUBLISH_BY_ROW_LOCK['']} "  # noqa: S608
    f"RETURNING {_CHALLENGE_COLUMNS}, ({LAST_SEND_OF_METHOD}) AS last_send"
)
_DESTINATION_LOCKS = 0x2FAC8  # first key of pg_advisory_xact_lock(int, int): twofactor's destinations
VOID_REASON = "not queued: the delivery queue was unavailable and the caller was told to retry"

# SendCode's statements, prepared by name and run through libpq (hot_statements.py).
_SEALED = frozenset({"code_hash", "code_ciphertext"})
_INSERT_CHALLENGE_HOT = HotStatement("twofactor_insert_challenge", _INSERT_CHALLENGE, binary=_SEALED)
_INSERT_CHALLENGE_AUDITED_HOT = HotStatement(
    "twofactor_insert_challenge_audited", _INSERT_CHALLENGE_AUDITED, binary=_SEALED
)
_LOCK_SENDER_HOT = {  # lock_sender on PostgreSQL, by the contact column a code goes to
    contact: HotStatement(
        f"twofactor_lock_sender_{contact}",
        "SELECT sends_to, failed_attempts, locked_until, "  # noqa: S608
        f"pg_advisory_xact_lock({_DESTINATION_LOCKS}, hashtext(sends_to)) AS destination_lock "
        f"FROM (SELECT COALESCE(%(d)s::text, {contact}) AS sends_to, failed_attempts, locked_until "
        "FROM users WHERE user_id = %(u)s FOR UPDATE) AS locked",
    )
    for contact in ("email", "phone")
}
_PUBLISH_AND_SUPERSEDE_HOT = HotStatement("twofactor_publish_new", _PUBLISH_AND_SUPERSEDE)
# The worker's claim: every delivery claims once (the row's columns in ChallengeRecord's order).
_CLAIM_DELIVERY = HotStatement(
    "twofactor_claim_delivery",
    "UPDATE challenges SET delivery_status = 'sending', delivery_attempts = delivery_attempts + 1, "  # noqa: S608
    "lease_until = %(until)s, updated_at = %(now)s "
    "WHERE challenge_id = %(c)s AND code_ciphertext IS NOT NULL AND (publish_generation = %(g)s "
    "OR (publish_generation > %(g)s AND delivery_attempts = 0)) "
    "AND (delivery_status = 'queued' OR (delivery_status = 'sending' "
    "AND (lease_until IS NULL OR lease_until <= %(now)s))) "
    f"RETURNING {_CHALLENGE_COLUMNS}",
)


def insert_challenge(tx: Transaction, challenge: NewChallenge, audit: NewAuditEvent | None = None) -> None:
    """Store a new challenge, queued for delivery but not yet published; with `audit`, the event
    that records it too (PostgreSQL: in the same statement, a data-modifying CTE)."""
    # A shallow dict: dataclasses.asdict deep-copies every value (the bytes too), 10 times the cost.
    params = {name: getattr(challenge, name) for name in _NEW_CHALLENGE_COLUMNS}
    if tx.dialect == "postgres":  # every SendCode inserts: run as a HotStatement, sent with COMMIT
        if audit is None:
            tx.hot_last(_INSERT_CHALLENGE_HOT, params)
        else:
            tx.hot_last(_INSERT_CHALLENGE_AUDITED_HOT, {**params, **audit_params(audit, "audit_")})
        return
    tx.execute(_INSERT_CHALLENGE, params)
    if audit is not None:
        store.add_audit_event(tx, **dataclasses.asdict(audit))


def lock_destination(tx: Transaction, destination: str) -> None:
    """Serialize senders to one address until commit, so its hourly count is exact.

    PostgreSQL: a transaction-scoped advisory lock on the address (the users who
    share it hold different row locks). SQLite: BEGIN IMMEDIATE already serializes.
    """
    if tx.row_lock:  # only PostgreSQL has row locks, and advisory locks
        tx.one(
            "SELECT pg_advisory_xact_lock(%(ns)s, hashtext(%(d)s)) AS locked",
            {"ns": _DESTINATION_LOCKS, "d": destination},
        )


def lock_sender(tx: Transaction, user_id: str, contact: str, new_destination: str | None) -> Sender | None:
    """Lock the user's row, then the destination (lock_destination), in one round trip; return
    where a code goes, `new_destination` or the user's `contact` ("email" or "phone"; "" when
    missing: then no destination lock) and the user's lock columns; None for an unknown user.

    The advisory lock is taken above the row lock in the plan (a FOR UPDATE sub-select is never
    flattened), so the order is the one every sender keeps: the user's row, then the address.
    The next statement reads the send counts with a snapshot taken after both waits. No other
    column comes back: the row's others would cost their decoding on every send."""
    params = {"u": user_id, "d": new_destination}
    if tx.row_lock:  # PostgreSQL; every SendCode locks: run as a HotStatement
        locked = tx.hot_row(_LOCK_SENDER_HOT[contact], params)
        return None if locked is None else Sender(locked[0] or "", locked[1], locked[2])
    # SQLite: the transaction is exclusive already
    assert contact in ("email", "phone")
    sql = f"SELECT COALESCE(%(d)s, {contact}, '') AS destination, failed_attempts, locked_until FROM users "  # noqa: S608
    row = tx.one(sql + "WHERE user_id = %(u)s", params)
    return None if row is None else Sender(**row)


def get_challenge(tx: Transaction, challenge_id: str) -> ChallengeRecord | None:
    sql = f"SELECT {_CHALLENGE_COLUMNS} FROM challenges WHERE challenge_id = %(c)s"  # noqa: S608
    row = tx.one(sql, {"c": challenge_id})
    return None if row is None else ChallengeRecord(**row)


def challenge_by_idempotency_key(tx: Transaction, user_id: str, key: str) -> ChallengeRecord | None:
    row = tx.one(
        f"SELECT {_CHALLENGE_COLUMNS} FROM challenges WHERE user_id = %(u)s AND idempotency_key = %(k)s",  # noqa: S608
        {"u": user_id, "k": key},
    )
    return None if row is None else ChallengeRecord(**row)


def forget_idempotency_key(tx: Transaction, challenge_id: str) -> None:
    tx.execute("UPDATE challenges SET idempotency_key = NULL WHERE challenge_id = %(c)s", {"c": challenge_id})


def mark_published(tx: Transaction, challenge: ChallengeRecord, now_ms: int) -> bool:
    """Record that the challenge's message is in the queue, and supersede the user's older codes.

    Login codes replace older login codes of any method; an enrollment or contact code
    replaces older codes of its purpose and method; a notice replaces nothing. Only older
    codes: a newer one published first is left alone. False when it was already recorded.
    """
    published = tx.execute(
        f"UPDATE challenges SET {_PUBLISH_BY_ROW_LOCK[tx.row_lock]}",  # noqa: S608 - constants only
        {"c": challenge.challenge_id, "u": challenge.user_id, "now": now_ms},
    )
    if published != 1:
        return False
    _supersede_older(tx, challenge, now_ms)
    return True


def publish_new(
    tx: Transaction, challenge_id: str, user_id: str, method: str, now_ms: int
) -> tuple[ChallengeStatus, int | None] | None:
    """mark_published for a challenge of `method` this caller just created: its status as published
    and the user's last send of the method (send_history.last_send_ms), or None when the publish was already
    recorded (or the send is void).

    PostgreSQL: one statement (_PUBLISH_AND_SUPERSEDE), atomic by itself, so the caller may run
    it outside a transaction (Database.statements). SQLite: two, in the caller's transaction.
    """
    params = {"c": challenge_id, "u": user_id, "m": method, "now": now_ms}
    if tx.dialect == "postgres":  # every SendCode publishes: run as a HotStatement
        published = tx.hot_row(_PUBLISH_AND_SUPERSEDE_HOT, params)
        if published is None:
            return None
        *status_values, last_send = published
        status = ChallengeStatus(*status_values)
    else:
        row = tx.one(_PUBLISH_RETURNING_LAST_SEND, params)
        if row is None:
            return None
        last_send = row.pop("last_send")
        challenge = ChallengeRecord(**row)
        _supersede_older(tx, challenge, now_ms)
        status = ChallengeStatus(**{c: getattr(challenge, c) for c in _STATUS_COLUMNS})
    return status, None if last_send is None else int(last_send)


def _supersede_older(tx: Transaction, challenge: ChallengeRecord, now_ms: int) -> None:
    if challenge.purpose == "notice":
        return
    method_clause = "AND method = %(m)s" if challenge.purpose != "login" else ""
    tx.execute(
        "UPDATE challenges SET superseded_at = %(now)s, updated_at = %(now)s "  # noqa: S608
        f"WHERE user_id = %(u)s AND purpose = %(p)s {method_clause} AND challenge_id <> %(c)s "
        "AND (created_at < %(t)s OR (created_at = %(t)s AND challenge_id < %(c)s)) "
        "AND superseded_at IS NULL AND consumed_at IS NULL",
        {
            "u": challenge.user_id,
            "p": challenge.purpose,
            "m": challenge.method,
            "c": challenge.challenge_id,
            "t": challenge.created_at,
            "now": now_ms,
        },
    )


def void_unpublished(tx: Transaction, challenge_id: str, now_ms: int) -> bool:
    """Void a first publish that failed: never delivered, counted nowhere, superseding nothing.

    False when it can't be voided: a worker or recovery took it (the message reached the queue, or
    recovery published it again): it will be delivered. Also voided: a withdrawn row no attempt took."""
    return (
        tx.execute(
            "UPDATE challenges SET delivery_status = 'void', failure_reason = %(why)s, "
            "code_ciphertext = NULL, idempotency_key = NULL, updated_at = %(now)s "
            "WHERE challenge_id = %(c)s AND published_at IS NULL AND publish_generation = 0 "
            "AND (delivery_status = 'queued' OR (delivery_status = 'expired' AND delivery_attempts = 0))",
            {"c": challenge_id, "now": now_ms, "why": VOID_REASON},
        )
        == 1
    )


def live_challenges(
    tx: Transaction, user_id: str, purpose: str, now_ms: int, max_attempts: int, *, epoch: int | None = None
) -> list[ChallengeRecord]:
    """Codes that can still be accepted, newest first: published ones, and any a worker already
    took (its message got through though the publish was not recorded yet). With `epoch` (the
    user's credential epoch now), only those authorized at it (contact changes, migration 0013;
    a row without one, as before)."""
    at_epoch = "AND (credential_epoch IS NULL OR credential_epoch = %(e)s) " if epoch is not None else ""
    rows = tx.all(
        f"SELECT {_CHALLENGE_COLUMNS} FROM challenges "  # noqa: S608
        "WHERE user_id = %(u)s AND purpose = %(p)s AND consumed_at IS NULL "
        "AND superseded_at IS NULL AND expires_at > %(now)s AND attempts < %(max)s "
        "AND (published_at IS NOT NULL OR delivery_status IN ('sending', 'sent')) "
        f"AND delivery_status NOT IN ('failed', 'void') {at_epoch}"
        "ORDER BY created_at DESC",
        {"u": user_id, "p": purpose, "now": now_ms, "max": max_attempts, "e": epoch},
    )
    return [ChallengeRecord(**row) for row in rows]


def carry_contact_changes(tx: Transaction, user_id: str, epoch: int, only: tuple[str, ...] = ()) -> None:
    """The user's unused contact changes authorized at `epoch` (of them, the challenges `only`
    names, when given) are authorized at the user's epoch now: the epoch moved on for the contact
    change itself (the other half of one SetContact applied, or another change confirmed)."""
    names, ids = in_list("c", list(only))
    named = f"AND challenge_id IN ({names}) " if only else ""
    tx.execute(
        "UPDATE challenges SET credential_epoch = (SELECT credential_epoch FROM users WHERE user_id = %(u)s) "  # noqa: S608
        f"WHERE user_id = %(u)s AND purpose = 'contact' AND credential_epoch = %(e)s {named}"
        "AND consumed_at IS NULL AND superseded_at IS NULL",
        {"u": user_id, "e": epoch, **ids},
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


def claim_delivery(
    tx: Transaction, challenge_id: str, generation: int, now_ms: int, lease_ms: int
) -> ChallengeRecord | None:
    """Take a challenge's delivery for one attempt under a lease; None when there is nothing to send.

    Only a queued row, or one whose lease ran out (its worker died), is taken; by a message of
    its generation, or of an older one while no attempt was made: recovery may have taken the
    first message for lost when it was only late in a long queue (delivery/recovery.py)."""
    row = tx.hot_row(
        _CLAIM_DELIVERY, {"c": challenge_id, "g": generation, "now": now_ms, "until": now_ms + lease_ms}
    )
    return None if row is None else ChallengeRecord(*row)


def mark_delivery(
    tx: Transaction,
    claimed: ChallengeRecord,
    status: str,
    now_ms: int,
    *,
    provider_message_id: str | None = None,
    failure_reason: str | None = None,
    wipe_code: bool,
    republish_at: int | None = None,
) -> str | None:
    """Record the outcome of the attempt that claimed `claimed`, release its lease; the status recorded.

    'queued' again means a retry is due, of the next generation (a copy recovery published before the
    attempt is stale); recovery republishes from `republish_at`. Only the holder of the claim records:
    after its lease ran out and another took over, a late outcome is None. A retry of a code withdrawn
    during the attempt would never run (no claim takes a row without its code): it ends 'expired' at once."""
    recorded = tx.hot_row(
        _MARK_DELIVERY,  # a HotStatement (prepared by name, run through libpq): every delivery records once
        {
            "c": claimed.challenge_id,
            "g": claimed.publish_generation,
            "n": claimed.delivery_attempts,
            "s": status,
            "now": now_ms,
            "pid": provider_message_id,
            "why": failure_reason,
            "wipe": int(wipe_code),
            "again": republish_at,
        },
    )
    return None if recorded is None else str(recorded[0])


_WITHDRAWN_RETRY = "%(s)s = 'queued' AND code_ciphertext IS NULL"  # mark_delivery's docstring
_MARK_DELIVERY = HotStatement(
    "twofactor_mark_delivery",
    f"UPDATE challenges SET delivery_status = CASE WHEN {_WITHDRAWN_RETRY} THEN 'expired' ELSE %(s)s END, "  # noqa: S608
    "updated_at = %(now)s, lease_until = NULL, next_publish_at = %(again)s, "  # a retry: the next's
    "publish_generation = publish_generation + CASE WHEN %(s)s = 'queued' THEN 1 ELSE 0 END, "
    "provider_message_id = COALESCE(%(pid)s, provider_message_id), "
    f"failure_reason = CASE WHEN {_WITHDRAWN_RETRY} THEN '{store.WITHDRAWN_REASON}' ELSE %(why)s END, "
    "code_ciphertext = CASE WHEN %(wipe)s = 1 THEN NULL ELSE code_ciphertext END "
    "WHERE challenge_id = %(c)s AND delivery_status = 'sending' AND publish_generation = %(g)s "
    "AND delivery_attempts = %(n)s RETURNING delivery_status",
)
