"""A retry carries the row's next generation, not the message's; a code is sent only with time left to use it.

A message that was only late in a long queue still claims its row while no attempt was made,
after recovery took it for lost and published the row again under a newer generation
(storage/outbox.py, claim_delivery). After an attempt, only the row's own generation claims
it. So the retry of an attempt that such a late message started must be a message of the
row's next generation (the attempt moves the row to it): one of its own would claim nothing,
and the code would wait for the next recovery round instead of its retry; one of the row's
generation then would let recovery's copy start a second retry chain.

A code that would reach the user in its last seconds (a long queue, a retry) is recorded
EXPIRED instead of sent: it would arrive dead, under a message saying it lasts a minute.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.stored_rows import query
from tests.workers.celery_harness import start_email_enrollment
from twofactor_server.app import load_keyring
from twofactor_server.delivery.deliverer import TOO_LATE_REASON, USEFUL_MS_MAX, Deliverer
from twofactor_server.delivery.providers import EmailMessage, SmsMessage, TransientDeliveryError
from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.settings import Settings
from twofactor_server.storage.database import Database, open_database

RECOVERY_SECONDS = 10.0


class Published:
    """The dispatcher the server and recovery hand messages to: kept, not delivered."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, int]] = []

    def dispatch(self, challenge_id: str, generation: int = 0, *, method: str = "") -> None:
        self.messages.append((challenge_id, generation))


class RelayBusyOnce:
    """An email provider whose first send fails for now (a 421); `during` runs inside it."""

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self.failed = False
        self.during: Callable[[], None] | None = None

    def send_email(self, message: EmailMessage) -> str:
        if self.during is not None:
            self.during()
            self.during = None
        if not self.failed:
            self.failed = True
            raise TransientDeliveryError("SMTP 421 4.3.2 busy")
        self.sent.append(message)
        return f"m-{len(self.sent)}"


class NoSms:
    def send_sms(self, message: SmsMessage) -> str:
        raise AssertionError("no text in this test")


def _deliverer(h: Harness, db: Database, relay: RelayBusyOnce, clock: Clock) -> Deliverer:
    return Deliverer(
        db,
        load_keyring(h.settings),
        relay,
        NoSms(),
        issuer="Acme",
        retry_base_seconds=2.0,
        recovery_seconds=RECOVERY_SECONDS,
        clock=clock,
    )


def test_the_retry_of_a_late_messages_attempt_claims_the_row(
    start_server: ServerFactory, clock: Clock, settings: Settings
) -> None:
    published = Published()
    h = start_server(dispatcher=published)
    challenge_id = start_email_enrollment(h, "gus").challenge_id
    assert published.messages == [(challenge_id, 0)]
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=10)
    try:
        relay = RelayBusyOnce()
        deliverer = _deliverer(h, db, relay, clock)
        recovery = OutboxRecovery(db, published.dispatch, recovery_seconds=RECOVERY_SECONDS, clock=clock)
        clock.advance(RECOVERY_SECONDS + 1)  # the first message waits in a long queue: taken for lost
        assert recovery.run_once() == 1
        assert published.messages[-1] == (challenge_id, 1)

        # The late first message reaches a worker; while it talks to the relay, the copy reaches
        # another one and finds the row busy.
        copies: list[str] = []
        relay.during = lambda: copies.append(deliverer.deliver(challenge_id, 1).status)
        first = deliverer.deliver(challenge_id, 0)
        assert copies == ["nothing_to_do"]
        assert first.status == "retry" and first.retry_in is not None
        assert first.retry_generation == 2
        # The copy again, redelivered by the broker once the attempt is over: it is not the retry.
        assert deliverer.deliver(challenge_id, 1).status == "nothing_to_do"

        clock.advance(first.retry_in + 0.01)  # the retry comes due, before any recovery round
        assert deliverer.deliver(challenge_id, 0, tries=1).status == "nothing_to_do"  # its own: stale
        assert deliverer.deliver(challenge_id, first.retry_generation, tries=1).status == "sent"
        assert len(relay.sent) == 1
        [row] = query(
            settings,
            "SELECT delivery_status, delivery_attempts FROM challenges WHERE challenge_id = %(c)s",
            {"c": challenge_id},
        )
        assert (row["delivery_status"], row["delivery_attempts"]) == ("sent", 2)
    finally:
        db.close()


def _expiry(settings: Settings, challenge_id: str) -> tuple[int, int]:
    [row] = query(
        settings,
        "SELECT created_at, expires_at FROM challenges WHERE challenge_id = %(c)s",
        {"c": challenge_id},
    )
    return row["created_at"], row["expires_at"]


def test_a_code_that_reaches_a_worker_in_its_last_seconds_is_expired_not_sent(
    start_server: ServerFactory, clock: Clock, settings: Settings
) -> None:
    h = start_server(dispatcher=Published())
    challenge_id = start_email_enrollment(h, "ivy").challenge_id
    created, expires = _expiry(settings, challenge_id)
    assert expires - created >= 4 * USEFUL_MS_MAX  # the default lifetime: 30 s is what must be left
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=10)
    try:
        relay = RelayBusyOnce()
        relay.failed = True  # the relay takes it at once
        clock.advance((expires - created - USEFUL_MS_MAX) / 1000 + 1)  # 29 s left when a worker takes it
        assert _deliverer(h, db, relay, clock).deliver(challenge_id, 0).status == "expired"
        assert relay.sent == []
        [row] = query(
            settings,
            "SELECT delivery_status, failure_reason, code_ciphertext FROM challenges "
            "WHERE challenge_id = %(c)s",
            {"c": challenge_id},
        )
        assert (row["delivery_status"], row["failure_reason"], row["code_ciphertext"]) == (
            "expired",
            TOO_LATE_REASON,
            None,
        )
    finally:
        db.close()


def test_a_retry_that_would_come_due_in_the_codes_last_seconds_gives_up(
    start_server: ServerFactory, clock: Clock, settings: Settings
) -> None:
    h = start_server(dispatcher=Published())
    challenge_id = start_email_enrollment(h, "jo").challenge_id
    created, expires = _expiry(settings, challenge_id)
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=10)
    try:
        relay = RelayBusyOnce()  # a 421 first
        # 30.5 s left: worth an attempt; its retry (1 to 2 s later) would leave 28.5 to 29.5 s.
        clock.advance((expires - created - USEFUL_MS_MAX - 500) / 1000)
        assert _deliverer(h, db, relay, clock).deliver(challenge_id, 0).status == "failed"
        assert relay.sent == []
        [row] = query(
            settings, "SELECT failure_reason FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id}
        )
        assert row["failure_reason"] == "gave up: SMTP 421 4.3.2 busy"
    finally:
        db.close()
