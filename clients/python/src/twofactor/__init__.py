"""Client SDK for the twofactor gRPC service.

    from twofactor import Method, TwoFactorClient

    with TwoFactorClient("localhost:50051", token=token) as client:
        status = client.get_status(user_id="alice")

The generated messages and stubs live in twofactor.v1.
"""

from __future__ import annotations

from twofactor._channel import DEFAULT_TIMEOUT, RetryPolicy, TlsConfig
from twofactor.aio import AsyncAdminClient, AsyncTwoFactorClient
from twofactor.client import AdminClient, TwoFactorClient
from twofactor.errors import (
    AdminResetDisabled,
    ContactInUse,
    ContactMissing,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LastMethodRequired,
    MethodNotAllowed,
    NoPendingContactChange,
    NotEnrolled,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    StepUpRequired,
    TwoFactorError,
    Unauthenticated,
    Unavailable,
    UsageError,
    UserLocked,
)
from twofactor.v1.admin_service_pb2 import UserFilter
from twofactor.v1.common_pb2 import DeliveryStatus, Method
from twofactor.v1.twofactor_service_pb2 import CodeKind, ConfirmResult, QrCodeFormat, VerifyResult

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "AdminClient",
    "AdminResetDisabled",
    "AsyncAdminClient",
    "AsyncTwoFactorClient",
    "CodeKind",
    "ConfirmResult",
    "ContactInUse",
    "ContactMissing",
    "DeadlineExceeded",
    "DeliveryStatus",
    "FailedPrecondition",
    "InvalidArgument",
    "LastMethodRequired",
    "Method",
    "MethodNotAllowed",
    "NoPendingContactChange",
    "NotEnrolled",
    "NotFound",
    "PermissionDenied",
    "QrCodeFormat",
    "RateLimited",
    "RequestTooLarge",
    "RetryPolicy",
    "StepUpRequired",
    "TlsConfig",
    "TwoFactorClient",
    "TwoFactorError",
    "Unauthenticated",
    "Unavailable",
    "UsageError",
    "UserFilter",
    "UserLocked",
    "VerifyResult",
    "__version__",
]
