"""What the use cases return: plain values the API layer converts to protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

MAX_USER_ID_BYTES = 256  # user ids are the caller's; this bounds what we store and index


class Caller(NamedTuple):
    """Who is calling, for the audit log. (A NamedTuple, like VerifyOutcome: one is made for
    every call, in two thirds of a frozen dataclass's instructions.)"""

    actor: str = "system"
    request_id: str = ""


class VerifyResult(Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    LOCKED = "locked"

    # Members are singletons compared by identity: hash them by identity too, in C. Enum's own
    # __hash__ is Python (hash of the name), and every Verify looks these up in dicts.
    __hash__ = object.__hash__


class ConfirmResult(Enum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    LOCKED = "locked"


class CodeKind(Enum):
    AUTHENTICATOR = "authenticator"
    EMAIL = "email"
    SMS = "sms"
    BACKUP_CODE = "backup_code"

    __hash__ = object.__hash__  # as VerifyResult's


@dataclass(frozen=True)
class Lock:
    until_ms: int | None  # None with permanent=True: until an admin unlocks
    permanent: bool = False


@dataclass(frozen=True)
class UserState:
    user_id: str
    enabled_methods: tuple[str, ...]
    pending_methods: tuple[str, ...]
    email: str
    phone: str
    backup_codes_remaining: int
    failed_attempts: int
    lock: Lock | None
    created_at_ms: int
    last_verified_at_ms: int | None
    # Codes sent to a new address, waiting for ConfirmContact (GetStatus reads them; else empty).
    contact_changes: tuple[ChallengeView, ...] = ()


@dataclass(frozen=True)
class AuthenticatorSetup:
    secret_base32: str
    otpauth_uri: str
    qr_png: bytes = b""  # empty unless asked for
    qr_svg: str = ""


@dataclass(frozen=True)
class ChallengeView:
    challenge_id: str
    method: str
    destination: str
    expires_at_ms: int
    resend_after_ms: int
    delivery_status: str
    provider_message_id: str
    failure_reason: str
    delivery_attempts: int


@dataclass(frozen=True)
class EnrollmentStart:
    method: str
    authenticator: AuthenticatorSetup | None = None
    challenge: ChallengeView | None = None


@dataclass(frozen=True)
class Confirmation:
    result: ConfirmResult
    enabled_methods: tuple[str, ...]
    backup_codes: tuple[str, ...] = ()
    attempts_left: int = 0
    verification_token: str = ""  # a step-up proof, when confirmed

    @property
    def confirmed(self) -> bool:
        return self.result is ConfirmResult.CONFIRMED


@dataclass(frozen=True)
class ContactChange:
    """SetContact's answer: the contacts in force, and a confirmation code sent to each new
    address of an enabled method (in force only once ConfirmContact accepts it)."""

    state: UserState
    confirmations: tuple[ChallengeView, ...] = ()


@dataclass(frozen=True)
class ContactConfirmation:
    result: ConfirmResult
    state: UserState
    attempts_left: int = 0
    verification_token: str = ""  # a step-up proof, when confirmed


class VerifyOutcome(NamedTuple):
    """Verify's answer. A NamedTuple: every login makes one, and a frozen dataclass's __init__
    (object.__setattr__ per field) costs 2 % of an accepted Verify's instructions."""

    result: VerifyResult
    matched: CodeKind | None
    attempts_left: int
    backup_codes_remaining: int
    lock: Lock | None = None
    now_ms: int = 0
    verification_token: str = ""  # a step-up proof, when accepted


@dataclass(frozen=True)
class BackupCodeSet:
    codes: tuple[str, ...]
    generated_at_ms: int | None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event_id: int
    at: int  # ms since the epoch
    actor: str
    user_id: str
    action: str
    request_id: str
    outcome: str
    detail: str
