"""HotStatement: the accepted Verify's one statement, run through libpq without psycopg's cursor.
It must answer as the cursor would (rows, NULLs, a statement's error as its SQLSTATE's class, a
lost connection as StorageUnavailable) on both backends, and keep every connection usable."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.pg_proxy import PostgresProxy
from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.storage import hot_statements
from twofactor_server.storage.database import Database, PostgresDatabase, SqliteDatabase
from twofactor_server.storage.hot_statements import HotStatement

BUMP = HotStatement(
    "test_bump",
    "UPDATE counter SET n = n + %(by)s WHERE id = %(id)s AND CAST(%(note)s AS TEXT) IS NULL RETURNING n, id",
)


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    store: Database
    if request.param == "postgres":
        store = PostgresDatabase(request.getfixturevalue("postgres_url"), timeout=30.0)
    else:
        store = SqliteDatabase(tmp_path / "hot.sqlite3", timeout=5.0)
    try:
        with store.transaction() as tx:
            tx.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            tx.execute("INSERT INTO counter VALUES (1, 10), (2, 20)")
        yield store
    finally:
        store.close()


def _prepared_beside_psycopgs_own(db: PostgresDatabase, pid: HotStatement) -> int:
    """On the pool's one connection: `pid` (pg_backend_pid() + %(zero)s) prepared by us, and a
    statement run past psycopg's prepare threshold (5), so psycopg holds one of its own; the
    backend's pid."""
    with db.statements() as q:
        (backend,) = q.hot_row(pid, {"zero": 0}) or (0,)
        for _ in range(6):
            q.one("SELECT 1 AS one")
    return int(backend)


def test_placeholders_become_positional_parameters_once_per_name() -> None:
    statement = HotStatement("x", "SELECT %(a)s::int + %(b)s::int + %(a)s::int")
    assert statement.postgres_sql == b"SELECT $1::int + $2::int + $1::int"
    assert statement.param_names == ("a", "b")


def test_a_hot_statement_answers_as_the_cursor_does(db: Database) -> None:
    with db.statements() as q:
        assert q.hot_row(BUMP, {"by": 5, "id": 1, "note": None}) == (15, 1)
        assert q.hot_row(BUMP, {"by": 5, "id": 1, "note": None}) == (20, 1)  # prepared: run again
        assert q.hot_row(BUMP, {"by": 5, "id": 3, "note": None}) is None  # no row
        assert q.hot_row(BUMP, {"by": 5, "id": 2, "note": "text"}) is None  # a text parameter
        assert q.one("SELECT n FROM counter WHERE id = %(id)s", {"id": 1}) == {"n": 20}
        with pytest.raises(TypeError):
            q.hot_row(BUMP, {"by": True, "id": 1, "note": None})  # only str, int and None
    first_in_a_transaction = HotStatement("test_bump_in_tx", BUMP.sql)
    with db.transaction() as tx:  # inside a transaction too
        assert tx.hot_row(first_in_a_transaction, {"by": 1, "id": 2, "note": None}) == (21, 2)
        if db.dialect == "postgres":  # prepared there, on this connection, not run through the cursor
            prepared = tx.one(
                "SELECT count(*) AS n FROM pg_prepared_statements WHERE name = 'test_bump_in_tx'"
            )
            assert prepared == {"n": 1}


def test_a_failed_hot_statement_raises_its_sqlstate_class_and_the_connection_stays_usable(
    postgres_url: str,
) -> None:
    db = PostgresDatabase(postgres_url, timeout=30.0)
    divide = HotStatement("test_divide", "SELECT 1 / %(d)s::int AS q")
    try:
        with pytest.raises(psycopg.errors.DivisionByZero), db.statements() as q:
            q.hot_row(divide, {"d": 0})
        with db.statements() as q:  # the same (only) connection, prepared already
            assert q.hot_row(divide, {"d": 1}) == (1,)
    finally:
        db.close()


def test_a_hot_statement_on_a_lost_connection_is_storage_unavailable_and_the_pool_recovers(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    pid = HotStatement("test_pid", "SELECT pg_backend_pid() + %(zero)s AS pid")
    try:
        with db.statements() as q:
            (backend,) = q.hot_row(pid, {"zero": 0}) or (0,)
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailable), db.statements() as q:
            q.hot_row(pid, {"zero": 0})
        assert any(r.getMessage().startswith("storage unavailable: OperationalError") for r in caplog.records)
        with db.statements() as q:  # a new connection: the statement is prepared on it again
            (replacement,) = q.hot_row(pid, {"zero": 0}) or (0,)
        assert replacement not in (0, backend)
    finally:
        db.close()


