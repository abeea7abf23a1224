"""A provider's refusal is logged and recorded with the destination masked, as everywhere else:
relays quote the recipient in a refusal, and its reason went into the log and failure_reason."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness, ServerFactory
from tests.server.helpers import EMAIL, SMS
from tests.server.stored_rows import query
from tests.smtp_sink import CODE, SmtpSink, running_sink
from twofactor_server.delivery.deliverer import without_destination
from twofactor_server.delivery.providers import SmsMessage, TransientDeliveryError


def test_a_relays_refusal_naming_the_recipient_is_kept_masked(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    reply = "550 5.1.1 <Victim.Person@example.com>: Recipient address rejected: User unknown"
    with running_sink(SmtpSink(data_replies=[reply])) as sink:
        h = start_server(email_provider="smtp", smtp=sink.settings())
        caplog.set_level(logging.INFO)
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="v", email="victim.person@example.com"), metadata=h.app_metadata
        )
        started = h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="v", method=EMAIL), metadata=h.app_metadata
        )
        deadline = time.monotonic() + 30
        while True:
            rows = query(
                h.settings,
                "SELECT delivery_status, failure_reason FROM challenges WHERE challenge_id = %(c)s",
                {"c": started.challenge.challenge_id},
            )
            if rows[0]["delivery_status"] == "failed":
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)  # polling a condition
    assert rows[0]["failure_reason"] == (
        "SMTP 550 5.1.1 <v***@example.com>: Recipient address rejected: User unknown"
    )
    ours = [r for r in caplog.records if r.name.startswith("twofactor")]  # not the sink's own lines
    logged = "\n".join(record.getMessage() for record in ours)
    assert "v***@example.com>: Recipient address rejected" in logged
    assert "victim.person" not in logged.lower()


@pytest.mark.parametrize(
    ("reason", "destination", "kept"),
    [
        (
            "Invalid parameter: +14155550123 is not valid",
            "+14155550123",
            "Invalid parameter: +1******0123 is not valid",
        ),
        ("number 14155550123 opted out", "+14155550123", "number +1******0123 opted out"),
        ("throttled", "+14155550123", "throttled"),
        ("550 <ANA@EXAMPLE.COM> unknown", "ana@example.com", "550 <a***@example.com> unknown"),
        # Other forms of the number, and whatever else looks like an address or a number.
        ("+1 415-555-0123 unreachable", "+14155550123", "+* ***-***-0123 unreachable"),
        ("(415) 555-0123 opted out", "+14155550123", "(***) ***-0123 opted out"),
        ("550 5.1.1 <ana.longname@exa", "ana.longname@example.com", "550 5.1.1 <a***@exa"),
        ("550 5.1.1 user unknown", "ana@example.com", "550 5.1.1 user unknown"),
        ("421 4.7.0 try again in 300 seconds", "ana@example.com", "421 4.7.0 try again in 300 seconds"),
    ],
)
def test_without_destination_masks_every_form_of_it(reason: str, destination: str, kept: str) -> None:
    assert without_destination(reason, destination) == kept


class _RelayQuotingTheMessage(SmtpSink):
    """A relay whose refusal quotes the message it refused, as content filters do ("rejected:
    'Your twofactor code is 123456' matched a rule"); it keeps the code it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[str] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        found = CODE.search(envelope.content.decode("utf-8", "replace").split("\r\n\r\n", 1)[1])
        assert found
        self.codes.append(found.group(1))
        return f"554 5.7.1 rejected: content 'your code is {found.group(1)}' matched a filter rule"


class GatewayQuotingTheMessage:
    """An operator's SMS class whose gateway error carries the request: the message, with its code."""

    seen: ClassVar[list[SmsMessage]] = []

    def send_sms(self, message: SmsMessage) -> str:
        GatewayQuotingTheMessage.seen.append(message)
        if len(GatewayQuotingTheMessage.seen) == 1:
            raise TransientDeliveryError(f"gateway busy, will retry {message.text!r}")
        raise RuntimeError(f"gateway answered 500 to {message}")


def _wait_for_status(h: Harness, challenge_id: str, status: int) -> common_pb2.Challenge:
    deadline = time.monotonic() + 30
    while True:
        challenge = h.twofactor.GetChallenge(
            pb.GetChallengeRequest(user_id="q", challenge_id=challenge_id), metadata=h.app_metadata
        ).challenge
        if challenge.delivery_status == status:
            return challenge
        assert time.monotonic() < deadline, challenge
        time.sleep(0.05)  # polling a condition


def test_a_refusal_quoting_the_code_keeps_it_out_of_the_reason_and_the_log(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider's reason goes into log lines, the challenge's failure_reason and GetChallenge:
    the code it may quote (a relay's content filter, a gateway echoing its request) is masked
    there as the destination is, at every level (DEBUG's traceback of a provider's bug too)."""
    caplog.set_level(logging.DEBUG)
    GatewayQuotingTheMessage.seen.clear()  # each backend's run starts with the "busy" answer
    with running_sink(_RelayQuotingTheMessage()) as sink:
        h = start_server(
            email_provider="smtp",
            smtp=sink.settings(),
            sms_provider=f"{__name__}:GatewayQuotingTheMessage",
            delivery_retry_base_seconds=0.1,
        )
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="q", email="q@example.com", phone="+14155550123"),
            metadata=h.app_metadata,
        )
        by_email = h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="q", method=EMAIL), metadata=h.app_metadata
        ).challenge
        failed = _wait_for_status(h, by_email.challenge_id, common_pb2.DELIVERY_STATUS_FAILED)
        by_sms = h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="q", method=SMS), metadata=h.app_metadata
        ).challenge
        deadline = time.monotonic() + 30
        while len(GatewayQuotingTheMessage.seen) < 2:  # the retry hit the gateway's "bug"
            assert time.monotonic() < deadline, GatewayQuotingTheMessage.seen
            time.sleep(0.05)  # polling a condition
        retrying = _wait_for_status(h, by_sms.challenge_id, common_pb2.DELIVERY_STATUS_QUEUED)
    [emailed] = sink.codes
    texted = {CODE.search(m.text).group(1) for m in GatewayQuotingTheMessage.seen}  # type: ignore[union-attr]
    assert failed.failure_reason.startswith("SMTP 554 5.7.1 rejected: content 'your code is ")
    stored = query(h.settings, "SELECT failure_reason FROM challenges WHERE user_id = 'q'")
    said = [failed.failure_reason, retrying.failure_reason, *(r["failure_reason"] or "" for r in stored)]
    formatter = logging.Formatter()  # the message and any traceback, as a handler writes them
    logged = "\n".join(formatter.format(r) for r in caplog.records if r.name.startswith("twofactor"))
    assert "matched a filter rule" in logged and "gateway answered 500 to SmsMessage(" in logged
    said.append(logged)
    assert [code for code in (emailed, *texted) if any(code in text for text in said)] == []


class GatewayEchoingTheMessage:
    """An operator's SMS class returning its gateway's answer, which echoes the request (the
    message, with its code) as many gateways' JSON does."""

    seen: ClassVar[list[SmsMessage]] = []

    def send_sms(self, message: SmsMessage) -> str:
        GatewayEchoingTheMessage.seen.append(message)
        return f'{{"id": "gw-1", "status": "accepted", "text": "{message.text}"}}'


def test_a_message_id_echoing_the_code_keeps_it_out_of_the_record_and_the_log(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """What a sender returns is the provider's message id: logged, recorded and shown by
    GetChallenge, so a live code it quotes is masked there as in a provider's reason."""
    caplog.set_level(logging.DEBUG)
    GatewayEchoingTheMessage.seen.clear()
    h = start_server(sms_provider=f"{__name__}:GatewayEchoingTheMessage")
    h.twofactor.SetContact(pb.SetContactRequest(user_id="q", phone="+14155550123"), metadata=h.app_metadata)
    by_sms = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="q", method=SMS), metadata=h.app_metadata
    ).challenge
    sent = _wait_for_status(h, by_sms.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    [message] = GatewayEchoingTheMessage.seen
    found = CODE.search(message.text)
    assert found
    code = found.group(1)
    assert sent.provider_message_id.startswith('{"id": "gw-1", "status": "accepted"')
    stored = query(h.settings, "SELECT provider_message_id FROM challenges WHERE user_id = 'q'")
    formatter = logging.Formatter()
    logged = "\n".join(formatter.format(r) for r in caplog.records if r.name.startswith("twofactor"))
    assert "gw-1" in logged
    said = [sent.provider_message_id, *(r["provider_message_id"] or "" for r in stored), logged]
    assert [text for text in said if code in text] == []
