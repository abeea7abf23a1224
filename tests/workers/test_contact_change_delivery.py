"""A change of email address end to end over the real delivery path (issue 12): the server on
PostgreSQL, Celery workers over Redis, a real SMTP server. The old address keeps receiving
codes until the code sent to the new one is confirmed, and hears of the change."""

from __future__ import annotations

from collections.abc import Callable

from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness, ServerFactory
from tests.server.helpers import EMAIL, verify
from tests.smtp_sink import SmtpSink, code_in
from tests.workers.celery_harness import Workers, celery_server, start_email_enrollment, wait_for_status


def login_code(h: Harness, sink: SmtpSink, user: str) -> tuple[str, str]:
    """SendCode by email through the worker; (the address it reached, the code)."""
    before = len(sink.messages)
    sent = h.twofactor.SendCode(pb.SendCodeRequest(user_id=user, method=EMAIL), metadata=h.app_metadata)
    message = sink.message_to(None, "verification code", after=before)
    wait_for_status(h, user, sent.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    return str(message["To"]), code_in(message)


def test_new_email_through_the_workers_old_one_in_force_until_confirmed_and_told(
    sink: SmtpSink, start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    h = celery_server(start_server, sink, queue, policy={"resend_cooldown_seconds": 0, "notify_users": True})
    workers = workers_for(h)
    workers.start(concurrency=2)
    start = start_email_enrollment(h, "amy")  # amy@example.com
    code = code_in(sink.message_to("amy@example.com", "Confirm your email address"))
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="amy", method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed and start.challenge_id
    sink.message_to("amy@example.com", "A sign-in method was added")  # the notice, by a worker

    before = len(sink.messages)
    change = h.twofactor.SetContact(
        pb.SetContactRequest(
            user_id="amy", email="amelia@example.net", verification_token=confirm.verification_token
        ),
        metadata=h.app_metadata,
    )
    assert change.masked_email == "a***@example.com"
    confirmation = code_in(sink.message_to("amelia@example.net", "Confirm your new address", after=before))
    wait_for_status(h, "amy", change.email_confirmation.challenge_id, common_pb2.DELIVERY_STATUS_SENT)

    # Not confirmed yet: the old address gets (and passes) the login codes.
    to, code = login_code(h, sink, "amy")
    assert to == "amy@example.com" and verify(h, "amy", code).result == pb.VERIFY_RESULT_ACCEPTED

    confirmed = h.twofactor.ConfirmContact(
        pb.ConfirmContactRequest(user_id="amy", method=EMAIL, code=confirmation), metadata=h.app_metadata
    )
    assert confirmed.result == pb.CONFIRM_RESULT_CONFIRMED and confirmed.masked_email == "a***@example.net"
    notice = sink.message_to("amy@example.com", "The email address for your", after=before)
    text = notice.get_body(preferencelist=("plain",))
    assert text is not None and "a***@example.net" in text.get_content()

    to, code = login_code(h, sink, "amy")
    assert to == "amelia@example.net" and verify(h, "amy", code).result == pb.VERIFY_RESULT_ACCEPTED
    assert "Traceback" not in workers.logs() and confirmation not in workers.logs()