def test_a_rolled_back_transaction_keeps_every_prepared_statement(postgres_url: str) -> None:
    """psycopg follows a ROLLBACK it sees, on a connection where it prepared statements of its
    own, with DEALLOCATE ALL, which would drop ours too; the next transaction's first hot call
    would then fail inside BEGIN. Transactions end through libpq, out of its sight: after a
    rollback, its statements and ours are all still there, and ours runs inside the next one."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    pid = HotStatement("test_pid_kept", "SELECT pg_backend_pid() + %(zero)s AS pid")
    names = "SELECT name FROM pg_prepared_statements ORDER BY name"
    try:
        backend = _prepared_beside_psycopgs_own(db, pid)
        with db.statements() as q:
            prepared = q.all(names)
        assert {"name": "test_pid_kept"} in prepared and len(prepared) == 2, prepared
        with pytest.raises(ZeroDivisionError), db.transaction() as tx:
            assert tx.hot_row(pid, {"zero": 0}) == (backend,)
            raise ZeroDivisionError  # rolled back
        with db.transaction() as tx:
            assert tx.all(names) == prepared, "DEALLOCATE ALL was sent"
            assert tx.hot_row(pid, {"zero": 0}) == (backend,)  # the same connection, still prepared
        with pytest.raises(psycopg.errors.DivisionByZero), db.transaction() as tx:
            tx.one("SELECT 1 / 0 AS failed")  # a failed statement: the block aborted, then rolled back
        with db.transaction() as tx:
            assert tx.all(names) == prepared
            assert tx.hot_row(pid, {"zero": 0}) == (backend,)
    finally:
        db.close()


def test_a_statement_deallocated_by_another_hand_is_prepared_again(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside a transaction the call is sent again, prepared anew; inside one the block is
    aborted: UNAVAILABLE (retryable), one line in the log, and the retry prepares it again."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    pid = HotStatement("test_pid_gone", "SELECT pg_backend_pid() + %(zero)s AS pid")
    try:
        with db.statements() as q:
            (backend,) = q.hot_row(pid, {"zero": 0}) or (0,)
            q.execute("DEALLOCATE test_pid_gone")
            assert q.hot_row(pid, {"zero": 0}) == (backend,)
            q.execute("DEALLOCATE test_pid_gone")
        with caplog.at_level(logging.ERROR), pytest.raises(StorageUnavailable), db.transaction() as tx:
            tx.hot_row(pid, {"zero": 0})
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
            "storage: prepared statement test_pid_gone was missing or already there inside a transaction"
        ]
        with db.transaction() as tx:  # the same connection: rolled back, and the name prepared again
            assert tx.hot_row(pid, {"zero": 0}) == (backend,)
        assert not db.unavailable.is_set()  # the database answered throughout: no outage
    finally:
        db.close()


def test_ddl_inside_a_transaction_that_makes_psycopg_deallocate_all_is_a_retryable_answer(
    postgres_url: str,
) -> None:
    """psycopg follows a DROP it sees (on a connection where it prepared statements of its own)
    with DEALLOCATE ALL, mid-transaction. The service runs no DDL on pooled connections, but if
    anything did, the hot statement after it answers UNAVAILABLE and the retry succeeds."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    pid = HotStatement("test_pid_after_ddl", "SELECT pg_backend_pid() + %(zero)s AS pid")
    try:
        backend = _prepared_beside_psycopgs_own(db, pid)
        with pytest.raises(StorageUnavailable), db.transaction() as tx:
            tx.execute("CREATE TEMP TABLE scratch (n INT)")
            tx.execute("DROP TABLE scratch")
            tx.hot_row(pid, {"zero": 0})
        with db.transaction() as tx:
            assert tx.hot_row(pid, {"zero": 0}) == (backend,)
    finally:
        db.close()


