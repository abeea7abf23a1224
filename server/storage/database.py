"""Connections and transactions: the PostgreSQL backend, and open_database, which picks it or the
embedded SQLite (sqlite.py) by the configured URL.

SQL is written once, with psycopg's named placeholders `%(name)s`. Rows come back as dicts,
which only the storage package reads (store.py turns them into records).

This module owns the drivers' errors: the few that a retry can fix (connection lost or refused,
pool or lock timeouts, serialization failures, I/O errors) become the domain's StorageUnavailable;
anything else is a bug and surfaces as it is.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import monotonic
from typing import Any, NoReturn

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import PoolTimeout

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.storage.deadlines import Watch, Watchdog, deadline_while_failing, socket_inode
from twofactor_server.storage.hot_statements import (
    HotStatement,
    begin_block,
    commit_block,
    run_prepared,
    run_prepared_rows,
)
from twofactor_server.storage.migrator import apply_migrations
from twofactor_server.storage.migrator import migrations as migrations  # re-exported
from twofactor_server.storage.pool import Pool
from twofactor_server.storage.probe import ProbeConnection
from twofactor_server.storage.refusals import (
    log_no_answer_at_start,
    migration_refused,
    raise_if_refused,
    require_readable_url,
)
from twofactor_server.storage.sqlite import SqliteDatabase as SqliteDatabase  # re-exported
from twofactor_server.storage.units import CommitActions, Params, Row, raise_unavailable
from twofactor_server.storage.units import Database as Database  # re-exported
from twofactor_server.storage.units import Transaction as Transaction  # re-exported

log = logging.getLogger(__name__)

_MIGRATION_LOCK_ID = 0x2FAC7  # pg_advisory_lock key shared by every twofactor server
_START_UP_SECONDS = 10.0  # how long start-up waits for its first connection


class _Connection(psycopg.Connection[Row]):
    """A pooled connection that keeps one cursor for all the statements run on it: a new
    cursor per statement (what Connection.execute makes) costs about 20 µs of Python."""

    statement_cursor: psycopg.Cursor[Row] | None = None
    hot_prepared: frozenset[str] = frozenset()  # the HotStatements prepared on this connection
    # The deadline watch of its socket, kept for the connection's life and re-armed at each checkout:
    # the socket's inode is read once, and again only if libpq ever moved it to another descriptor.
    deadline_watch: Watch | None = None


class PostgresDatabase:
    """A pool of connections, each unit of work (the wait for a connection included) bounded by
    `timeout` seconds on the client's side: a connection that misses it is abandoned, never reused."""

    dialect = "postgres"

    def __init__(self, url: str, *, pool_size: int = 10, timeout: float = 2.0) -> None:
        self._url = url
        self._timeout = timeout
        # libpq counts connect_timeout in whole seconds, 2 at least.
        self._connect_timeout = max(2, math.ceil(timeout))
        self.unavailable = threading.Event()
        self._watchdog = Watchdog("twofactor-db")
        self._pool: Pool[_Connection] = Pool(
            url,
            connection_class=_Connection,
            min_size=1,
            max_size=pool_size,
            # Autocommit: transaction() opens an explicit BEGIN/COMMIT, statements() needs none.
            kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": self._connect_timeout},
            timeout=timeout,
            # A failed background connect gives up soon; the next request that finds no
            # connection starts another, so the pool comes back as soon as the database does.
            reconnect_timeout=timeout,
            open=True,
            name="twofactor",
        )
        self._probe = ProbeConnection(
            url, connect_timeout=self._connect_timeout, timeout=timeout, watchdog=self._watchdog
        )
        self._probe_lock = threading.Lock()
        # failing: a call or ping found it unavailable, no ping answered since: budgets count from arrival;
        # silent: a ping waited out its deadline (frozen, not refusing): calls are answered at once.
        self._probe_failed = self._failing = self._silent = False

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[_PostgresTransaction]:
        with self._connection() as conn:
            try:
                # BEGIN goes with the block's first statement (_PostgresTransaction.opened)
                tx = _PostgresTransaction(conn, begin=True)
                try:
                    if snapshot:  # every statement reads one moment (READ COMMITTED: each its own)
                        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    yield tx
                    tx._end_block()
                except BaseException:
                    if tx.opened:
                        _roll_back(conn)
                    raise
            except psycopg.OperationalError as error:
                self._unavailable(error)
        tx.run_committed_actions()

    def statements(self) -> _Statements:
        return _Statements(self)

    @contextmanager
    def _connection(self) -> Iterator[_Connection]:
        conn, watch = self._checkout()
        try:
            yield conn
        finally:
            self._checkin(conn, watch)

    def _checkout(self) -> tuple[_Connection, Watch]:
        """A pooled connection, watched until its deadline: the unit of work's whole budget,
        the wait for the connection included."""
        now = monotonic()
        deadline = now + self._timeout
        if self._failing:  # or StorageUnavailable at once, with no log line: health's says it for all
            deadline = deadline_while_failing(now, self._timeout, self._silent)
        try:
            conn = self._pool.getconn(timeout=deadline - now)
        except PoolTimeout as error:
            self._unavailable(error)
        try:
            fd = conn.pgconn.socket
            watch = conn.deadline_watch
            if watch is None or watch.fd != fd:
                watch = Watch(fd, deadline, socket_inode(fd))
                conn.deadline_watch = watch if watch.inode != -1 else None
            return conn, self._watchdog.rearm(watch, deadline)
        except psycopg.OperationalError as error:  # lost while idle in the pool
            conn.close()
            self._pool.putconn(conn)
            self._unavailable(error)

    def _checkin(self, conn: _Connection, watch: Watch) -> None:
        missed = self._watchdog.release(watch)
        if missed or conn.pgconn.transaction_status != TransactionStatus.IDLE:
            # Past its deadline its socket is shut down; mid-transaction its state is
            # unknown. Either way it is closed, and the pool replaces it.
            conn.close()
        self._pool.putconn(conn)

    def ping(self) -> None:
        """SELECT 1 on the probe's own connection (probe.py), within the storage timeout. Once
        the database answers again after a failure, or after its kept connection was found dead,
        the pool's connections, likely broken too, are replaced."""
        with self._probe_lock:
            deadline = monotonic() + self._timeout
            try:
                lost = self._probe.select_one(deadline)
            except psycopg.OperationalError as error:
                # Not silent when fast (refused, say): calls go on trying for themselves.
                self._silent = self._probe.timed_out
                self._probe_failed = self._failing = True
                raise StorageUnavailable() from error
            if self._probe_failed or lost:
                self._pool.drain()  # before calls come back to the pool's broken connections
                self._probe_failed = False
            self._failing = self._silent = False

    def migrate(self) -> list[str]:
        # At start-up, and possibly behind another server's migration: no statement deadline.
        conn = self._start_up_connection()
        try:
            # Two servers starting at once: the second waits, then finds nothing to do.
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
            try:
                return apply_migrations(lambda: _migration_transaction(conn), self.dialect)
            except psycopg.errors.InsufficientPrivilege as error:
                raise migration_refused(self._url, error) from None
            finally:
                _deallocate_all(conn)
                conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
        finally:
            self._pool.putconn(conn)

    def _start_up_connection(self) -> _Connection:
        """A connection, asking again for _START_UP_SECONDS: the database may be starting too."""
        give_up = monotonic() + _START_UP_SECONDS
        while True:
            try:
                return self._pool.getconn(timeout=self._timeout)
            except PoolTimeout as error:
                raise_if_refused(self._url, self._timeout)  # a refusal waiting can't mend: exit 2
                if monotonic() >= give_up:
                    log_no_answer_at_start(self._url, f"within {_START_UP_SECONDS:.0f} s ")
                    raise StorageUnavailable() from error

    def close(self) -> None:
        self._pool.close()
        with self._probe_lock:
            self._probe.close()
        self._watchdog.close()

    def _unavailable(self, error: Exception) -> NoReturn:
        if isinstance(error, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)):
            # A deadlock or serialization failure: the database is up (no probe needed), and
            # the caller may retry; but twofactor orders its locks so this should not happen.
            log.error(
                "storage conflict, answered UNAVAILABLE (retryable): %s: %s; this is a bug, report it",
                type(error).__name__,
                " ".join(str(error).split())[:300],
            )
            raise StorageUnavailable() from error
        self._failing = True
        self.unavailable.set()
        raise_unavailable(error)


