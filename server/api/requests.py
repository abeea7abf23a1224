"""Checks on request fields that hold whatever the state (INVALID_ARGUMENT).

Every free-text field is "printable text": str.isprintable() refuses each character of
Unicode's "other" categories (controls with NUL, format characters such as U+202E,
surrogates, private use, unassigned code points) and every separator but the space. So no
field can carry a NUL, which PostgreSQL refuses, or text that reads differently than it is.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import timestamp_pb2
from twofactor.v1 import common_pb2 as common_pb
from twofactor.v1 import twofactor_service_pb2 as tf_pb

from twofactor_server.api.convert import METHOD_FROM_PROTO, QR_FORMAT_FROM_PROTO
from twofactor_server.domain import step_up
from twofactor_server.domain.errors import InvalidArgument
from twofactor_server.domain.models import MAX_USER_ID_BYTES

MAX_ACCOUNT_NAME_BYTES = 256
MAX_IDEMPOTENCY_KEY_BYTES = 128
MAX_LOCALE_BYTES = 35  # BCP 47's practical maximum
MAX_REASON_BYTES = 1024
MAX_CHALLENGE_ID_BYTES = 64
MAX_AUDIT_ACTION_BYTES = 64
MAX_AUDIT_ACTIONS = 50


def user_id(value: str) -> str:
    if not value.isprintable() or not 0 < len(value.encode()) <= MAX_USER_ID_BYTES:
        raise InvalidArgument(
            "INVALID_USER_ID", f"user_id must be 1 to {MAX_USER_ID_BYTES} bytes of printable text"
        )
    return value


def method(value: common_pb.Method.ValueType) -> str:
    name = METHOD_FROM_PROTO.get(value)
    if name is None:
        raise InvalidArgument(
            "INVALID_METHOD", "method must be METHOD_AUTHENTICATOR, METHOD_EMAIL or METHOD_SMS"
        )
    return name


def qr_formats(values: Iterable[tf_pb.QrCodeFormat.ValueType]) -> frozenset[str]:
    names = frozenset(QR_FORMAT_FROM_PROTO.get(value, "") for value in values)
    if "" in names:
        raise InvalidArgument(
            "INVALID_QR_CODE_FORMAT", "qr_formats may hold QR_CODE_FORMAT_PNG and QR_CODE_FORMAT_SVG"
        )
    return names


def bounded(value: str, *, field: str, reason: str, max_bytes: int, required: bool = False) -> str:
    # Printable first: encode() would fail on a surrogate.
    if not value.isprintable() or len(value.encode()) > max_bytes or (required and not value):
        requirement = f"1 to {max_bytes}" if required else f"at most {max_bytes}"
        raise InvalidArgument(reason, f"{field} must be {requirement} bytes of printable text")
    return value


def account_name(value: str) -> str:
    """The authenticator app's label for the account: no ':', which the key URI's label takes as
    the end of the issuer (as its %3A form), so apps would show another issuer or refuse it."""
    bounded(value, field="account_name", reason="INVALID_ACCOUNT_NAME", max_bytes=MAX_ACCOUNT_NAME_BYTES)
    if ":" in value:
        raise InvalidArgument(
            "INVALID_ACCOUNT_NAME", "account_name can't hold ':': the app's label uses it after the issuer"
        )
    return value


def verification_token(value: str) -> str:
    """A step-up proof as sent; whether it is valid is the use case's question (STEP_UP_REQUIRED)."""
    return bounded(
        value,
        field="verification_token",
        reason="INVALID_VERIFICATION_TOKEN",
        max_bytes=step_up.MAX_TOKEN_CHARS,
    )


def code(value: str) -> str:
    # Codes are short; anything long is not a code and is refused before any work.
    if not value or len(value) > 32:
        raise InvalidArgument("INVALID_CODE", "code must be 6 to 10 digits or a backup code like k7m2q-x9p4w")
    return value


def audit_actions(values: list[str]) -> tuple[str, ...]:
    if len(values) > MAX_AUDIT_ACTIONS or any(
        not 0 < len(v.encode()) <= MAX_AUDIT_ACTION_BYTES or not v.isprintable() for v in values
    ):
        raise InvalidArgument(
            "INVALID_AUDIT_FILTER",
            f"actions must be at most {MAX_AUDIT_ACTIONS} names of 1 to {MAX_AUDIT_ACTION_BYTES} bytes",
        )
    return tuple(dict.fromkeys(values))


def time_range(
    since: timestamp_pb2.Timestamp | None, until: timestamp_pb2.Timestamp | None
) -> tuple[int | None, int | None]:
    """[since, until) in milliseconds; until must come after since."""
    since_ms, until_ms = _audit_ms(since, "since"), _audit_ms(until, "until")
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise InvalidArgument("INVALID_AUDIT_FILTER", "until must be after since")
    return since_ms, until_ms


# Timestamp's own range (RFC 3339 years 0001 to 9999): outside it a value is no time, and its
# milliseconds may not fit the stores' 64-bit integers.
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799


def _audit_ms(value: timestamp_pb2.Timestamp | None, field: str) -> int | None:
    if value is None:
        return None
    if not (_MIN_TIMESTAMP_SECONDS <= value.seconds <= _MAX_TIMESTAMP_SECONDS and 0 <= value.nanos < 10**9):
        raise InvalidArgument(
            "INVALID_AUDIT_FILTER",
            f"{field} must be a time from year 0001 to 9999 (google.protobuf.Timestamp)",
        )
    return value.seconds * 1000 + value.nanos // 1_000_000