def test_migrations_leave_no_stale_record_of_prepared_statements(postgres_url: str) -> None:
    """Migrations run DDL in psycopg's own Transaction, and psycopg follows it with DEALLOCATE ALL
    on a connection where it prepared statements of its own; afterwards our record must agree
    with the server, or the next transaction's hot statement would find its name gone."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    pid = HotStatement("test_pid_migrated", "SELECT pg_backend_pid() + %(zero)s AS pid")
    try:
        backend = _prepared_beside_psycopgs_own(db, pid)
        assert db.migrate()  # every migration, on the same (only) connection
        with db.transaction() as tx:
            assert tx.hot_row(pid, {"zero": 0}) == (backend,)
    finally:
        db.close()


def test_a_transaction_whose_failed_statement_was_swallowed_does_not_count_as_committed(
    postgres_url: str,
) -> None:
    """PostgreSQL answers COMMIT of an aborted block with ROLLBACK and no error. No unit of work
    swallows a statement's error, but if one did, the transaction raises and its after-commit
    actions (a publish) don't run."""
    db = PostgresDatabase(postgres_url, timeout=30.0)
    published: list[str] = []
    try:
        with db.transaction() as tx:
            tx.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction), db.transaction() as tx:
            tx.after_commit(lambda: published.append("sent"))
            tx.execute("INSERT INTO counter VALUES (1, 10)")
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                tx.one("SELECT 1 / 0 AS q")
        assert published == []
        with db.statements() as q:
            assert q.all("SELECT id FROM counter") == []
    finally:
        db.close()


def test_binary_parameters_and_the_columns_read_by_their_type(db: Database) -> None:
    """bytes go as bytea, every byte value intact; PostgreSQL's text output is read by each
    column's type, NULL as None (SQLite's values are its own: a boolean is 0 or 1)."""
    echo = HotStatement(
        "test_echo",
        "SELECT %(blob)s AS blob, %(n)s + 1 AS n, CAST(%(t)s AS TEXT) AS t, "
        "%(n)s > 0 AS positive, CAST(%(none)s AS BIGINT) AS none",
        binary=frozenset({"blob"}),
    )
    every_byte = bytes(range(256))
    with db.statements() as q:
        for _ in range(2):  # prepared, then run again
            blob, n, t, positive, none = (
                q.hot_row(echo, {"blob": every_byte, "n": 41, "t": "é", "none": None}) or ()
            )
            assert (blob, n, t, bool(positive), none) == (every_byte, 42, "é", True, None)
        with pytest.raises(TypeError):
            q.hot_row(echo, {"blob": "not bytes", "n": 1, "t": "", "none": None})
        with pytest.raises(TypeError):
            q.hot_row(echo, {"blob": b"", "n": 1, "t": b"bytes where text goes", "none": None})
    if db.dialect == "postgres":
        with db.statements() as q:
            assert q.hot_row(echo, {"blob": b"", "n": -1, "t": None, "none": None}) == (
                b"",
                0,
                None,
                False,
                None,
            )


def test_a_binary_name_that_is_no_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match="blob"):
        HotStatement("test_typo", "SELECT %(a)s", binary=frozenset({"blob"}))


