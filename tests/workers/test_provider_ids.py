"""Whatever a provider returns as its message id, a send is recorded once and never sent again.

An operator's SMS class (TWOFACTOR_SMS_PROVIDER) may return its SDK's uuid.UUID, bytes or a
dict; a record that failed after the text went out left the row 'sending', and recovery sent
the code again after every lease until it expired.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import SMS
from tests.server.stored_rows import query
from tests.smtp_sink import SmtpSink
from tests.workers.celery_harness import Workers, celery_server, challenge_status
from twofactor_server.delivery.deliverer import Deliverer
from twofactor_server.delivery.providers import ConsoleEmailSender, SmsMessage
from twofactor_server.delivery.providers.base import PROVIDER_MESSAGE_ID_MAX_CHARS, provider_message_id_text
from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.domain.keyring import Keyring
from twofactor_server.storage.database import Database, open_database

LEASE_SECONDS = 120.0
FIXED_UUID = uuid.UUID("7d444840-9dc0-11d1-b245-5ffdce74fad2")


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for this id")


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("SM0123456789abcdef", "SM0123456789abcdef"),
        (None, ""),
        ("", ""),
        (b"", ""),
        (FIXED_UUID, "7d444840-9dc0-11d1-b245-5ffdce74fad2"),
        (b"gw-42", "gw-42"),
        (bytearray(b"gw-43"), "gw-43"),
        (b"gw-\xff\x00-44", "gw-\ufffd-44"),
        (12345, "12345"),
        ({"id": "gw-1"}, "{'id': 'gw-1'}"),
        ("gw\x00-1\r\n", "gw-1"),
        ("gw-\u202e2\u200b", "gw-2"),  # a bidirectional override and a zero-width space
        ("gw-\ud800-3", "gw--3"),  # a lone surrogate: not encodable as UTF-8
        ("  gw-4  ", "gw-4"),
        (_Unprintable(), ""),
    ],
)
def test_a_returned_id_becomes_safe_text(returned: object, expected: str) -> None:
    text = provider_message_id_text(returned)

    assert text == expected and type(text) is str
    text.encode("utf-8")  # storable and loggable as it is


def test_a_long_id_is_cut_to_the_bound() -> None:
    assert provider_message_id_text("x" * 100_000) == "x" * PROVIDER_MESSAGE_ID_MAX_CHARS
    assert provider_message_id_text("\x00" * 10 + "y" * 1000) == "y" * PROVIDER_MESSAGE_ID_MAX_CHARS


class Gateway:
    """An operator's SMS class whose send_sms returns whatever its gateway's SDK gave."""

    def __init__(self, returned: object) -> None:
        self.returned = returned
        self.sent: list[SmsMessage] = []

    def send_sms(self, message: SmsMessage) -> object:
        self.sent.append(message)
        return self.returned


class NoDispatch:
    """Queues nothing: the test runs the delivery itself, as a worker would."""

    def __init__(self) -> None:
        self.challenge_ids: list[str] = []

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        self.challenge_ids.append(challenge_id)


def start_sms_enrollment(h: Harness, user_id: str) -> str:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user_id, phone="+14155550100"), metadata=h.app_metadata
    )
    return str(
        h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id=user_id, method=SMS), metadata=h.app_metadata
        ).challenge.challenge_id
    )


@pytest.fixture
def database(start_server: ServerFactory) -> Iterator[tuple[Harness, Database]]:
    h = start_server(dispatcher=NoDispatch())
    db = open_database(h.settings.database_url, data_dir=h.settings.data_dir, timeout=5)
    try:
        yield h, db
    finally:
        db.close()


def deliverer(h: Harness, db: Database, gateway: Gateway, clock: Clock) -> Deliverer:
    return Deliverer(
        db,
        Keyring.parse(h.settings.keys),
        ConsoleEmailSender(),
        gateway,  # type: ignore[arg-type]  # returns what an operator's class may return
        issuer="Acme",
        lease_seconds=LEASE_SECONDS,
        clock=clock,
    )


def assert_never_sent_again(
    h: Harness, db: Database, challenge_id: str, delivery: Deliverer, gateway: Gateway, clock: Clock
) -> None:
    """Past the lease, neither the delivery's message nor outbox recovery sends it again."""
    clock.advance(LEASE_SECONDS + 1)
    republished: list[tuple[str, int]] = []
    recovery = OutboxRecovery(
        db, lambda c, g, method: republished.append((c, g)), recovery_seconds=10, clock=clock
    )
    assert recovery.run_once() == 0 and republished == []
    assert delivery.deliver(challenge_id, 0).status == "nothing_to_do"
    assert len(gateway.sent) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("returned", "stored"),
    [
        (FIXED_UUID, str(FIXED_UUID)),
        (b"gw-42", "gw-42"),
        (42, "42"),
        ({"id": "gw-1", "parts": 1}, "{'id': 'gw-1', 'parts': 1}"),
        ("gw\x00-1", "gw-1"),
    ],
)
def test_any_returned_id_is_recorded_sent_once(
    database: tuple[Harness, Database], returned: object, stored: str
) -> None:
    h, db = database
    challenge_id = start_sms_enrollment(h, "ann")
    gateway = Gateway(returned)
    clock = Clock(time.time())
    delivery = deliverer(h, db, gateway, clock)

    assert delivery.deliver(challenge_id, 0).status == "sent"

    [row] = query(
        h.settings,
        "SELECT delivery_status, provider_message_id, code_ciphertext FROM challenges "
        "WHERE challenge_id = %(c)s",
        {"c": challenge_id},
    )
    assert row == {"delivery_status": "sent", "provider_message_id": stored, "code_ciphertext": None}
    assert_never_sent_again(h, db, challenge_id, delivery, gateway, clock)


