"""A retry carries the row's generation, not the message's.

A message that was only late in a long queue still claims its row while no attempt was made,
after recovery took it for lost and published the row again under a newer generation
(storage/outbox.py, claim_delivery). After an attempt, only the row's own generation claims
it. So the retry of an attempt that such a late message started must be a message of the
row's generation: one of its own would claim nothing, and the code would wait for the next
recovery round instead of its retry.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Clock, ServerFactory
from tests.server.stored_rows import query
from tests.workers.celery_harness import start_email_enrollment
from twofactor_server.app import load_keyring
from twofactor_server.delivery.deliverer import Deliverer
from twofactor_server.delivery.providers import EmailMessage, SmsMessage, TransientDeliveryError
from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.settings import Settings
from twofactor_server.storage.database import open_database

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
        deliverer = Deliverer(
            db,
            load_keyring(h.settings),
            relay,
            NoSms(),
            issuer="Acme",
            retry_base_seconds=2.0,
            recovery_seconds=RECOVERY_SECONDS,
            clock=clock,
        )
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
        assert first.retry_generation == 1

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