def test_a_deadlock_in_a_hot_statement_is_a_retryable_conflict(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As through the cursor: the statement's DeadlockDetected is STORAGE_UNAVAILABLE, logged as a
    conflict (test_storage_errors.py), not an outage. The hot UPDATE locks row 1, then waits for
    row 2, which a transaction holds; that transaction then asks for row 1."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=60.0)
    both = HotStatement("test_both", "UPDATE pair SET n = n + %(by)s WHERE id IN (1, 2) RETURNING n")
    try:
        with db.statements() as q:
            q.execute("CREATE TABLE pair (id INT PRIMARY KEY, n INT NOT NULL)")
            q.execute("INSERT INTO pair VALUES (1, 0), (2, 0)")
            # The one pool connection finds the cycle (3 s after it starts waiting: the holder
            # below is waiting too by then), the holder would only after a minute: the hot
            # statement is the one PostgreSQL aborts.
            q.execute("SET deadlock_timeout = '3s'")

        def hot() -> None:
            with db.statements() as q:
                q.hot_row(both, {"by": 1})

        with (
            caplog.at_level(logging.WARNING),
            psycopg.connect(postgres_url) as holder,
            psycopg.connect(postgres_url, autocommit=True) as monitor,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            holder.execute("SET deadlock_timeout = '60s'")
            holder.execute("SELECT id FROM pair WHERE id = 2 FOR UPDATE")
            outcome = pool.submit(hot)
            give_up = time.monotonic() + 30
            while not monitor.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE pair%'"
            ).fetchone():
                assert time.monotonic() < give_up, "the hot UPDATE never waited for row 2"
                time.sleep(0.01)
            holder.execute("SELECT id FROM pair WHERE id = 1 FOR UPDATE")  # the cycle; waits until aborted
            holder.rollback()
            error = outcome.exception(timeout=60)
        assert isinstance(error, StorageUnavailable), error
        assert isinstance(error.__cause__, psycopg.errors.DeadlockDetected)
        lines = [r.getMessage() for r in caplog.records if r.name == "twofactor_server.storage.database"]
        assert len(lines) == 1, lines
        assert lines[0].startswith("storage conflict, answered UNAVAILABLE (retryable): DeadlockDetected")
        assert not db.unavailable.is_set()
    finally:
        db.close()


def test_a_statement_without_rows_answers_none(db: Database) -> None:
    """An INSERT without RETURNING (SendCode's) has no row to read; its change is made."""
    insert = HotStatement("test_insert", "INSERT INTO counter (id, n) VALUES (%(id)s, %(n)s)")
    with db.transaction() as tx:
        assert tx.hot_row(insert, {"id": 3, "n": 30}) is None
        assert tx.one("SELECT n FROM counter WHERE id = 3") == {"n": 30}


def test_a_void_column_reads_as_none(postgres_url: str) -> None:
    """SendCode's sender lock selects pg_advisory_xact_lock, which returns void."""
    db = PostgresDatabase(postgres_url, timeout=30.0)
    lock = HotStatement("test_void", "SELECT pg_advisory_xact_lock(%(key)s) AS locked, 'held' AS state")
    try:
        with db.transaction() as tx:
            assert tx.hot_row(lock, {"key": 0x7E57}) == (None, "held")
    finally:
        db.close()


def test_text_with_a_nul_byte_is_refused_as_the_cursor_refuses_it(postgres_url: str) -> None:
    """libpq would end the value at the NUL: 'ab' would be stored for 'ab\\0cd'."""
    db = PostgresDatabase(postgres_url, timeout=30.0)
    echo = HotStatement("test_nul", "SELECT CAST(%(t)s AS TEXT) AS t")
    try:
        with db.statements() as q:
            with pytest.raises(psycopg.DataError):
                q.one("SELECT CAST(%(t)s AS TEXT) AS t", {"t": "ab\0cd"})
            with pytest.raises(psycopg.DataError):
                q.hot_row(echo, {"t": "ab\0cd"})
            assert q.hot_row(echo, {"t": "abcd"}) == ("abcd",)
    finally:
        db.close()


def test_bytea_reads_alike_in_either_output_format(postgres_url: str) -> None:
    """A database or role set to bytea_output = 'escape' gets the same bytes back as with hex,
    PostgreSQL's default (the cursor reads both too): the methods' sealed secrets, the worker's
    claimed code."""
    escape_url = postgres_url.replace("options=-c", "options=-cbytea_output%3Descape%20-c", 1)
    assert escape_url != postgres_url
    blob = HotStatement(
        "test_blob", "SELECT CAST(%(b)s AS BYTEA) AS b, CAST(NULL AS BYTEA) AS none", binary=frozenset({"b"})
    )
    every_byte = bytes(range(256))
    for url, output in ((postgres_url, "hex"), (escape_url, "escape")):
        db = PostgresDatabase(url, timeout=30.0)
        try:
            with db.statements() as q:
                assert q.one("SHOW bytea_output") == {"bytea_output": output}
                assert q.hot_row(blob, {"b": every_byte}) == (every_byte, None)
                assert q.hot_rows(blob, {"b": b""}) == [(b"", None)]
        finally:
            db.close()


def test_every_row_in_the_statements_order(db: Database) -> None:
    """hot_rows: all the rows, as `all` gives them, each column read in its own row (a NULL in
    one, bytes in another); none is an empty list."""
    rows = HotStatement(
        "test_rows",
        "SELECT id, n, CASE WHEN id = 2 THEN %(blob)s END AS blob FROM counter "
        "WHERE n >= %(least)s ORDER BY id DESC",
        binary=frozenset({"blob"}),
    )
    with db.statements() as q:
        assert q.hot_rows(rows, {"least": 0, "blob": b"\0\xff"}) == [(2, 20, b"\0\xff"), (1, 10, None)]
        assert q.hot_rows(rows, {"least": 15, "blob": b"x"}) == [(2, 20, b"x")]  # prepared: run again
        assert q.hot_rows(rows, {"least": 99, "blob": None}) == []
    with db.transaction() as tx:
        tx.execute("INSERT INTO counter VALUES (3, 30)")
        assert tx.hot_rows(rows, {"least": 20, "blob": None}) == [(3, 30, None), (2, 20, None)]


def test_a_parameter_none_on_its_first_call_takes_the_type_of_its_place(db: Database) -> None:
    """Types are fixed when a statement is prepared, from its first call's values: a None then
    leaves the type to the server, which gives it the type of where it stands (a policy without
    a lock schedule passes None where another passes a number, as count_failure_unlocked does)."""
    # n as BIGINT, as the lock schedule's places are (locked_until): the place's type is the one kept
    either = HotStatement(
        "test_either", "SELECT COALESCE(%(x)s, CAST(n AS BIGINT)) AS n FROM counter WHERE id = %(id)s"
    )
    with db.statements() as q:
        assert q.hot_row(either, {"x": None, "id": 1}) == (10,)
        assert q.hot_row(either, {"x": 5_000_000_000, "id": 1}) == (5_000_000_000,)  # past int4
        assert q.hot_row(either, {"x": None, "id": 1}) == (10,)


# ---- BEGIN sent with a transaction's first hot statement (libpq's pipeline mode) -------------


def test_a_transactions_first_hot_statement_runs_inside_the_block_and_rolls_back_with_it(
    db: Database,
) -> None:
    """BEGIN travels with the first statement once that statement is prepared on the connection
    (the first transaction prepares it; the second pipelines): either way the block holds it,
    so a failure after it undoes it, and a later statement sees the same transaction."""
    same_transaction = "SELECT n FROM counter WHERE id = 1"
    for _ in range(2):
        with pytest.raises(ZeroDivisionError), db.transaction() as tx:
            assert tx.hot_row(BUMP, {"by": 5, "id": 1, "note": None}) == (15, 1)
            assert tx.one(same_transaction) == {"n": 15}
            raise ZeroDivisionError  # rolled back, the bump with it
        with db.statements() as q:
            assert q.one(same_transaction) == {"n": 10}
    with db.transaction() as tx:
        assert tx.hot_row(BUMP, {"by": 1, "id": 2, "note": None}) == (21, 2)
    with db.statements() as q:
        assert q.one("SELECT n FROM counter WHERE id = 2") == {"n": 21}


def test_the_block_is_one_transaction_from_its_first_hot_statement_on(postgres_url: str) -> None:
    """The first statement is inside BEGIN's block, not before it in a transaction of its own:
    it and the statement after it share one transaction id."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    xact = HotStatement("test_xact", "SELECT pg_current_xact_id()::text AS id, %(zero)s::int8 AS zero")
    try:
        for _ in range(2):  # prepared in the first block, pipelined with BEGIN in the second
            with db.transaction() as tx:
                first = tx.hot_row(xact, {"zero": 0})
                assert first is not None
                assert tx.one("SELECT pg_current_xact_id()::text AS id") == {"id": first[0]}
    finally:
        db.close()


def test_a_block_that_runs_no_statement_sends_nothing(postgres_url: str) -> None:
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    try:
        with db.transaction() as tx:
            pass
        assert not tx.opened
        with db.statements() as q:  # the connection is idle and usable
            assert q.one("SELECT 1 AS one") == {"one": 1}
    finally:
        db.close()


def test_a_lost_connection_under_a_pipelined_begin_is_storage_unavailable_and_the_pool_recovers(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    pid = HotStatement("test_pid_pipelined", "SELECT pg_backend_pid() + %(zero)s AS pid")
    try:
        with db.transaction() as tx:  # prepares it: the next block pipelines BEGIN with it
            (backend,) = tx.hot_row(pid, {"zero": 0}) or (0,)
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with caplog.at_level(logging.WARNING), pytest.raises(StorageUnavailable), db.transaction() as tx:
            tx.hot_row(pid, {"zero": 0})
        assert any(r.getMessage().startswith("storage unavailable: OperationalError") for r in caplog.records)
        with db.transaction() as tx:
            (replacement,) = tx.hot_row(pid, {"zero": 0}) or (0,)
        assert replacement not in (0, backend)
    finally:
        db.close()


def test_a_failed_first_statement_aborts_the_block_and_the_connection_stays_usable(postgres_url: str) -> None:
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    divide = HotStatement("test_divide_pipelined", "SELECT 1 / %(d)s::int AS q")
    try:
        for _ in range(2):  # the second time pipelined with BEGIN
            with pytest.raises(psycopg.errors.DivisionByZero), db.transaction() as tx:
                tx.hot_row(divide, {"d": 0})
            with db.transaction() as tx:
                assert tx.hot_row(divide, {"d": 1}) == (1,)
    finally:
        db.close()


def test_other_threads_run_while_a_pipelined_statement_waits_for_its_answer(postgres_url: str) -> None:
    """libpq's PQgetResult would wait for the answer holding the GIL, and every other thread of
    the server would stop with it. While the pipelined statement sleeps in PostgreSQL, this
    thread watches it run there (which it could not do without the GIL), then cancels it."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=60.0)
    sleep = HotStatement(
        "test_sleep", "SELECT pg_sleep(%(seconds)s::float8) AS slept, pg_backend_pid() AS pid"
    )
    try:
        with db.transaction() as tx:
            (_, backend) = tx.hot_row(sleep, {"seconds": 0}) or (None, 0)

        def sleeping() -> None:
            with db.transaction() as tx:
                tx.hot_row(sleep, {"seconds": 30})

        with psycopg.connect(postgres_url, autocommit=True) as monitor, ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(sleeping)
            give_up = time.monotonic() + 20
            while not monitor.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active' AND query LIKE %s",
                (backend, "%pg_sleep%"),
            ).fetchone():
                assert time.monotonic() < give_up, "the statement was never seen running"
                time.sleep(0.01)
            assert not outcome.done()
            monitor.execute("SELECT pg_cancel_backend(%s)", (backend,))
            error = outcome.exception(timeout=20)
        assert isinstance(error, StorageUnavailable), error
        assert isinstance(error.__cause__, psycopg.errors.QueryCanceled)
    finally:
        db.close()