def test_a_send_whose_record_fails_is_recorded_without_its_id_and_not_sent_again(
    database: tuple[Harness, Database], caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: a record the database refuses (here a trigger, standing in for any bug)."""
    h, db = database
    challenge_id = start_sms_enrollment(h, "bob")
    with psycopg.connect(h.settings.database_url, autocommit=True) as conn:  # the test's own schema
        conn.execute(
            "CREATE FUNCTION refuse_provider_ids() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.provider_message_id IS DISTINCT FROM OLD.provider_message_id THEN "
            "RAISE EXCEPTION 'provider message ids refused by the test'; END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse_provider_ids BEFORE UPDATE ON challenges "
            "FOR EACH ROW EXECUTE FUNCTION refuse_provider_ids()"
        )
    gateway = Gateway("gw-7")
    clock = Clock(time.time())
    delivery = deliverer(h, db, gateway, clock)

    with caplog.at_level(logging.ERROR, logger="twofactor_server"):
        assert delivery.deliver(challenge_id, 0).status == "sent"

    [row] = query(
        h.settings,
        "SELECT delivery_status, provider_message_id FROM challenges WHERE challenge_id = %(c)s",
        {"c": challenge_id},
    )
    assert row == {"delivery_status": "sent", "provider_message_id": None}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"delivery of {challenge_id} was sent as 'gw-7', but recording it failed with RaiseException: "
        "recorded as sent without the provider's message id, so it is not sent again; "
        "report this bug with the traceback logged at DEBUG"
    ]
    assert_never_sent_again(h, db, challenge_id, delivery, gateway, clock)


def test_a_worker_with_a_class_returning_a_uuid_texts_once_and_records_it_as_text(
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    tmp_path: Path,
    workers_for: Callable[[Harness], Workers],
) -> None:
    h = celery_server(start_server, sink, queue)
    texts = tmp_path / "texts.jsonl"
    texts.touch()
    workers = workers_for(h)
    workers.text_through("UuidIdSmsSender", texts)
    worker = workers.start()

    challenge_id = start_sms_enrollment(h, "cat")

    # Until recorded SENT; before the fix the row stayed SENDING and every lease (10 s) sent it again.
    deadline = time.monotonic() + 90
    while True:
        challenge = challenge_status(h, "cat", challenge_id)  # first: a text is written before SENT
        sent = [json.loads(line) for line in texts.read_text().splitlines()]
        if challenge.delivery_status == common_pb2.DELIVERY_STATUS_SENT or len(sent) > 1:
            break
        assert worker.poll() is None, f"the worker exited:\n{workers.logs()}"
        assert time.monotonic() < deadline, f"delivery stayed {challenge.delivery_status}:\n{workers.logs()}"
        time.sleep(0.05)
    assert [text["to"] for text in sent] == ["+14155550100"], workers.logs()
    assert challenge.delivery_status == common_pb2.DELIVERY_STATUS_SENT
    assert challenge.provider_message_id == sent[0]["id"] and challenge.delivery_attempts == 1
    assert "Traceback" not in workers.logs()
