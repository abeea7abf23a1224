"""The exceptions the SDK raises instead of grpc.RpcError.

The class is chosen by the gRPC status code and, within FAILED_PRECONDITION,
by the google.rpc.ErrorInfo reason, so callers can catch what they can fix
(`except ContactMissing`) and let the rest propagate.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from typing import cast

import grpc

from twofactor._status import status_from_metadata

__all__ = [
    "AdminResetDisabled",
    "ContactInUse",
    "ContactMissing",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "LastMethodRequired",
    "MethodNotAllowed",
    "NoPendingContactChange",
    "NotEnrolled",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RequestTooLarge",
    "StepUpRequired",
    "TwoFactorError",
    "Unauthenticated",
    "Unavailable",
    "UsageError",
    "UserLocked",
    "error_class",
    "error_from_rpc_error",
    "error_from_status",
]


class TwoFactorError(Exception):
    """A call failed. `reason` and `metadata` come from the server's google.rpc.ErrorInfo."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        *,
        domain: str = "",
        retry_after: datetime.timedelta | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.domain = domain
        # From google.rpc.RetryInfo, when the server says how long to wait.
        self.retry_after = retry_after
        # The x-request-id the call was sent with, to find it in the server's logs.
        self.request_id = request_id


class InvalidArgument(TwoFactorError):
    """The request is malformed whatever the state (INVALID_USER_ID, INVALID_CODE, ...)."""


class RequestTooLarge(InvalidArgument):
    """The request message is over the server's size limit (64 KiB; the largest valid request is a
    few KiB), or over the client's own `grpc.max_send_message_length`. `code` is RESOURCE_EXHAUSTED,
    gRPC's own refusal, with no reason; sending it again is refused again: shorten the fields."""


class NotFound(TwoFactorError):
    """The user or challenge does not exist (USER_NOT_FOUND, CHALLENGE_NOT_FOUND)."""


class FailedPrecondition(TwoFactorError):
    """The user's state must change before the call can succeed."""


class NotEnrolled(FailedPrecondition):
    """The method is not enabled or has no pending enrollment."""


class MethodNotAllowed(FailedPrecondition):
    """The operator's policy does not allow the method."""


class ContactMissing(FailedPrecondition):
    """No email address or mobile number is registered; `contact` says which."""

    @property
    def contact(self) -> str:
        """Which contact is missing: "email" or "phone"."""
        return self.metadata.get("contact", "")


class ContactInUse(FailedPrecondition):
    """The contact receives an enabled method's codes and can't be removed: disable the method
    first. `contact` says which ("email" or "phone")."""

    @property
    def contact(self) -> str:
        return self.metadata.get("contact", "")


class NoPendingContactChange(FailedPrecondition):
    """confirm_contact() without a change waiting for its code (none made, or it expired or
    was used up): call set_contact() again."""


class LastMethodRequired(FailedPrecondition):
    """The policy forces 2FA and this is the user's last method."""


class AdminResetDisabled(FailedPrecondition):
    """The policy forbids AdminService.ResetUser."""


class UserLocked(FailedPrecondition):
    """Too many wrong codes: the user is locked; `retry_after` says how long (unset: until unlocked)."""


class StepUpRequired(FailedPrecondition):
    """A sensitive call for an enrolled user needs a fresh verification_token: ask the user for
    a code, call verify(), and pass the accepted response's verification_token."""


class RateLimited(TwoFactorError):
    """A send limit was hit; retry after `retry_after` (RESEND_TOO_SOON, USER_SEND_LIMIT, ...)."""


class Unavailable(TwoFactorError):
    """The server or a dependency is down; the same call may succeed later."""


class DeadlineExceeded(TwoFactorError):
    """The call did not finish within its timeout."""


class Unauthenticated(TwoFactorError):
    """The token is missing, unknown or malformed."""


class PermissionDenied(TwoFactorError):
    """The token lacks the scope the service needs (`app` or `admin`)."""


class UsageError(TwoFactorError):
    """The client can't make the call, so nothing was sent: it is closed, or (an async client) it
    first ran in another event loop. `code` is FAILED_PRECONDITION; not a FailedPrecondition,
    which is the server's answer about a user's state."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)


_BY_CODE: dict[grpc.StatusCode, type[TwoFactorError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}

_FAILED_PRECONDITION_BY_REASON: dict[str, type[FailedPrecondition]] = {
    "NOT_ENROLLED": NotEnrolled,
    "METHOD_NOT_ENABLED": NotEnrolled,
    "NO_PENDING_ENROLLMENT": NotEnrolled,
    "METHOD_NOT_ALLOWED": MethodNotAllowed,
    "CONTACT_MISSING": ContactMissing,
    "CONTACT_IN_USE": ContactInUse,
    "NO_PENDING_CONTACT_CHANGE": NoPendingContactChange,
    "LAST_METHOD_REQUIRED": LastMethodRequired,
    "ADMIN_RESET_DISABLED": AdminResetDisabled,
    "USER_LOCKED": UserLocked,
    "STEP_UP_REQUIRED": StepUpRequired,
}


# gRPC's own refusal of a message past a size limit ("SERVER: Received message larger than max
# (70009 vs. 65536)"; older releases leave the prefix out), the only RESOURCE_EXHAUSTED without
# a reason that no wait can fix. A response past the client's receive limit reads "CLIENT:
# Received ...": not the request's fault, so not matched.
_MESSAGE_TOO_LARGE = re.compile(
    r"^(?!CLIENT: Received)(?:[A-Z]+: )?(?:Received|Sent) message larger than max\b"
)


def error_class(code: grpc.StatusCode, reason: str = "", message: str = "") -> type[TwoFactorError]:
    """The exception class for a status code, ErrorInfo reason and status message (the message
    only tells gRPC's own refusal of an over-large request from a send limit)."""
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return _FAILED_PRECONDITION_BY_REASON.get(reason, FailedPrecondition)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and not reason and _MESSAGE_TOO_LARGE.match(message):
        return RequestTooLarge
    return _BY_CODE.get(code, TwoFactorError)


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    request_id: str = "",
) -> TwoFactorError:
    """Build the exception for a failed call from its status and trailing metadata."""
    details = status_from_metadata(trailing_metadata)
    if details is None:
        return error_class(code, message=message)(code, message, request_id=request_id)
    return error_class(code, details.reason, message)(
        code,
        message,
        details.reason,
        details.metadata,
        domain=details.domain,
        retry_after=details.retry_delay,
        request_id=request_id,
    )


def error_from_rpc_error(error: grpc.RpcError, *, request_id: str = "") -> TwoFactorError:
    """Convert what grpc (sync or aio) raised into a TwoFactorError."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else None) or ""
    trailing: Iterable[tuple[str, str | bytes]] | None = None
    if callable(getattr(error, "trailing_metadata", None)):
        # grpc gives _Metadatum namedtuples, grpc.aio a Metadata; both iterate as (key, value).
        trailing = cast("Iterable[tuple[str, str | bytes]] | None", error.trailing_metadata())
    return error_from_status(code, message, trailing, request_id=request_id)