# ---- hot_last: a transaction's last statement, sent with COMMIT ------------------------------

INSERT = HotStatement("test_insert_last", "INSERT INTO counter (id, n) VALUES (%(id)s, %(n)s)")


def test_a_last_statement_commits_with_the_block_and_is_never_sent_when_the_block_fails(db: Database) -> None:
    with db.transaction() as tx:
        assert tx.hot_row(BUMP, {"by": 1, "id": 1, "note": None}) == (11, 1)
        tx.hot_last(INSERT, {"id": 3, "n": 30})
    with pytest.raises(ZeroDivisionError), db.transaction() as tx:
        tx.hot_last(INSERT, {"id": 4, "n": 40})
        raise ZeroDivisionError
    with db.transaction() as tx:  # the only statement: BEGIN, it and COMMIT (PostgreSQL: one round trip)
        tx.hot_last(INSERT, {"id": 5, "n": 50})
    with db.statements() as q:
        assert q.all("SELECT id, n FROM counter ORDER BY id") == [
            {"id": 1, "n": 11},
            {"id": 2, "n": 20},
            {"id": 3, "n": 30},
            {"id": 5, "n": 50},
        ]


def test_a_failed_last_statement_fails_the_block_and_undoes_it_all(db: Database) -> None:
    """Its error (here a duplicate key) is raised as the block ends, as its own class; the block's
    earlier change is undone, its after-commit action never runs, and the connection goes on."""
    ran: list[str] = []
    for _ in range(2):  # PostgreSQL: the second time with the statement prepared (pipelined)
        with (
            pytest.raises(
                psycopg.errors.UniqueViolation if db.dialect == "postgres" else sqlite3.IntegrityError
            ) as error,
            db.transaction() as tx,
        ):
            tx.hot_row(BUMP, {"by": 100, "id": 2, "note": None})
            tx.after_commit(lambda: ran.append("published"))
            tx.hot_last(INSERT, {"id": 1, "n": 0})  # id 1 exists
        assert "counter" in str(error.value)  # the constraint named: counter_pkey, counter.id
    assert ran == []
    with db.transaction() as tx:
        assert tx.one("SELECT n FROM counter WHERE id = 2") == {"n": 20}


