"""Opting in and out of methods, and what the policy forces."""

from __future__ import annotations

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server import test_contact_change as contact_change
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    confirm_authenticator,
    enroll_authenticator,
    error_info,
    start_authenticator,
    totp_now,
    verified_token,
    verify,
)
from tests.server.test_contact_change import email_token, enroll_email
from tests.smtp_sink import SmtpSink

# The fixtures of test_contact_change: an SMTP sink, and a server delivering to it.
h = contact_change.h


def status(h: Harness, user_id: str) -> pb.GetStatusResponse:
    return h.twofactor.GetStatus(pb.GetStatusRequest(user_id=user_id), metadata=h.app_metadata)


def test_disabling_the_last_method_turns_2fa_off_and_drops_backup_codes(
    harness: Harness, clock: Clock
) -> None:
    secret, backup = enroll_authenticator(harness, clock, "opt-out")
    assert status(harness, "opt-out").backup_codes_remaining == 10
    token = verified_token(harness, clock, "opt-out", secret)
    response = harness.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id="opt-out", method=AUTHENTICATOR, verification_token=token),
        metadata=harness.app_metadata,
    )
    assert list(response.enabled_methods) == []
    after = status(harness, "opt-out")
    assert list(after.enabled_methods) == [] and after.backup_codes_remaining == 0
    with pytest.raises(grpc.RpcError) as raised:
        verify(harness, "opt-out", backup[0])
    assert error_info(raised.value).reason == "NOT_ENROLLED"
    # Opting in again works, with a new secret.
    new_secret, _ = enroll_authenticator(harness, clock, "opt-out")
    assert new_secret != secret


def test_forced_policy_requires_enrollment_and_keeps_the_last_method(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(policy={"force_two_factor": True})
    assert status(h, "newcomer").enrollment_required
    secret, _ = enroll_authenticator(h, clock, "newcomer")
    assert not status(h, "newcomer").enrollment_required
    token = verified_token(h, clock, "newcomer", secret)
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.DisableMethod(
            pb.DisableMethodRequest(user_id="newcomer", method=AUTHENTICATOR, verification_token=token),
            metadata=h.app_metadata,
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "LAST_METHOD_REQUIRED"
    assert list(status(h, "newcomer").enabled_methods) == [AUTHENTICATOR]


def test_a_method_the_policy_no_longer_allows_stops_verifying(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server()
    secret, _ = enroll_authenticator(h, clock, "legacy")
    h.server.stop(grace=None)
    narrowed = start_server(policy={"allowed_methods": ("email", "sms")})
    assert list(status(narrowed, "legacy").enabled_methods) == []
    with pytest.raises(grpc.RpcError) as raised:
        verify(narrowed, "legacy", totp_now(secret, clock))
    assert error_info(raised.value).reason == "NOT_ENROLLED"


def test_confirming_while_locked_is_refused_with_retry_after(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "locked-out")
    token = verified_token(harness, clock, "locked-out", secret)
    wrong = "000000" if totp_now(secret, clock) != "000000" else "111111"
    for _ in range(5):
        verify(harness, "locked-out", wrong)
    harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="locked-out", method=AUTHENTICATOR, verification_token=token),
        metadata=harness.app_metadata,
    )
    with pytest.raises(grpc.RpcError) as raised:
        harness.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="locked-out", method=AUTHENTICATOR, code="123456"),
            metadata=harness.app_metadata,
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info.reason == "USER_LOCKED" and float(info.metadata["retry_after_seconds"]) == 60


def test_turning_off_the_last_allowed_method_keeps_the_backup_codes_of_one_still_enabled(
    h: Harness, sink: SmtpSink, start_server: ServerFactory, clock: Clock
) -> None:
    """A method the policy no longer allows is still the user's: when the policy allows it again
    it verifies again, so the backup codes that back it up must still be there (README: with no
    method left the backup codes go too; here one is left)."""
    enroll_email(h, sink, "pat", "pat@example.com")
    token = email_token(h, sink, "pat")
    start = start_authenticator(h, "pat", token)
    confirmed = confirm_authenticator(h, clock, "pat", start)
    assert confirmed.confirmed
    clock.advance(30)
    backup = h.twofactor.GetBackupCodes(
        pb.GetBackupCodesRequest(user_id="pat", verification_token=confirmed.verification_token),
        metadata=h.app_metadata,
    ).codes
    assert len(backup) == 10
    h.server.stop(grace=None)

    narrowed = start_server(policy={"allowed_methods": ("authenticator", "sms")})
    token = verified_token(narrowed, clock, "pat", start.authenticator.secret)
    narrowed.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id="pat", method=AUTHENTICATOR, verification_token=token),
        metadata=narrowed.app_metadata,
    )
    narrowed.server.stop(grace=None)

    widened = start_server()
    assert list(status(widened, "pat").enabled_methods) == [EMAIL]
    assert status(widened, "pat").backup_codes_remaining == 10
    answer = verify(widened, "pat", backup[0])
    assert answer.result == pb.VERIFY_RESULT_ACCEPTED and answer.backup_codes_remaining == 9


def test_get_status_lists_no_pending_enrollment_of_a_method_the_policy_no_longer_allows(
    start_server: ServerFactory, clock: Clock
) -> None:
    """GetStatus lists what the user can use: an enrollment of a method the policy no longer
    allows can't be confirmed (METHOD_NOT_ALLOWED), so a login page must not offer to finish it."""
    h = start_server()
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="halfway", method=AUTHENTICATOR), metadata=h.app_metadata
    )
    assert list(status(h, "halfway").pending_methods) == [AUTHENTICATOR]
    h.server.stop(grace=None)

    narrowed = start_server(policy={"allowed_methods": ("email", "sms"), "force_two_factor": True})
    after = status(narrowed, "halfway")
    assert list(after.pending_methods) == [] and after.enrollment_required
    with pytest.raises(grpc.RpcError) as raised:
        narrowed.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="halfway", method=AUTHENTICATOR, code="123456"),
            metadata=narrowed.app_metadata,
        )
    assert error_info(raised.value).reason == "METHOD_NOT_ALLOWED"
