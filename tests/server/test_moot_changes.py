"""What a later change made moot stops working: a contact change waiting for its code once its
method is off, a code sent to an address since replaced, an authenticator enrollment once the
account's credentials changed; and a SetContact answered with an error applies nothing.
In-process delivery to a real SMTP sink and an operator's SMS class, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server import test_contact_change as contact_change
from tests.server.helpers import (
    EMAIL,
    SMS,
    confirm_authenticator,
    error_info,
    start_authenticator,
    verify,
)
from tests.server.stored_rows import query
from tests.server.test_challenges import SharedRecordingSms
from tests.server.test_contact_change import (
    confirm_contact,
    email_enrollment_code,
    email_token,
    enroll_email,
    failed,
    login_code_by_email,
    new_email_code,
    pending_changes,
    sms_code,
    wait_for_text,
)
from tests.smtp_sink import SmtpSink

# The fixtures of test_contact_change: an SMTP sink, and a server delivering to it and to a
# recording SMS class.
h = contact_change.h


def disable(h: Harness, user: str, method: int, token: str) -> None:
    h.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id=user, method=method, verification_token=token),
        metadata=h.app_metadata,
    )


CONTACT_CHANGES = (
    "SELECT COUNT(*) AS n FROM audit_events WHERE user_id = %(u)s AND action = 'contact_changed'"
)

NOTICES = "SELECT COUNT(*) AS n FROM challenges WHERE user_id = %(u)s AND purpose = 'notice'"


def confirm_email_enrollment_refused(h: Harness, user: str, code: str) -> grpc.RpcError:
    request = pb.ConfirmEnrollmentRequest(user_id=user, method=EMAIL, code=code)
    return failed(lambda: h.twofactor.ConfirmEnrollment(request, metadata=h.app_metadata))


def contacts_of(h: Harness, user: str) -> dict[str, str | None]:
    [row] = query(h.settings, "SELECT email, phone FROM users WHERE user_id = %(u)s", {"u": user})
    return row


def test_a_contact_change_waiting_when_its_method_is_turned_off_can_never_be_confirmed(
    h: Harness, sink: SmtpSink
) -> None:
    """Someone holding a step-up proof asks for their own address; the user turns email off and
    sets the address again. The code mailed to the other address must not put it back later,
    nor bring a fresh step-up proof: not while email is off, nor once it is on again."""
    enroll_email(h, sink, "ivy", "ivy@old.example")
    token = email_token(h, sink, "ivy")
    their_code = new_email_code(h, sink, "ivy", "ivy@attacker.example", token)
    assert [c.masked_destination for c in pending_changes(h, "ivy")] == ["i***@attacker.example"]

    disable(h, "ivy", EMAIL, token)
    assert pending_changes(h, "ivy") == []  # no method, no contact change to confirm
    refused = failed(lambda: confirm_contact(h, "ivy", EMAIL, their_code))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused).reason == "NO_PENDING_CONTACT_CHANGE"

    enroll_email(h, sink, "ivy", "ivy@new.example")  # the address set at once, then email on again
    assert pending_changes(h, "ivy") == []
    refused = failed(lambda: confirm_contact(h, "ivy", EMAIL, their_code))
    assert error_info(refused).reason == "NO_PENDING_CONTACT_CHANGE"
    assert contacts_of(h, "ivy") == {"email": "ivy@new.example", "phone": None}


def test_a_login_code_mailed_before_the_method_was_turned_off_does_not_log_in_later(
    h: Harness, sink: SmtpSink
) -> None:
    """Turning email off, then on for another address, leaves no code that went to the old one."""
    enroll_email(h, sink, "jo", "jo@old.example")
    token = email_token(h, sink, "jo")
    to, old_code = login_code_by_email(h, sink, "jo")
    assert to == "jo@old.example"
    disable(h, "jo", EMAIL, token)
    enroll_email(h, sink, "jo", "jo@new.example")
    assert verify(h, "jo", old_code).result == pb.VERIFY_RESULT_REJECTED
    stored = query(
        h.settings,
        "SELECT superseded_at IS NOT NULL AS withdrawn, code_ciphertext IS NULL AS wiped "
        "FROM challenges WHERE user_id = 'jo' AND purpose = 'login' AND destination = 'jo@old.example' "
        "AND consumed_at IS NULL",
    )
    assert stored == [{"withdrawn": True, "wiped": True}]


def test_an_enrollment_code_sent_before_a_direct_address_change_is_withdrawn(
    h: Harness, sink: SmtpSink
) -> None:
    """The address of a method not yet on changes at once; the code mailed to the old one is
    withdrawn with it, and a confirmation says to start again (it counts no wrong attempt)."""
    code = email_enrollment_code(h, sink, "kit", "kit@old.example")
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="kit", email="kit@new.example"), metadata=h.app_metadata
    )
    stored = query(
        h.settings,
        "SELECT superseded_at IS NOT NULL AS withdrawn FROM challenges "
        "WHERE user_id = 'kit' AND purpose = 'enrollment'",
    )
    assert stored == [{"withdrawn": True}]
    refused = confirm_email_enrollment_refused(h, "kit", code)
    assert error_info(refused).reason == "NO_PENDING_ENROLLMENT"
    assert "call StartEnrollment again" in str(refused.details())  # type: ignore[attr-defined]
    [user] = query(h.settings, "SELECT failed_attempts FROM users WHERE user_id = 'kit'")
    assert user == {"failed_attempts": 0}


def test_an_expired_enrollment_code_says_to_start_again(h: Harness, sink: SmtpSink, clock: Clock) -> None:
    code = email_enrollment_code(h, sink, "lu", "lu@example.com")
    clock.advance(h.settings.policy.code_ttl_seconds + 1)
    refused = confirm_email_enrollment_refused(h, "lu", code)
    assert error_info(refused).reason == "NO_PENDING_ENROLLMENT"
    assert "it expired, or the address changed" in str(refused.details())  # type: ignore[attr-defined]


def test_an_authenticator_enrollment_started_with_a_proof_lapses_when_the_credentials_change(
    h: Harness, sink: SmtpSink, clock: Clock
) -> None:
    """A QR code shown under a step-up proof must not add an authenticator once the account's
    credentials changed since (here the backup codes, regenerated): the proof no longer holds."""
    enroll_email(h, sink, "max", "max@example.com")
    token = email_token(h, sink, "max")
    start = start_authenticator(h, "max", token)
    h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id="max", verification_token=token), metadata=h.app_metadata
    )
    refused = failed(lambda: confirm_authenticator(h, clock, "max", start))
    assert error_info(refused).reason == "NO_PENDING_ENROLLMENT"
    assert "backup codes or contacts last changed" in str(refused.details())  # type: ignore[attr-defined]
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="max"), metadata=h.app_metadata)
    assert list(status.enabled_methods) == [EMAIL]

    # Started again, with a proof at the new epoch, it confirms.
    fresh = email_token(h, sink, "max")
    again = start_authenticator(h, "max", fresh)
    confirmed = confirm_authenticator(h, clock, "max", again)
    assert confirmed.confirmed


def test_a_set_contact_whose_confirmation_code_is_refused_changes_nothing(
    start_server: ServerFactory, sink: SmtpSink
) -> None:
    """A new email (applied at once: email is off) and a new phone (SMS is on: a code first) in
    one call, and the text is refused by the cooldown: the answer is the error, and the email
    address is not changed behind it, nor the old address told of a change."""
    SharedRecordingSms.outbox.clear()
    h = start_server(
        email_provider="smtp",
        smtp=sink.settings(),
        sms_provider="tests.server.test_challenges:SharedRecordingSms",
        policy={"resend_cooldown_seconds": 60, "notify_users": True},
    )
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="ned", email="ned@old.example", phone="+14155550111"),
        metadata=h.app_metadata,
    )
    h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id="ned", method=SMS), metadata=h.app_metadata)
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="ned", method=SMS, code=sms_code(wait_for_text("+14155550111"))),
        metadata=h.app_metadata,
    )
    notices = query(h.settings, NOTICES, {"u": "ned"})
    refused = failed(
        lambda: h.twofactor.SetContact(
            pb.SetContactRequest(
                user_id="ned",
                email="ned@new.example",
                phone="+14155550112",
                verification_token=confirm.verification_token,
            ),
            metadata=h.app_metadata,
        )
    )
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the enrollment text was just sent
    assert error_info(refused).reason == "RESEND_TOO_SOON"
    assert contacts_of(h, "ned") == {"email": "ned@old.example", "phone": "+14155550111"}
    assert pending_changes(h, "ned") == []
    assert query(h.settings, CONTACT_CHANGES, {"u": "ned"}) == [{"n": 1}]  # the first SetContact's only
    assert query(h.settings, NOTICES, {"u": "ned"}) == notices  # none of a change that did not happen


@pytest.mark.parametrize("set_phone", [False, True])
def test_a_set_contact_with_a_code_to_send_applies_the_direct_change_after_it(
    h: Harness, clock: Clock, set_phone: bool
) -> None:
    """The direct change still applies in the same call once the code is on its way."""
    h.twofactor.SetContact(pb.SetContactRequest(user_id="oz", phone="+14155550121"), metadata=h.app_metadata)
    h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id="oz", method=SMS), metadata=h.app_metadata)
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="oz", method=SMS, code=sms_code(wait_for_text("+14155550121"))),
        metadata=h.app_metadata,
    )
    change = h.twofactor.SetContact(
        pb.SetContactRequest(
            user_id="oz",
            email="oz@example.com",
            phone="+14155550122" if set_phone else None,
            verification_token=confirm.verification_token,
        ),
        metadata=h.app_metadata,
    )
    assert change.masked_email == "o***@example.com"
    assert change.HasField("phone_confirmation") == set_phone
    assert change.masked_phone == "+1******0121"  # the phone changes only once its code comes back


def test_a_contact_change_of_a_method_the_policy_no_longer_allows_is_not_listed(
    start_server: ServerFactory, sink: SmtpSink
) -> None:
    """GetStatus lists only the changes ConfirmContact takes a code for: none for a method the
    policy took off since (its codes are refused), so no site asks the user for one."""
    h = start_server(email_provider="smtp", smtp=sink.settings(), policy={"resend_cooldown_seconds": 0})
    enroll_email(h, sink, "ana", "ana@example.com")
    code = new_email_code(h, sink, "ana", "nina@example.com", email_token(h, sink, "ana"))
    h.server.stop(grace=None)
    narrowed = start_server(
        email_provider="smtp", smtp=sink.settings(), policy={"allowed_methods": ("authenticator", "sms")}
    )
    assert pending_changes(narrowed, "ana") == []
    refused = failed(lambda: confirm_contact(narrowed, "ana", EMAIL, code))
    assert error_info(refused).reason == "NO_PENDING_CONTACT_CHANGE"


def test_an_enrollment_started_with_a_proof_lapses_when_the_last_method_is_turned_off(
    h: Harness, sink: SmtpSink, clock: Clock
) -> None:
    """Turning the last method off changes the user's methods: a QR code shown under a proof of
    the method turned off must not turn 2FA back on later, with a secret seen before the opt-out
    (README: NO_PENDING_ENROLLMENT once the methods changed since the start)."""
    enroll_email(h, sink, "ola", "ola@example.com")
    token = email_token(h, sink, "ola")
    start = start_authenticator(h, "ola", token)
    disable(h, "ola", EMAIL, token)
    refused = failed(lambda: confirm_authenticator(h, clock, "ola", start))
    assert error_info(refused).reason == "NO_PENDING_ENROLLMENT"
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="ola"), metadata=h.app_metadata)
    assert list(status.enabled_methods) == [] and status.backup_codes_remaining == 0

    # Opting in again (no method left: no proof needed) starts afresh and confirms.
    again = start_authenticator(h, "ola")
    confirmed = confirm_authenticator(h, clock, "ola", again)
    assert confirmed.confirmed and len(confirmed.backup_codes) == 10
