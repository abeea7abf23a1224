"""An audit event as INSERT INTO audit_events writes it: the one column list every statement that
records events uses (store.add_audit_event, enrollments.add_audit_events, and the statements
that write their event beside their own change: outbox's insert, attempts' acceptance)."""

from __future__ import annotations

from twofactor_server.storage.records import NewAuditEvent, columns

AUDIT_COLUMNS = columns(NewAuditEvent)
# Followed by VALUES (...) or SELECT ... of the columns' placeholders (audit_placeholders).
INSERT_AUDIT_EVENT = f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS)}) "


def audit_placeholders(prefix: str) -> str:
    """The event's values as named placeholders, `prefix` + column (audit_params fills them)."""
    return ", ".join(f"%({prefix}{column})s" for column in AUDIT_COLUMNS)


def audit_params(event: NewAuditEvent, prefix: str) -> dict[str, object]:
    """The event's values under the names audit_placeholders(prefix) gives them (a shallow read:
    dataclasses.asdict deep-copies every value)."""
    return {f"{prefix}{column}": getattr(event, column) for column in AUDIT_COLUMNS}