def _roll_back(conn: _Connection) -> None:
    """ROLLBACK after a failed unit of work, through libpq. psycopg never sees it, so it doesn't
    follow it with DEALLOCATE ALL (its rule for a ROLLBACK, in case the rollback undid an object
    a prepared statement uses; the service creates none outside migrations): its prepared
    statements and ours stay. The unit of work's own error is the one raised: if the ROLLBACK
    fails, or the connection is lost, the connection is left out of IDLE and _checkin closes it."""
    if conn.pgconn.status != ConnStatus.OK:
        return
    try:
        conn.pgconn.exec_(b"ROLLBACK")
    except psycopg.Error as error:
        log.warning("ROLLBACK failed (%s); the connection is closed", " ".join(str(error).split())[:200])


@contextmanager
def _migration_transaction(conn: _Connection) -> Iterator[_PostgresTransaction]:
    with conn.transaction():  # psycopg's own: a migration is DDL, run once
        yield _PostgresTransaction(conn)


def _deallocate_all(conn: _Connection) -> None:
    """After migrations: psycopg follows a DROP, an ALTER or a ROLLBACK with DEALLOCATE ALL, and
    our prepared statements go with it; sent through psycopg, both records agree."""
    conn.execute("DEALLOCATE ALL")
    conn.hot_prepared = frozenset()


