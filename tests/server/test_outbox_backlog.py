"""Outbox recovery in front of a long queue (storage/outbox_recovery.py, delivery/recovery.py).

Recovery can't tell a lost message from one still waiting behind many others. When it takes
a row for lost and publishes it again, the row's first message, if it was only late, still
delivers when a worker reaches it; and a row that stays queued is published again less and
less often, so the copies don't grow the queue faster than it drains."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import REGISTRY

from tests.conftest import Clock
from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.domain.errors import Unavailable
from twofactor_server.storage import outbox, outbox_recovery
from twofactor_server.storage.database import Database

R = 10_000  # the recovery interval, ms
CREATED = 1_000
EXPIRES = 10_000_000  # far beyond every republish below


def _queued_row(db: Database, challenge_id: str) -> None:
    """A published challenge waiting in the queue with its first message (generation 0)."""
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO users (user_id, created_at) VALUES ('zoe', %(t)s) ON CONFLICT DO NOTHING",
            {"t": CREATED},
        )
        tx.execute(
            "INSERT INTO challenges (challenge_id, user_id, method, purpose, destination, code_hash, "
            "code_ciphertext, locale, created_at, expires_at, delivery_status, updated_at, "
            "published_at, publish_generation) VALUES (%(c)s, 'zoe', 'email', 'login', 'zoe@example.com', "
            "%(h)s, %(s)s, 'en', %(t)s, %(e)s, 'queued', %(t)s, %(t)s, 0)",
            {"c": challenge_id, "h": b"hash", "s": b"sealed", "t": CREATED, "e": EXPIRES},
        )


def _republished(db: Database, now: int) -> list[tuple[str, int]]:
    with db.transaction() as tx:
        taken = outbox_recovery.take_for_republish(tx, now, stale_before=now - R, interval_ms=R, limit=10)
    return [(c.challenge_id, c.publish_generation) for c in taken]


def test_a_message_recovery_took_for_lost_still_delivers_when_it_arrives(other_connection: Database) -> None:
    db = other_connection
    _queued_row(db, "late")
    assert _republished(db, CREATED + R) == [("late", 1)]  # still queued R after its publish
    with db.transaction() as tx:
        # The first message reaches a worker now, behind a long queue: it claims the row.
        claimed = outbox.claim_delivery(tx, "late", 0, CREATED + R + 1, 120_000)
        assert claimed is not None and claimed.publish_generation == 1
        assert outbox.mark_delivery(
            tx, claimed, "sent", CREATED + R + 2, provider_message_id="m-1", wipe_code=True
        )
        # The copy recovery published finds it sent: a no-op, nothing sent twice.
        assert outbox.claim_delivery(tx, "late", 1, CREATED + R + 3, 120_000) is None
    assert _republished(db, CREATED + 100 * R) == []


def test_after_an_attempt_only_the_newest_generation_claims(other_connection: Database) -> None:
    """A retry chain that recovery replaced ends: its older message, arriving after an attempt
    was made, claims nothing, so republishing never runs two retry chains for one code."""
    db = other_connection
    _queued_row(db, "retried")
    with db.transaction() as tx:
        claimed = outbox.claim_delivery(tx, "retried", 0, CREATED + 1, 120_000)
        assert claimed is not None
        # The provider failed for now: queued again, a retry (generation 1) due, recovery after it.
        assert outbox.mark_delivery(
            tx,
            claimed,
            "queued",
            CREATED + 2,
            failure_reason="451",
            wipe_code=False,
            republish_at=CREATED + R,
        )
    assert _republished(db, CREATED + R) == [("retried", 2)]  # the retry went missing, or is late
    with db.transaction() as tx:
        assert outbox.claim_delivery(tx, "retried", 1, CREATED + R + 1, 120_000) is None  # the late retry
        again = outbox.claim_delivery(tx, "retried", 2, CREATED + R + 2, 120_000)
        assert again is not None and again.delivery_attempts == 2


def test_a_copy_published_before_an_attempt_claims_nothing_after_it(other_connection: Database) -> None:
    """Recovery took a late first message for lost and published a copy; the first message then
    made an attempt that failed for now. The attempt's retry is the one message left: the copy,
    still in the queue, claims nothing (before, it sent at once, ignoring the backoff, and
    started a second retry chain beside the first)."""
    db = other_connection
    _queued_row(db, "copied")
    assert _republished(db, CREATED + R) == [("copied", 1)]  # the copy, in the queue behind the first
    with db.transaction() as tx:
        first = outbox.claim_delivery(tx, "copied", 0, CREATED + R + 1, 120_000)  # the late first
        assert first is not None
        assert outbox.mark_delivery(
            tx, first, "queued", CREATED + R + 2, failure_reason="451", wipe_code=False, republish_at=3 * R
        )
        assert outbox.claim_delivery(tx, "copied", 1, CREATED + R + 3, 120_000) is None  # the copy
        retry = outbox.claim_delivery(tx, "copied", first.publish_generation + 1, CREATED + R + 4, 120_000)
        assert retry is not None and retry.delivery_attempts == 2


def test_an_unpublished_row_one_round_took_is_not_taken_again_while_its_publish_is_under_way(
    other_connection: Database,
) -> None:
    """A row the server never published (it died after the commit): one recoverer takes it and
    publishes; until it records the publish, another recoverer's round leaves the row alone
    rather than publish a second copy."""
    db = other_connection
    _queued_row(db, "orphan")
    with db.transaction() as tx:
        tx.execute("UPDATE challenges SET published_at = NULL WHERE challenge_id = 'orphan'")
    assert _republished(db, CREATED + R) == [("orphan", 1)]  # one recoverer, publishing now
    assert _republished(db, CREATED + R + 50) == []  # another, 50 ms later
    assert _republished(db, CREATED + 2 * R) == [("orphan", 2)]  # its publish never got recorded


def test_a_row_that_stays_queued_is_published_again_after_twice_the_wait_each_time(
    other_connection: Database,
) -> None:
    db = other_connection
    _queued_row(db, "slow")
    now, taken_at = CREATED + R, []
    generation = 0
    while now < CREATED + 200 * R:
        taken = _republished(db, now)
        if taken:
            generation += 1
            assert taken == [("slow", generation)]
            taken_at.append(now)
        now += R // 2  # recovery's rounds come every half interval
    waits = [later - earlier for earlier, later in itertools.pairwise(taken_at)]
    # The first R after the publish; then R, 2 R, 4 R, 8 R, 16 R, and 32 R from then on.
    assert taken_at[0] == CREATED + R
    assert waits[:7] == [R, 2 * R, 4 * R, 8 * R, 16 * R, 32 * R, 32 * R]
    assert len(taken_at) == generation


class _Broker:
    """What recovery publishes with (delivery/recovery.Publish): down until `up`, then it takes
    each message (the real dispatcher raises Unavailable the same way when Redis is down)."""

    def __init__(self) -> None:
        self.up = False
        self.messages: list[tuple[str, int]] = []

    def publish(self, challenge_id: str, generation: int, *, method: str = "") -> None:
        if not self.up:
            raise Unavailable("BROKER_UNAVAILABLE", "the delivery queue can't be reached; retry later")
        self.messages.append((challenge_id, generation))


def test_a_broker_outage_does_not_lengthen_the_wait_before_a_republish(other_connection: Database) -> None:
    """Rounds that can't publish (the broker down for 6 minutes) leave the row due: the first round
    after the broker is back publishes it, long before its code expires."""
    db = other_connection
    _queued_row(db, "outage")
    clock = Clock(start=CREATED / 1000)
    broker = _Broker()
    recovery = OutboxRecovery(db, broker.publish, recovery_seconds=R / 1000, clock=clock)
    clock.advance(R / 1000)
    for _ in range(72):  # every half interval, for 6 minutes
        with pytest.raises(Unavailable):
            recovery.run_once()
        clock.advance(R / 2000)
    broker.up = True
    assert recovery.run_once() == 1
    (published,) = broker.messages
    assert published[0] == "outage"


class _BrokerThatFails(_Broker):
    """Takes `takes` messages, then goes down (a Redis that stops in the middle of a round)."""

    def __init__(self, takes: int) -> None:
        super().__init__()
        self.up = True
        self._takes = takes

    def publish(self, challenge_id: str, generation: int, *, method: str = "") -> None:
        self.up = self.up and len(self.messages) < self._takes
        super().publish(challenge_id, generation, method=method)


def test_a_round_the_broker_fails_midway_counts_what_it_published(other_connection: Database) -> None:
    """twofactor_outbox_republished_total counts every message recovery put in the queue, those
    published before the broker went down in the middle of a round too."""
    db = other_connection
    for challenge_id in ("first", "second"):
        _queued_row(db, challenge_id)
    clock = Clock(start=(CREATED + R) / 1000)
    broker = _BrokerThatFails(takes=1)
    recovery = OutboxRecovery(db, broker.publish, recovery_seconds=R / 1000, clock=clock)
    before = REGISTRY.get_sample_value("twofactor_outbox_republished_total") or 0.0
    with pytest.raises(Unavailable):
        recovery.run_once()
    assert len(broker.messages) == 1
    assert REGISTRY.get_sample_value("twofactor_outbox_republished_total") == before + 1
