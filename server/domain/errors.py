"""Domain errors. Each names the gRPC status class it belongs to and a stable
reason string (google.rpc.ErrorInfo.reason); server/api/errors.py is the one
place that turns them into gRPC statuses."""

from __future__ import annotations

from enum import Enum


class Status(Enum):
    """The gRPC status class of a domain error (google/rpc/code.proto)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # bad whatever the state
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # fix the state first
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # a rate limit; retry later
    UNAVAILABLE = "UNAVAILABLE"  # retry the same call
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class TwoFactorError(Exception):
    """An expected failure with a documented status and reason."""

    status: Status = Status.FAILED_PRECONDITION

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = metadata or {}
        self.retry_after = retry_after


class InvalidArgument(TwoFactorError):
    status = Status.INVALID_ARGUMENT


class NotFound(TwoFactorError):
    status = Status.NOT_FOUND


class FailedPrecondition(TwoFactorError):
    status = Status.FAILED_PRECONDITION


class ResourceExhausted(TwoFactorError):
    status = Status.RESOURCE_EXHAUSTED


class Unavailable(TwoFactorError):
    status = Status.UNAVAILABLE


class Unauthenticated(TwoFactorError):
    status = Status.UNAUTHENTICATED


class PermissionDenied(TwoFactorError):
    status = Status.PERMISSION_DENIED


class StorageUnavailable(Unavailable):
    """The database can't be reached right now (raised by the storage layer); the caller may retry."""

    def __init__(self) -> None:
        super().__init__("STORAGE_UNAVAILABLE", "the database can't be reached; retry later", retry_after=1.0)
