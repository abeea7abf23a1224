"""Small helpers shared by the server tests: call wrappers and code computation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyotp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness

# A policy whose lockouts are short, and permanent after the third consecutive failure.
LOCKED_FOR_GOOD_AFTER_3 = {
    "lockout_threshold": 1,
    "lockout_base_seconds": 1,
    "lockout_max_seconds": 1,
    "max_consecutive_failures": 3,
}

AUTHENTICATOR = common_pb2.METHOD_AUTHENTICATOR
EMAIL = common_pb2.METHOD_EMAIL
SMS = common_pb2.METHOD_SMS


def totp_now(secret: str, clock: Clock, *, offset_steps: int = 0) -> str:
    """The code an authenticator app shows, computed independently with pyotp."""
    return pyotp.TOTP(secret).at(clock.now + 30 * offset_steps)


def enroll_authenticator(h: Harness, clock: Clock, user_id: str) -> tuple[str, list[str]]:
    """Enroll and confirm; return the base32 secret and the backup codes."""
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(
            user_id=user_id, method=AUTHENTICATOR, account_name=f"{user_id}@example.com"
        ),
        metadata=h.app_metadata,
    )
    secret = start.authenticator.secret
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR, code=totp_now(secret, clock)),
        metadata=h.app_metadata,
    )
    assert confirm.confirmed
    # The confirming code may not be replayed: the next login uses the next time step.
    clock.advance(30)
    return secret, list(confirm.backup_codes)


def start_authenticator(h: Harness, user_id: str, token: str = "") -> pb.StartEnrollmentResponse:
    """StartEnrollment of the authenticator app, with a step-up proof when given one."""
    return h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR, verification_token=token),
        metadata=h.app_metadata,
    )


def confirm_authenticator(
    h: Harness, clock: Clock, user_id: str, start: pb.StartEnrollmentResponse
) -> pb.ConfirmEnrollmentResponse:
    """ConfirmEnrollment with the code the app shows now for the secret `start` gave."""
    code = totp_now(start.authenticator.secret, clock)
    return h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR, code=code), metadata=h.app_metadata
    )


def verified_token(h: Harness, clock: Clock, user_id: str, secret: str) -> str:
    """Pass the second factor now (the authenticator's current code) and return the step-up
    proof (verification_token) that the sensitive calls need; then move to the next time step,
    so the next login has a fresh code."""
    response = verify(h, user_id, totp_now(secret, clock))
    assert response.result == pb.VERIFY_RESULT_ACCEPTED, response
    assert response.verification_token, "an accepted Verify returns a verification_token"
    clock.advance(30)
    return response.verification_token


def verify(h: Harness, user_id: str, code: str) -> pb.VerifyResponse:
    return h.twofactor.Verify(pb.VerifyRequest(user_id=user_id, code=code), metadata=h.app_metadata)


def error_info(error: Exception) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def retry_info(error: Exception) -> error_details_pb2.RetryInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


class CountingDatabase:
    """The real database, counting the statements and transactions a use case runs through it."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.dialect = db.dialect
        self.statements_run = 0
        self.transactions = 0

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[Any]:
        self.transactions += 1
        with self._db.transaction(snapshot=snapshot) as tx:
            yield _CountedTransaction(tx, self)

    @contextmanager
    def statements(self) -> Iterator[Any]:
        with self._db.statements() as tx:
            yield _CountedTransaction(tx, self)


class _CountedTransaction:
    def __init__(self, tx: Any, owner: CountingDatabase) -> None:
        self._tx, self._owner = tx, owner

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._tx, name)
        if name not in ("execute", "one", "all", "hot_row", "hot_rows"):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._owner.statements_run += 1
            return attribute(*args, **kwargs)

        return counted


def wait_until(
    condition: Callable[[], object],
    what: str | Callable[[], str],
    *,
    bound: float = 30.0,
    interval: float = 0.01,
) -> None:
    """Poll `condition` until it holds; past `bound` seconds, fail saying `what` it waited for."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what if isinstance(what, str) else what()}")
        time.sleep(interval)  # polling a condition, not a synchronization by time
