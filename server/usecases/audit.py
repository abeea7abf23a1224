"""The audit log: who did what to which user, and how it went. Never a code or a secret."""

from __future__ import annotations

from twofactor_server.domain.models import Caller
from twofactor_server.storage import store
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import NewAuditEvent

# Verify answers that are audit events: every failure, and acceptances with
# TWOFACTOR_AUDIT_VERIFICATIONS=all (backup codes always: backup_code_used).
VERIFICATION_REJECTED = "verification_rejected"
VERIFICATION_LOCKED = "verification_locked"
VERIFICATION_ACCEPTED = "verification_accepted"


def record(
    tx: Transaction,
    caller: Caller,
    at_ms: int,
    user_id: str,
    action: str,
    *,
    outcome: str = "success",
    detail: str = "",
) -> None:
    """Add an event in the caller's transaction, so it commits (or not) with what it describes."""
    store.add_audit_event(
        tx,
        at=at_ms,
        actor=caller.actor,
        user_id=user_id,
        action=action,
        request_id=caller.request_id,
        outcome=outcome,
        detail=detail,
    )


def spent_code(tx: Transaction, caller: Caller, at_ms: int, user_id: str, *, locked: bool) -> None:
    """The authenticator code just accepted, sent again: a double submit or a replay of a captured
    code. Not counted toward the lockout (it is spent), but an operator sees it."""
    action = VERIFICATION_LOCKED if locked else VERIFICATION_REJECTED
    record(tx, caller, at_ms, user_id, action, outcome="failure", detail="code already used")


def event(
    caller: Caller, at_ms: int, user_id: str, action: str, *, outcome: str = "success", detail: str = ""
) -> NewAuditEvent:
    """An event for storage to write within a statement of its own choosing (the fast Verify path)."""
    return NewAuditEvent(
        at=at_ms,
        actor=caller.actor,
        user_id=user_id,
        action=action,
        request_id=caller.request_id,
        outcome=outcome,
        detail=detail,
    )
