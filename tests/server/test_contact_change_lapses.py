"""A contact change waiting for its code dies with any change of the user's credentials after it
started (the credential epoch moved on): an admin reset, a method turned off and on again, another
method enabled or turned off, new backup codes, another contact changed. Otherwise the change an
attacker started to their own address, with a step-up proof from before, could still be confirmed
after the reset meant to lock them out. Only the contact change itself keeps its pair alive: the
other half of the SetContact that started both, confirmed or applied at once.
Real SMTP sink and an operator's SMS class, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import (
    EMAIL,
    SMS,
    confirm_authenticator,
    error_info,
    start_authenticator,
    verify,
    wait_until,
)
from tests.server.test_challenges import SharedRecordingSms
from tests.server.test_contact_change import start_with_email_and_sms
from tests.smtp_sink import SmtpSink, code_in

USER, ADDRESS, EVIL = "una", "una@example.com", "evil@example.com"
PHONE, OTHER_PHONE = "+14155550177", "+14155550178"


@pytest.fixture
def h(sink: SmtpSink, start_server: ServerFactory) -> Harness:
    return start_with_email_and_sms(start_server, sink, resend_cooldown_seconds=0)


def texts_to(number: str) -> list[str]:
    return [m.text for m in SharedRecordingSms.outbox if m.to == number]


def next_text_code(number: str, before: int) -> str:
    """The code of the text sent to `number` after its first `before` texts (waited for, bounded)."""
    wait_until(lambda: len(texts_to(number)) > before, f"a text to {number}")
    return texts_to(number)[before].split(" is ")[1][:6]


def mailed_code(sink: SmtpSink, address: str, subject: str, before: int) -> str:
    return code_in(sink.message_to(address, subject, after=before))


def enroll(h: Harness, sink: SmtpSink, method: int, token: str = "") -> pb.ConfirmEnrollmentResponse:
    """Start and confirm an email or SMS enrollment (to the address in force)."""
    mails, texts = len(sink.messages), len(texts_to(PHONE))
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=USER, method=method, verification_token=token),
        metadata=h.app_metadata,
    )
    code = mailed_code(sink, ADDRESS, "Confirm", mails) if method == EMAIL else next_text_code(PHONE, texts)
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=USER, method=method, code=code), metadata=h.app_metadata
    )
    assert confirmed.confirmed
    return confirmed


def token(h: Harness, sink: SmtpSink, method: int = EMAIL) -> str:
    """A step-up proof: a login code by `method`, sent to the address in force, verified."""
    mails, texts = len(sink.messages), len(texts_to(PHONE))
    h.twofactor.SendCode(pb.SendCodeRequest(user_id=USER, method=method), metadata=h.app_metadata)
    code = (
        mailed_code(sink, ADDRESS, "verification code", mails)
        if method == EMAIL
        else next_text_code(PHONE, texts)
    )
    accepted = verify(h, USER, code)
    assert accepted.result == pb.VERIFY_RESULT_ACCEPTED
    return accepted.verification_token


def email_and_sms_user(h: Harness, sink: SmtpSink) -> None:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=USER, email=ADDRESS, phone=PHONE), metadata=h.app_metadata
    )
    first = enroll(h, sink, EMAIL)
    enroll(h, sink, SMS, first.verification_token)


def change_email_to_evil(h: Harness, sink: SmtpSink) -> str:
    """SetContact(EVIL) with a step-up proof (an attacker's, say): the code mailed to EVIL."""
    proof = token(h, sink)
    before = len(sink.messages)
    started = h.twofactor.SetContact(
        pb.SetContactRequest(user_id=USER, email=EVIL, verification_token=proof), metadata=h.app_metadata
    )
    assert started.email_confirmation.masked_destination == "e***@example.com"
    return mailed_code(sink, EVIL, "Confirm", before)


def pending(h: Harness) -> list[pb.Challenge]:
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id=USER), metadata=h.app_metadata)
    return list(status.pending_contact_changes)


def confirm_email(h: Harness, code: str) -> pb.ConfirmContactResponse:
    return h.twofactor.ConfirmContact(
        pb.ConfirmContactRequest(user_id=USER, method=EMAIL, code=code), metadata=h.app_metadata
    )


def disable(h: Harness, sink: SmtpSink, method: int, proof_by: int) -> None:
    h.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id=USER, method=method, verification_token=token(h, sink, proof_by)),
        metadata=h.app_metadata,
    )


def admin_reset_then_email_again(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    h.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id=USER, reason="compromised"), metadata=h.admin_metadata
    )
    enroll(h, sink, EMAIL)  # no method left: no proof needed; the code goes to ADDRESS


def email_off_and_on_again(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    disable(h, sink, EMAIL, proof_by=SMS)
    enroll(h, sink, EMAIL, token(h, sink, SMS))


def sms_off_and_on_again(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    disable(h, sink, SMS, proof_by=EMAIL)
    enroll(h, sink, SMS, token(h, sink))


def authenticator_enabled(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    assert confirm_authenticator(h, clock, USER, start_authenticator(h, USER, token(h, sink))).confirmed


def new_backup_codes(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id=USER, verification_token=token(h, sink)),
        metadata=h.app_metadata,
    )


def phone_changed_at_once(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    disable(h, sink, SMS, proof_by=EMAIL)
    h.twofactor.SetContact(  # SMS is off: the number changes at once
        pb.SetContactRequest(user_id=USER, phone=OTHER_PHONE, verification_token=token(h, sink)),
        metadata=h.app_metadata,
    )


MOVES: dict[str, Callable[[Harness, SmtpSink, Clock], None]] = {
    "admin reset, email enrolled again": admin_reset_then_email_again,
    "email off and on again": email_off_and_on_again,
    "sms off and on again": sms_off_and_on_again,
    "authenticator enabled": authenticator_enabled,
    "backup codes regenerated": new_backup_codes,
    "phone changed at once": phone_changed_at_once,
}


@pytest.mark.parametrize("move", list(MOVES))
def test_a_pending_contact_change_dies_with_a_credential_change_after_it_started(
    h: Harness, sink: SmtpSink, clock: Clock, move: str
) -> None:
    email_and_sms_user(h, sink)
    evil_code = change_email_to_evil(h, sink)
    assert [c.masked_destination for c in pending(h)] == ["e***@example.com"]
    MOVES[move](h, sink, clock)  # all within the code's lifetime (the test clock barely moves)
    assert pending(h) == []  # GetStatus shows no change that can't be confirmed
    with pytest.raises(grpc.RpcError) as refused:
        confirm_email(h, evil_code)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "NO_PENDING_CONTACT_CHANGE"
    user = h.admin.GetUser(admin_pb.GetUserRequest(user_id=USER), metadata=h.admin_metadata).user
    assert user.masked_email == "u***@example.com"  # the address in force is still the user's


def test_a_change_survives_the_other_half_of_its_own_call_applied_at_once(h: Harness, sink: SmtpSink) -> None:
    """A new email to confirm and a new phone for SMS, which is off, in one call: the phone changes
    at once (the epoch moves on), and the email change that call started still takes its code."""
    email_and_sms_user(h, sink)
    disable(h, sink, SMS, proof_by=EMAIL)
    before = len(sink.messages)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=USER, email=EVIL, phone=OTHER_PHONE, verification_token=token(h, sink)),
        metadata=h.app_metadata,
    )
    code = mailed_code(sink, EVIL, "Confirm", before)
    assert [c.masked_destination for c in pending(h)] == ["e***@example.com"]
    assert confirm_email(h, code).result == pb.CONFIRM_RESULT_CONFIRMED
    assert pending(h) == []
