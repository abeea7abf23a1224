"""In-process delivery keeps texts apart from emails: a thread can't be stopped, so an operator's
SMS class that never answers holds its own threads, and emailed codes still go out. The embedded
default on both stores (no broker), a real SMTP sink."""

from __future__ import annotations

import threading
from typing import ClassVar

from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import ServerFactory
from tests.server.helpers import EMAIL, SMS, wait_until
from tests.smtp_sink import SmtpSink
from twofactor_server.delivery.providers import SmsMessage


class HangingGateway:
    """Each send waits until the test lets it go (bounded); `entered` counts the sends under way."""

    release: ClassVar[threading.Event] = threading.Event()
    entered: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def send_sms(self, message: SmsMessage) -> str:
        with self.lock:
            type(self).entered += 1
        self.release.wait(60)
        return "late"


def test_texts_to_a_gateway_that_hangs_do_not_hold_up_emailed_codes(
    start_server: ServerFactory, sink: SmtpSink
) -> None:
    HangingGateway.release.clear()
    HangingGateway.entered = 0
    h = start_server(sms_provider=f"{__name__}:HangingGateway", email_provider="smtp", smtp=sink.settings())
    try:
        for n in range(6):  # more texts than every delivery thread there is
            user = f"sms{n}"
            h.twofactor.SetContact(
                pb.SetContactRequest(user_id=user, phone=f"+1415555{n:04d}"), metadata=h.app_metadata
            )
            h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id=user, method=SMS), metadata=h.app_metadata
            )
        wait_until(lambda: HangingGateway.entered >= 2, "the texts reach the gateway")
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="eve", email="eve@example.com"), metadata=h.app_metadata
        )
        start = h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="eve", method=EMAIL), metadata=h.app_metadata
        )

        def sent() -> bool:
            challenge = h.twofactor.GetChallenge(
                pb.GetChallengeRequest(user_id="eve", challenge_id=start.challenge.challenge_id),
                metadata=h.app_metadata,
            ).challenge
            return challenge.delivery_status == common_pb2.DELIVERY_STATUS_SENT

        wait_until(sent, "the emailed code is sent")
        assert HangingGateway.entered == 2  # the texts' own threads, all still held
    finally:
        HangingGateway.release.set()