class _Statements:
    """statements(), a plain context manager: two of contextlib's cost more than a Verify's libpq call."""

    __slots__ = ("_conn", "_db", "_tx", "_watch")

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def __enter__(self) -> _PostgresTransaction:
        self._conn, self._watch = self._db._checkout()
        try:
            self._tx = _PostgresTransaction(self._conn)  # its first cursor checks the connection
        except BaseException as error:  # __exit__ won't run: give the connection and its watch back
            self._db._checkin(self._conn, self._watch)
            if isinstance(error, psycopg.OperationalError):
                self._db._unavailable(error)
            raise
        return self._tx

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        self._db._checkin(self._conn, self._watch)
        if isinstance(error, psycopg.OperationalError):
            self._db._unavailable(error)
        if error is None:
            self._tx.run_committed_actions()


class _PostgresTransaction(CommitActions):
    dialect = "postgres"
    row_lock = " FOR UPDATE"
    # Set in transaction()'s block only; statements() runs each statement at once, and its
    # calls (the accepted Verify's) pay for no more than reading these two class attributes.
    _begin_pending = False  # BEGIN is yet to be sent, with the block's first statement
    _last: tuple[HotStatement, Params] | None = None  # hot_last's statement, not sent yet
    opened = False  # BEGIN is sent, or goes with the statement being sent: COMMIT or ROLLBACK ends it

    def __init__(self, conn: _Connection, *, begin: bool = False) -> None:
        """`begin`: the statements run in a transaction block, opened by BEGIN with the first of
        them: a HotStatement takes BEGIN along in its own round trip (run_prepared)."""
        cursor = conn.statement_cursor
        if cursor is None:
            cursor = conn.statement_cursor = conn.cursor()
        self._cursor = cursor
        self._conn = conn
        if begin:
            self._begin_pending = True

    def _before_statement(self) -> bool:
        """Whether this statement takes BEGIN along; a hot_last statement waiting to go goes first."""
        if self._last is not None:
            statement, params = self._last
            self._last = None
            self.hot_row(statement, params)
        begin = self._begin_pending
        if begin:
            self._begin_pending, self.opened = False, True
        return begin

    def execute(self, sql: str, params: Params | None = None) -> int:
        if (self._begin_pending or self._last is not None) and self._before_statement():
            begin_block(self._conn)
        return self._cursor.execute(sql, params).rowcount

    def one(self, sql: str, params: Params | None = None) -> Row | None:
        if (self._begin_pending or self._last is not None) and self._before_statement():
            begin_block(self._conn)
        return self._cursor.execute(sql, params).fetchone()

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        if (self._begin_pending or self._last is not None) and self._before_statement():
            begin_block(self._conn)
        return self._cursor.execute(sql, params).fetchall()

    def hot_row(self, statement: HotStatement, params: Params) -> tuple[Any, ...] | None:
        begin = (self._begin_pending or self._last is not None) and self._before_statement()
        try:
            return run_prepared(self._conn, statement, params, begin=begin)
        except _RECORD_WAS_WRONG as error:
            _record_was_wrong(statement, error)

    def hot_rows(self, statement: HotStatement, params: Params) -> list[tuple[Any, ...]]:
        begin = (self._begin_pending or self._last is not None) and self._before_statement()
        try:
            return run_prepared_rows(self._conn, statement, params, begin=begin)
        except _RECORD_WAS_WRONG as error:
            _record_was_wrong(statement, error)

    def hot_last(self, statement: HotStatement, params: Params) -> None:
        if not self._begin_pending and not self.opened:  # statements(): each statement commits on its own
            self.hot_row(statement, params)
            return
        if self._last is not None:
            self._before_statement()  # the earlier one goes now
        statement.wire_values(params)  # a parameter of the wrong type fails here, not at COMMIT
        self._last = (statement, dict(params))  # as it is now: sent later, as SQLite runs it now

    def _end_block(self) -> None:
        """transaction()'s COMMIT, with the hot_last statement when one waits (and BEGIN too when
        that is the block's only statement), in one round trip; nothing when no statement ran.
        Not part of Transaction: a unit of work never ends its own block."""
        if self._last is not None:
            statement, params = self._last
            self._last = None
            begin = self._begin_pending
            self._begin_pending, self.opened = False, True
            try:
                run_prepared(self._conn, statement, params, begin=begin, commit=True)
            except _RECORD_WAS_WRONG as error:
                _record_was_wrong(statement, error)
        elif self.opened:
            commit_block(self._conn)


