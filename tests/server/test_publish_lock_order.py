"""A publish locks its user's row before any of the user's codes, as SendCode does.

Publishing a code supersedes the user's older ones. Two publishes for one user used to lock
those older rows in whatever order each UPDATE scanned them, and PostgreSQL aborted one of
them as a deadlock: the caller of SendCode heard STORAGE_UNAVAILABLE (seen in CI, two
servers, twenty concurrent sends). These tests hold the user's row and watch a publish wait
for it, then run many publishes for one user at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from threading import Barrier
from typing import Any

import psycopg
import pytest

from tests.server.helpers import wait_until
from twofactor_server.storage import outbox, store
from twofactor_server.storage.database import Database, open_database
from twofactor_server.storage.records import ChallengeRecord, NewChallenge

Connection = psycopg.Connection[tuple[object, ...]]
WAIT_LIMIT = 30.0  # seconds; every wait below is for a condition, bounded by this
USER = "pia"
T0 = 1_800_000_000_000


@pytest.fixture
def db(postgres_url: str, tmp_path: Path) -> Iterator[Database]:
    database = open_database(postgres_url, data_dir=tmp_path, timeout=WAIT_LIMIT)
    database.migrate()
    with database.transaction() as tx:
        store.ensure_user(tx, USER, T0)
    yield database
    database.close()


def insert_codes(db: Database, n: int) -> list[str]:
    """n unpublished login codes for USER, oldest first."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    with db.transaction() as tx:
        for i, challenge_id in enumerate(ids):
            outbox.insert_challenge(
                tx,
                NewChallenge(
                    challenge_id=challenge_id,
                    user_id=USER,
                    method="email",
                    purpose="login",
                    destination="pia@example.com",
                    code_hash=b"h" * 32,
                    code_ciphertext=b"c" * 32,
                    idempotency_key=None,
                    locale="en",
                    created_at=T0 + i,
                    expires_at=T0 + 600_000,
                ),
            )
    return ids


def challenge(db: Database, challenge_id: str) -> ChallengeRecord:
    with db.transaction() as tx:
        found = outbox.get_challenge(tx, challenge_id)
    assert found is not None
    return found


def publish_new(db: Database, challenge_id: str) -> None:
    with db.transaction() as tx:
        assert outbox.publish_new(tx, challenge_id, USER, "email", T0 + 1_000) is not None


def publish_new_alone(db: Database, challenge_id: str) -> None:
    with db.statements() as q:  # as SendCode runs it on PostgreSQL: one statement, no transaction
        assert outbox.publish_new(q, challenge_id, USER, "email", T0 + 1_000) is not None


def mark_published(db: Database, challenge_id: str) -> None:
    record = challenge(db, challenge_id)
    with db.transaction() as tx:
        assert outbox.mark_published(tx, record, T0 + 1_000)


PUBLISHES: dict[str, Callable[[Database, str], None]] = {
    "publish_new": publish_new,
    "publish_new_alone": publish_new_alone,  # SendCode
    "mark_published": mark_published,  # outbox recovery and notices
}


def publish_after(start: Barrier, publish: str, db: Database, challenge_id: str) -> None:
    start.wait(timeout=WAIT_LIMIT)
    PUBLISHES[publish](db, challenge_id)


@contextmanager
def waiting_for_the_users_row(
    postgres_url: str, work: Callable[[], object], who: str
) -> Iterator[tuple[Connection, Connection, Future[Any]]]:
    """`work` started on a thread while a connection of the test's own holds USER's row lock,
    and seen waiting for it: yields that holder (roll it back to let the work go on), a monitor
    connection (autocommit) and the work's future."""
    with (
        psycopg.connect(postgres_url) as holder,
        psycopg.connect(postgres_url, autocommit=True) as monitor,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        holder_pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        holder.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (USER,))
        done = pool.submit(work)

        def blocked() -> bool:  # or done: the work never waited, and the assertion below says so
            rows = monitor.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND %s = ANY(pg_blocking_pids(pid))",
                (holder_pid,),
            ).fetchall()
            return bool(rows) or done.done()

        wait_until(blocked, f"{who} waits for the user's row", bound=WAIT_LIMIT)
        assert not done.done(), f"{who} went ahead without the user's row lock"
        yield holder, monitor, done


@pytest.mark.parametrize("publish", PUBLISHES)
def test_a_publish_waits_for_the_users_row_before_locking_any_of_their_codes(
    db: Database, postgres_url: str, publish: str
) -> None:
    older, newest = insert_codes(db, 2)
    with waiting_for_the_users_row(postgres_url, lambda: PUBLISHES[publish](db, newest), "the publish") as (
        holder,
        monitor,
        done,
    ):
        # While it waits it holds none of the user's codes: NOWAIT would fail on a locked one.
        with monitor.transaction():
            locked = monitor.execute(
                "SELECT challenge_id FROM challenges WHERE user_id = %s FOR UPDATE NOWAIT", (USER,)
            ).fetchall()
        assert {row[0] for row in locked} == {older, newest}
        holder.rollback()
        done.result(timeout=WAIT_LIMIT)
    assert challenge(db, newest).published_at is not None
    assert challenge(db, older).superseded_at is not None


@pytest.mark.parametrize("publish", PUBLISHES)
def test_many_publishes_for_one_user_at_once_all_commit_and_only_the_newest_code_stays_live(
    db: Database, publish: str
) -> None:
    rounds, at_once = 5, 8
    for _ in range(rounds):
        ids = insert_codes(db, at_once)
        start = Barrier(at_once)
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            # .result() re-raises a StorageUnavailable: a deadlock fails the test here.
            for future in [pool.submit(publish_after, start, publish, db, c) for c in reversed(ids)]:
                future.result(timeout=WAIT_LIMIT)
        live = [c for c in ids if challenge(db, c).superseded_at is None]
        assert live == [ids[-1]]


def test_a_sender_waits_for_the_users_row_before_it_locks_the_destination(
    db: Database, postgres_url: str
) -> None:
    """SendCode's first statement (outbox.lock_sender) takes the user's row, then the address's
    advisory lock: while it waits for the row it holds no advisory lock, and once it has the row
    it holds the address's until its transaction ends."""
    with db.transaction() as tx:
        store.set_contact(tx, USER, "email", "pia@example.com")
    release = Barrier(2)

    def send() -> str | None:
        with db.transaction() as tx:
            sender = outbox.lock_sender(tx, USER, "email", None)
            release.wait(timeout=WAIT_LIMIT)  # hold the transaction until the test has looked
            release.wait(timeout=WAIT_LIMIT)
            return None if sender is None else sender.destination

    def address_is_free(monitor: Connection) -> bool:
        with monitor.transaction():
            row = monitor.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                (outbox._DESTINATION_LOCKS, "pia@example.com"),
            ).fetchone()
        return bool(row and row[0])

    with waiting_for_the_users_row(postgres_url, send, "the sender") as (holder, monitor, done):
        assert address_is_free(monitor), "the sender locked the address before the user's row"
        holder.rollback()
        release.wait(timeout=WAIT_LIMIT)  # the sender has the row now, inside its transaction
        assert not address_is_free(monitor), "the sender does not hold the address's lock"
        release.wait(timeout=WAIT_LIMIT)
        assert done.result(timeout=WAIT_LIMIT) == "pia@example.com"
