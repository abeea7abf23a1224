"""A provider's refusal is logged and recorded with the destination masked, as everywhere else:
relays quote the recipient in a refusal, and its reason went into the log and failure_reason."""

from __future__ import annotations

import logging
import time

import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import ServerFactory
from tests.server.helpers import EMAIL
from tests.server.stored_rows import query
from tests.smtp_sink import SmtpSink, running_sink
from twofactor_server.delivery.deliverer import without_destination


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