_RECORD_WAS_WRONG = (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)


def _record_was_wrong(statement: HotStatement, error: Exception) -> NoReturn:
    """Inside a transaction, the connection's record of its prepared statements was wrong
    (run_prepared): it is right again, so a retry succeeds."""
    log.error(
        "storage: prepared statement %s was missing or already there inside a transaction "
        "(a DEALLOCATE or DISCARD that twofactor did not send, on a pooled connection); "
        "answered UNAVAILABLE (retryable)",
        statement.name,
    )
    raise StorageUnavailable() from error


def sqlite_path(data_dir: Path) -> Path:
    """The embedded default's database file."""
    return data_dir / "twofactor.sqlite3"


def open_database(url: str, *, data_dir: Path, pool_size: int = 10, timeout: float = 2.0) -> Database:
    """PostgreSQL for a postgres:// URL; the SQLite file under data_dir when url is empty.
    `timeout` bounds each unit of work (TWOFACTOR_STORAGE_TIMEOUT_SECONDS)."""
    if not url:
        return SqliteDatabase(sqlite_path(data_dir), timeout=timeout)
    if url.startswith(("postgres://", "postgresql://")):
        require_readable_url(url)
        return PostgresDatabase(url, pool_size=pool_size, timeout=timeout)
    raise ValueError("TWOFACTOR_DATABASE_URL must be a postgresql:// URL (or empty for the embedded SQLite)")
