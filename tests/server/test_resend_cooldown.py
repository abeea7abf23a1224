"""The resend cooldown is per user and method: a login page that offers "text me instead" after an
email code that did not arrive gets its text at once, while a second code by the same method within
the cooldown is still refused RESEND_TOO_SOON; the hourly caps still count every send of the user.
Real SMTP sink and an operator's SMS class, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import EMAIL, SMS, error_info, retry_info, verify, wait_until
from tests.server.test_challenges import SharedRecordingSms
from tests.server.test_contact_change import start_with_email_and_sms
from tests.smtp_sink import SmtpSink, code_in

PHONE = "+14155550188"


@pytest.fixture
def h(sink: SmtpSink, start_server: ServerFactory) -> Harness:
    # The default cooldown (30 s); two sends an hour, so the caps' count of both methods shows.
    return start_with_email_and_sms(start_server, sink, sends_per_user_per_hour=2)


def next_text(before: int) -> str:
    """The code of the text sent after the first `before` texts to PHONE (waited for, bounded)."""

    def texts() -> list[str]:
        return [m.text for m in SharedRecordingSms.outbox if m.to == PHONE]

    wait_until(lambda: len(texts()) > before, "a text to the phone")
    return texts()[before].split(" is ")[1][:6]


def texts_sent() -> int:
    return sum(1 for m in SharedRecordingSms.outbox if m.to == PHONE)


def enroll_email_and_sms(h: Harness, sink: SmtpSink, clock: Clock, user: str) -> None:
    """Both contacts set while no method guards the account, then email and SMS enabled (the
    token the first confirmation returns starts the second): two sends, then an hour passes."""
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user, email=f"{user}@example.com", phone=PHONE), metadata=h.app_metadata
    )
    before = len(sink.messages)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=EMAIL), metadata=h.app_metadata
    )
    code = code_in(sink.wait_for_messages(before + 1)[-1])
    email = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert email.confirmed
    texted = texts_sent()
    clock.advance(31)  # past the cooldown of the email's code, whatever it applies to
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=SMS, verification_token=email.verification_token),
        metadata=h.app_metadata,
    )
    sms = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=SMS, code=next_text(texted)), metadata=h.app_metadata
    )
    assert sms.confirmed
    clock.advance(3601)  # past the hourly window of those two sends


def send_code(h: Harness, user: str, method: int) -> pb.SendCodeResponse:
    return h.twofactor.SendCode(pb.SendCodeRequest(user_id=user, method=method), metadata=h.app_metadata)


def refused(h: Harness, user: str, method: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        send_code(h, user, method)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return raised.value


def seconds(error: grpc.RpcError) -> float:
    retry = retry_info(error)
    assert retry is not None
    return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9


def test_text_me_instead_is_sent_at_once_and_each_method_keeps_its_own_cooldown(
    h: Harness, sink: SmtpSink, clock: Clock
) -> None:
    enroll_email_and_sms(h, sink, clock, "tia")
    start = int(clock.now)
    by_email = send_code(h, "tia", EMAIL)
    assert by_email.challenge.resend_after.seconds == start + 30
    clock.advance(10)
    texted = texts_sent()
    by_text = send_code(h, "tia", SMS)  # "text me instead", 10 s after the email: no wait
    assert by_text.challenge.resend_after.seconds == start + 40  # its own method's cooldown
    code = next_text(texted)

    # The same method again within its cooldown: refused, with the wait of that method's cooldown.
    again_by_email = refused(h, "tia", EMAIL)
    assert error_info(again_by_email).reason == "RESEND_TOO_SOON"
    assert seconds(again_by_email) == pytest.approx(20)
    again_by_text = refused(h, "tia", SMS)
    assert error_info(again_by_text).reason == "RESEND_TOO_SOON"
    assert seconds(again_by_text) == pytest.approx(30)
    # What GetChallenge says of each agrees: the email's next send is its own cooldown's end.
    for sent, resend_at in ((by_email, start + 30), (by_text, start + 40)):
        shown = h.twofactor.GetChallenge(
            pb.GetChallengeRequest(user_id="tia", challenge_id=sent.challenge.challenge_id),
            metadata=h.app_metadata,
        ).challenge
        assert shown.resend_after.seconds == resend_at, shown

    assert verify(h, "tia", code).result == pb.VERIFY_RESULT_ACCEPTED  # the text's code logs in

    # The hourly cap still counts the user's sends of both methods: two this hour, no third.
    clock.advance(31)
    assert error_info(refused(h, "tia", EMAIL)).reason == "USER_SEND_LIMIT"
