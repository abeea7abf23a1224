"""Retention deletes only what is older than the setting: audit events after
TWOFACTOR_AUDIT_RETENTION_DAYS, challenges a day after they expired; one run at a time."""

from __future__ import annotations

import threading
import time

import psycopg
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import EMAIL, CountingDatabase
from twofactor_server.storage.retention import purge
from twofactor_server.usecases.retention import DAY_MS, Purged, Retention


def audit_user_ids(h: Harness) -> list[str]:
    events = h.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(page_size=1000), metadata=h.admin_metadata
    )
    return sorted(e.user_id for e in events.events)


def touch(h: Harness, user_id: str) -> None:
    """One audit event (contact_changed) and one challenge for `user_id`."""
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com"), metadata=h.app_metadata
    )
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=EMAIL), metadata=h.app_metadata
    )


def test_retention_deletes_only_what_is_older_than_the_setting(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(audit_retention_days=30)
    retention = Retention(h.server.db, 30, clock)
    touch(h, "old")
    clock.advance(10 * 86400)
    touch(h, "mid")
    clock.advance(20 * 86400)  # "old" is now exactly 30 days old: kept (older than, not as old as)
    touch(h, "new")
    new_sent_at = clock.now
    assert retention.run_once() == Purged(audit_events=0, challenges=2)  # old's and mid's expired long ago
    assert audit_user_ids(h).count("old") == 2
    clock.now += 0.001
    assert retention.run_once() == Purged(audit_events=2, challenges=0)
    assert "old" not in audit_user_ids(h) and {"mid", "new"} <= set(audit_user_ids(h))
    # The live challenge stays until a day past its expiry.
    ttl_ms = h.settings.policy.code_ttl_seconds * 1000
    clock.now = new_sent_at + (ttl_ms + DAY_MS) / 1000  # exactly a day past its expiry: kept
    assert retention.run_once() == Purged(audit_events=0, challenges=0)
    clock.now += 0.001
    assert retention.run_once() == Purged(audit_events=0, challenges=1)


def test_the_server_runs_retention_on_its_timer(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(audit_retention_days=1, retention_interval_seconds=0.2)
    touch(h, "gone")
    clock.advance(2 * 86400)
    deadline = time.monotonic() + 60
    while "gone" in audit_user_ids(h):
        assert time.monotonic() < deadline, "the retention job never ran"
        time.sleep(0.1)


def test_one_retention_run_at_a_time_on_postgresql(
    start_server: ServerFactory, clock: Clock, backend: str
) -> None:
    if backend != "postgres":
        return  # SQLite: one process owns the file, its transactions already run one at a time
    h = start_server()
    retention = Retention(h.server.db, 365, clock)
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with psycopg.connect(h.settings.database_url, autocommit=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x2FAC8,))
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert holding.wait(60)
        assert retention.run_once() is None
    finally:
        release.set()
        holder.join(60)
    assert retention.run_once() == Purged(0, 0)


def test_a_backlog_is_deleted_in_batches_of_their_own_transactions(
    start_server: ServerFactory, clock: Clock
) -> None:
    """One DELETE for everything ran past the storage timeout on a backlog of a few million rows,
    was rolled back, and every later run did the same: the table was never trimmed. Each batch
    is a short transaction of its own now, until nothing old is left."""
    h = start_server()
    now_ms = int(clock.now * 1000)
    with h.server.db.transaction() as tx:
        for n in range(350):
            tx.execute(
                "INSERT INTO audit_events (at, actor, user_id, action, request_id, outcome, detail) "
                "VALUES (%(at)s, 'test', %(u)s, 'user_reset', 'r', 'success', '')",
                {"at": now_ms - 400 * DAY_MS - n, "u": f"u{n}"},
            )
        tx.execute(
            "INSERT INTO audit_events (at, actor, user_id, action, request_id, outcome, detail) "
            "VALUES (%(at)s, 'test', 'recent', 'user_reset', 'r', 'success', '')",
            {"at": now_ms},
        )
    counted = CountingDatabase(h.server.db)
    deleted = purge(counted, audit_before_ms=now_ms - 365 * DAY_MS, challenges_before_ms=0, batch=100)
    assert deleted == (350, 0)
    assert counted.transactions == 5  # 100, 100, 100, 50 audit events; then no challenge
    assert audit_user_ids(h) == ["recent"]
