"""The storage layer owns its drivers' errors: what a retry can fix is UNAVAILABLE
(STORAGE_UNAVAILABLE), anything else is a bug, INTERNAL with its traceback logged."""

from __future__ import annotations

import logging
import socket
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from threading import Barrier

import grpc
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, ServerFactory
from tests.server.helpers import enroll_authenticator, error_info, totp_now, verified_token
from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.storage.database import PostgresDatabase, SqliteDatabase


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_missing_table_is_internal_not_unavailable(
    start_server: ServerFactory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    h = start_server()
    secret, _ = enroll_authenticator(h, clock, "ana")
    token = verified_token(h, clock, "ana", secret)
    with closing(sqlite3.connect(h.settings.data_dir / "twofactor.sqlite3", isolation_level=None)) as db:
        db.execute("DROP TABLE backup_codes")  # a bug's stand-in: the schema is not what the code expects
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as raised:
        h.twofactor.GetBackupCodes(
            pb.GetBackupCodesRequest(user_id="ana", verification_token=token), metadata=h.app_metadata
        )
    assert raised.value.code() is grpc.StatusCode.INTERNAL
    assert raised.value.details() == "internal error"  # nothing of the bug reaches the caller
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info is not None, "the bug is logged at ERROR with its traceback"
    assert "no such table" in str(errors[0].exc_info[1])


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_busy_sqlite_store_is_unavailable(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server()
    secret, _ = enroll_authenticator(h, clock, "ana")
    store = h.server.db
    assert isinstance(store, SqliteDatabase)
    blocker = sqlite3.connect(h.settings.data_dir / "twofactor.sqlite3", isolation_level=None, timeout=0)
    with closing(blocker):
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
        store._conn.execute("PRAGMA busy_timeout=50")
        with pytest.raises(grpc.RpcError) as raised:
            h.twofactor.Verify(pb.VerifyRequest(user_id="ana", code="000000"), metadata=h.app_metadata)
        blocker.execute("ROLLBACK")
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert error_info(raised.value).reason == "STORAGE_UNAVAILABLE"
    # Nothing was lost: once the lock is gone the same user verifies.
    accepted = h.twofactor.Verify(
        pb.VerifyRequest(user_id="ana", code=totp_now(secret, clock)), metadata=h.app_metadata
    )
    assert accepted.result == pb.VERIFY_RESULT_ACCEPTED


def test_a_refused_postgres_connection_is_storage_unavailable() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db = PostgresDatabase(f"postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=1", timeout=1.0)
    try:
        with pytest.raises(StorageUnavailable), db.transaction() as tx:
            tx.one("SELECT 1")
    finally:
        db.close()


def test_a_postgres_programming_error_is_not_unavailable(postgres_url: str) -> None:
    db = PostgresDatabase(postgres_url, timeout=5.0)
    try:
        with pytest.raises(Exception) as raised, db.transaction() as tx:
            tx.one("SELECT * FROM no_such_table")
        assert not isinstance(raised.value, StorageUnavailable)
    finally:
        db.close()


def test_a_postgres_deadlock_is_retryable_and_logged_as_a_conflict_not_an_outage(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two transactions lock two rows in opposite order; PostgreSQL aborts one. Its caller hears
    STORAGE_UNAVAILABLE (a retry succeeds), and the log says it was a lock conflict, not a
    database that can't be reached, so nobody at 3 a.m. goes looking for a dead server."""
    db = PostgresDatabase(postgres_url, timeout=30.0)
    try:
        with db.transaction() as tx:
            tx.execute("CREATE TABLE pair (id INT PRIMARY KEY)")
            tx.execute("INSERT INTO pair VALUES (1), (2)")
        both_hold_one = Barrier(2)

        def lock(first: int, second: int) -> None:
            with db.transaction() as tx:
                tx.one("SELECT id FROM pair WHERE id = %(i)s FOR UPDATE", {"i": first})
                both_hold_one.wait(timeout=30)
                tx.one("SELECT id FROM pair WHERE id = %(i)s FOR UPDATE", {"i": second})

        with caplog.at_level(logging.WARNING), ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = [pool.submit(lock, 1, 2), pool.submit(lock, 2, 1)]
            failures = [f.exception(timeout=60) for f in outcomes]
        refused = [e for e in failures if e is not None]
        assert len(refused) == 1 and isinstance(refused[0], StorageUnavailable), failures
        lines = [r.getMessage() for r in caplog.records if r.name == "twofactor_server.storage.database"]
        assert len(lines) == 1 and lines[0].startswith("storage conflict"), lines
        assert "DeadlockDetected" in lines[0] and "\n" not in lines[0]
        assert not db.unavailable.is_set(), "a conflict is no outage: the health probe isn't woken"
    finally:
        db.close()