def test_a_statement_after_a_last_one_sends_it_first(db: Database) -> None:
    with db.transaction() as tx:
        tx.hot_last(INSERT, {"id": 6, "n": 60})
        assert tx.one("SELECT n FROM counter WHERE id = 6") == {"n": 60}
        tx.hot_last(INSERT, {"id": 7, "n": 70})
        tx.hot_last(INSERT, {"id": 8, "n": 80})  # the one before it goes now
        assert tx.hot_row(BUMP, {"by": 1, "id": 7, "note": None}) == (71, 7)
        tx.hot_last(INSERT, {"id": 9, "n": 90})
    with db.statements() as q:
        assert [row["id"] for row in q.all("SELECT id FROM counter WHERE id > 5 ORDER BY id")] == [6, 7, 8, 9]


def test_a_last_statement_outside_a_block_runs_at_once(db: Database) -> None:
    with db.statements() as q:
        q.hot_last(INSERT, {"id": 10, "n": 100})
        assert q.one("SELECT n FROM counter WHERE id = 10") == {"n": 100}


def test_a_last_statements_wrong_parameter_fails_where_it_is_called(db: Database) -> None:
    reached = False
    with pytest.raises(TypeError), db.transaction() as tx:
        tx.hot_last(INSERT, {"id": 11, "n": 1.5})
        reached = True
    assert not reached


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, bool]]:
    """Each pipeline sent, as (statement, with BEGIN, with COMMIT): the real one runs, watched."""
    sent: list[tuple[str, bool, bool]] = []
    real = hot_statements._pipelined

    def watched(conn: Any, statement: HotStatement, values: Any, begin: bool, commit: bool) -> Any:
        sent.append((statement.name, begin, commit))
        return real(conn, statement, values, begin, commit)

    monkeypatch.setattr(hot_statements, "_pipelined", watched)
    return sent


