"""Typed rows: what the storage layer hands upward. Nothing above storage knows a column name."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple


def columns(record: type) -> tuple[str, ...]:
    """A record's fields, in order: the columns a statement names for it. A row read by position
    (`UserRecord(*row)`, a HotStatement's) is built in this order."""
    return tuple(field.name for field in fields(record))


def select_list(record: type, table: str = "") -> str:
    """The record's columns as a SELECT list (`u.user_id, u.email, ...` with table `u`). A
    statement names what it reads rather than `SELECT *`, so a column that a later migration
    adds doesn't break the release still running beside it during a rolling deploy."""
    prefix = f"{table}." if table else ""
    return ", ".join(prefix + name for name in columns(record))


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    email: str | None
    phone: str | None
    created_at: int
    last_verified_at: int | None
    failed_attempts: int
    locked_until: int | None
    totp_last_step: int | None
    backup_codes_generated_at: int | None
    credential_epoch: int  # moves on with every credential change; step-up proofs carry it


class Sender(NamedTuple):
    """Read under the user's row lock as a code is sent: where it goes ("" when the contact is
    missing) and the user's lock columns, which refuse the send while a lock holds."""

    destination: str
    failed_attempts: int
    locked_until: int | None


@dataclass(frozen=True, slots=True)
class MethodRecord:
    user_id: str
    method: str
    enabled_at: int | None
    pending_since: int | None
    secret: bytes | None  # authenticator: the sealed TOTP secret
    pending_secret: bytes | None  # authenticator: the sealed secret being enrolled

    @property
    def enabled(self) -> bool:
        return self.enabled_at is not None

    @property
    def pending(self) -> bool:
        return self.pending_since is not None


@dataclass(frozen=True, slots=True)
class EnrollmentStartRecord:
    """How a pending enrollment started (enrollment_starts): with a step-up proof or not, and
    the user's credential epoch then (None for a row the release before wrote)."""

    with_proof: bool
    credential_epoch: int | None


@dataclass(frozen=True, slots=True)
class VerifySnapshot:
    """What the accepted-authenticator fast path reads: the lock state, the last accepted step,
    the credential epoch, the sealed secret and the version of the user's methods it was read at."""

    failed_attempts: int
    locked_until: int | None
    totp_last_step: int | None
    credential_epoch: int  # the unlocked statements check it with the version (storage/attempts.py)
    authenticator_secret: bytes | None
    secret_version: int | None  # None: no verify_state row (then nothing is decided unlocked)


class AcceptedStep(NamedTuple):
    """What accepting an authenticator code returns: the unused backup codes and the epoch.
    (A NamedTuple: made on every accepted login, from the statement's row.)"""

    backup_left: int
    credential_epoch: int


@dataclass(frozen=True, slots=True)
class BackupCodeRecord:
    position: int
    code_hash: bytes
    code_ciphertext: bytes


@dataclass(frozen=True, slots=True)
class ChallengeRecord:
    challenge_id: str
    user_id: str
    method: str
    purpose: str
    destination: str
    code_hash: bytes
    code_ciphertext: bytes | None
    idempotency_key: str | None
    locale: str
    created_at: int
    expires_at: int
    attempts: int
    consumed_at: int | None
    superseded_at: int | None
    delivery_status: str
    delivery_attempts: int
    provider_message_id: str | None
    failure_reason: str | None
    updated_at: int
    publish_generation: int  # a delivery message of another generation is a no-op
    published_at: int | None  # None: not known to be queued yet; the code is not live
    lease_until: int | None  # while 'sending': the worker's claim runs out then
    next_publish_at: int | None  # while 'queued': recovery publishes again from then
    notice: str | None  # purpose 'notice': which change the email tells of


@dataclass(frozen=True, slots=True)
class ChallengeStatus:
    """What a caller is told of a challenge: the columns of ChallengeRecord a ChallengeView shows."""

    challenge_id: str
    user_id: str
    method: str
    destination: str
    created_at: int
    expires_at: int
    delivery_status: str
    delivery_attempts: int
    provider_message_id: str | None
    failure_reason: str | None


@dataclass(frozen=True, slots=True)
class NewChallenge:
    """A challenge to insert: the columns the sender chooses; the rest start at their defaults."""

    challenge_id: str
    user_id: str
    method: str
    purpose: str
    destination: str
    code_hash: bytes
    code_ciphertext: bytes  # the sealed code; for a notice, its sealed detail
    idempotency_key: str | None
    locale: str
    created_at: int
    expires_at: int
    notice: str | None = None
    # purpose 'contact': the user's credential epoch the change was authorized at (migration 0013)
    credential_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class NewAuditEvent:
    """An audit event to insert (event_id comes from the database)."""

    at: int
    actor: str
    user_id: str
    action: str
    request_id: str
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class StoredBackupCode:
    """A backup code row as key rotation reads it (used or not)."""

    user_id: str
    position: int
    code_hash: bytes
    code_ciphertext: bytes


@dataclass(frozen=True, slots=True)
class KeyUsageRecord:
    """How many stored values of one kind were made under one key version."""

    kind: str
    version: int
    count: int
    expires_by_ms: int | None  # waiting challenge codes: when the last of them expires
