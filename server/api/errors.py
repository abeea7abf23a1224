"""The one place where failures become gRPC statuses.

Domain errors carry their status class and reason; they go out as a
google.rpc.Status with an ErrorInfo (and a RetryInfo when there is a
retry-after); the storage layer already turned a database that can't be reached
into one (STORAGE_UNAVAILABLE). Anything else is a bug: it is logged with its
traceback at ERROR and answered INTERNAL without detail.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from twofactor_server.domain.errors import Status, TwoFactorError

log = logging.getLogger(__name__)

ERROR_DOMAIN = "twofactor.v1"
# Reasons that say this server's TWOFACTOR_KEYS is wrong: logged at ERROR, besides being answered.
_KEY_CONFIGURATION = frozenset({"KEY_VERSION_MISSING", "KEY_MISMATCH"})
_CODES = {
    Status.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    Status.NOT_FOUND: code_pb2.NOT_FOUND,
    Status.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    Status.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    Status.UNAVAILABLE: code_pb2.UNAVAILABLE,
    Status.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    Status.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
}


def status_for(error: TwoFactorError) -> grpc.Status:
    metadata = dict(error.metadata)
    details = []
    if error.retry_after is not None:
        metadata["retry_after_seconds"] = f"{error.retry_after:.3f}"
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.CopyFrom(
            duration_pb2.Duration(seconds=int(error.retry_after), nanos=int(error.retry_after % 1 * 1e9))
        )
        details.append(retry)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    return _status(_CODES[error.status], error.message, [info, *details])


def internal_status() -> grpc.Status:
    return _status(code_pb2.INTERNAL, "internal error", [])


def abort_for(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    """Abort the call with the status that `exc` maps to (raises)."""
    if isinstance(exc, TwoFactorError):
        if exc.reason in _KEY_CONFIGURATION:  # the operator's to fix, and the caller can't tell them
            log.error("%s answered %s: %s", method, exc.reason, exc.message)
        context.abort_with_status(status_for(exc))
    log.exception("%s failed", method)
    context.abort_with_status(internal_status())


def _status(code: int, message: str, details: list) -> grpc.Status:  # type: ignore[type-arg]
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))