def test_begin_and_commit_go_with_prepared_statements_in_one_pipeline(
    postgres_url: str, pipelines: list[tuple[str, bool, bool]]
) -> None:
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    first = HotStatement("test_first", "SELECT %(n)s::int8 AS n")
    try:
        with db.transaction() as tx:  # not prepared yet: BEGIN, then the statement alone
            tx.hot_row(first, {"n": 1})
            tx.hot_last(first, {"n": 2})  # prepared now: with COMMIT
        assert pipelines == [("test_first", False, True)]
        pipelines.clear()
        with db.transaction() as tx:
            assert tx.hot_row(first, {"n": 3}) == (3,)
            tx.one("SELECT 1 AS one")
            tx.hot_last(first, {"n": 4})
        with db.transaction() as tx:  # the only statement: all three at once
            tx.hot_last(first, {"n": 5})
        with db.statements() as q:  # no block: nothing to pipeline
            q.hot_row(first, {"n": 6})
        assert pipelines == [
            ("test_first", True, False),
            ("test_first", False, True),
            ("test_first", True, True),
        ]
    finally:
        db.close()


def test_a_pipeline_larger_than_the_socket_takes_at_once_is_sent_whole(postgres_url: str) -> None:
    """psycopg's connections are non-blocking: libpq sends what the socket takes and keeps the
    rest until flushed. 16 MB is more than a local socket's buffers: unflushed, the server would
    never see the pipeline's end and the call would wait out its deadline."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=20.0)
    length = HotStatement("test_length", "SELECT length(%(text)s::text)::int8 AS n")
    big = "x" * (16 * 1024 * 1024)
    try:
        with db.transaction() as tx:  # prepares it
            assert tx.hot_row(length, {"text": "abc"}) == (3,)
        with db.transaction() as tx:  # BEGIN and the statement in one pipeline
            assert tx.hot_row(length, {"text": big}) == (len(big),)
    finally:
        db.close()


def test_a_pipelined_statement_past_the_storage_timeout_is_unavailable_in_time(postgres_url: str) -> None:
    """The deadline watchdog shuts the socket the pipeline waits on: UNAVAILABLE within the
    storage timeout (1 s here; the bound is generous for a loaded machine), and the pool goes on."""
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=1.0)
    sleep = HotStatement("test_sleep_deadline", "SELECT pg_sleep(%(seconds)s::float8) AS slept")
    try:
        with db.transaction() as tx:
            tx.hot_row(sleep, {"seconds": 0})
        began = time.monotonic()
        with pytest.raises(StorageUnavailable), db.transaction() as tx:
            tx.hot_row(sleep, {"seconds": 30})
        assert time.monotonic() - began < 10
        with db.transaction() as tx:  # a new connection
            assert tx.hot_row(sleep, {"seconds": 0}) == (None,)
    finally:
        db.close()


_COMMIT_COMPLETE = b"C\x00\x00\x00\x0bCOMMIT\x00"  # the server's CommandComplete for COMMIT
_UPDATE_COMPLETE = b"C\x00\x00\x00\x0dUPDATE 1\x00"  # ... for an UPDATE of one row


class _SessionEndsAfter(PostgresProxy):
    """Once armed, passes the server's answer up to `marker` (a statement's CommandComplete) and
    then, in place of the rest, the FATAL error a terminated backend sends (57P01), and closes:
    the session ends inside a pipeline's answer."""

    def __init__(self, postgres_url: str, marker: bytes, *, fatal: bool = True) -> None:
        super().__init__(postgres_url)
        self._marker = marker
        self._fatal = fatal  # else the socket just closes
        self.armed = threading.Event()

    def from_server(self, data: bytes, *, first: bool) -> tuple[bytes, bool]:
        if not (self.armed.is_set() and self._marker in data):
            return data, False
        self.armed.clear()
        fields = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
        fatal = b"E" + struct.pack("!I", len(fields) + 4) + fields
        cut = data.index(self._marker) + len(self._marker)
        return data[:cut] + (fatal if self._fatal else b""), True


@pytest.mark.parametrize("fatal", [True, False], ids=["fatal", "socket-closed"])
def test_a_block_whose_commit_was_answered_is_committed_though_the_session_ends_before_the_sync(
    postgres_url: str, caplog: pytest.LogCaptureFixture, fatal: bool
) -> None:
    """BEGIN, the last insert and COMMIT in one pipeline; the server answers COMMIT, then its
    session ends (a FATAL error, or the socket just closes) before the pipeline's end. The block
    committed: it returns as committed, its after-commit action runs, and the connection is not
    pooled (the next block gets another)."""
    proxy = _SessionEndsAfter(postgres_url, _COMMIT_COMPLETE, fatal=fatal)
    db = PostgresDatabase(proxy.url, pool_size=1, timeout=30.0)
    try:
        with db.transaction() as tx:
            tx.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        with db.transaction() as tx:  # prepares the insert on the connection
            tx.hot_last(INSERT, {"id": 1, "n": 10})
        ran: list[str] = []
        proxy.armed.set()
        with caplog.at_level(logging.WARNING), db.transaction() as tx:
            tx.hot_last(INSERT, {"id": 2, "n": 20})
            tx.after_commit(lambda: ran.append("published"))
        assert not proxy.armed.is_set(), "the session ended where the test meant it to"
        assert ran == ["published"]
        assert not any("ROLLBACK failed" in record.getMessage() for record in caplog.records)
        with db.statements() as q:  # a new connection
            assert [row["id"] for row in q.all("SELECT id FROM counter ORDER BY id")] == [1, 2]
    finally:
        db.close()
        proxy.close()


def test_a_session_that_ends_inside_a_pipeline_is_unavailable_with_the_servers_own_error(
    postgres_url: str,
) -> None:
    """BEGIN and a block's first statement in one pipeline; the server answers the statement,
    then its session ends before the pipeline's end: UNAVAILABLE, caused by the server's error
    (AdminShutdown), not by libpq refusing to leave pipeline mode; nothing committed, and the
    pool goes on with a new connection."""
    proxy = _SessionEndsAfter(postgres_url, _UPDATE_COMPLETE)
    db = PostgresDatabase(proxy.url, pool_size=1, timeout=30.0)
    try:
        with db.transaction() as tx:
            tx.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            tx.execute("INSERT INTO counter VALUES (1, 10)")
        with db.transaction() as tx:  # prepares the statement on the connection
            assert tx.hot_row(BUMP, {"by": 1, "id": 1, "note": None}) == (11, 1)
        proxy.armed.set()
        with pytest.raises(StorageUnavailable) as raised, db.transaction() as tx:
            tx.hot_row(BUMP, {"by": 1, "id": 1, "note": None})
        assert isinstance(raised.value.__cause__, psycopg.errors.AdminShutdown), repr(raised.value.__cause__)
        with db.transaction() as tx:
            assert tx.hot_row(BUMP, {"by": 0, "id": 1, "note": None}) == (11, 1)
    finally:
        db.close()
        proxy.close()


def test_a_last_statement_sends_its_parameters_as_they_were_when_it_was_given(db: Database) -> None:
    params: dict[str, object] = {"id": 12, "n": 120}
    with db.transaction() as tx:
        tx.hot_last(INSERT, params)
        params["n"] = 999  # the caller's dict changes afterwards: SQLite ran it already
    with db.statements() as q:
        assert q.one("SELECT n FROM counter WHERE id = 12") == {"n": 120}


def test_a_last_statements_rows_are_not_read_after_the_commit(postgres_url: str) -> None:
    """A hot_last statement's rows are nobody's: none is read after COMMIT, where a value the
    reader can't take (a timestamp) would fail a block that committed."""
    stamped = HotStatement(
        "test_stamped", "INSERT INTO counter (id, n) VALUES (%(id)s, %(n)s) RETURNING now()"
    )
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    try:
        with db.transaction() as tx:
            tx.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        ran: list[str] = []
        for row_id in (1, 2):  # the second time prepared: BEGIN, it and COMMIT pipelined
            with db.transaction() as tx:
                tx.hot_last(stamped, {"id": row_id, "n": 0})
                tx.after_commit(lambda: ran.append("published"))
        assert ran == ["published", "published"]
    finally:
        db.close()
