"""Connections and transactions for the two backends, and schema migrations.

SQL is written once, with psycopg's named placeholders `%(name)s`; the SQLite
backend rewrites them to `:name`. Rows come back as dicts, which only the
storage package reads (store.py turns them into records).

This module owns the drivers' errors: the few that a retry can fix (connection
lost or refused, pool or lock timeouts, serialization failures, I/O errors)
become the domain's StorageUnavailable; anything else is a bug and surfaces
as it is.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from time import monotonic
from typing import Any, NoReturn, Protocol

import psycopg
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.storage.deadlines import Watch, Watchdog
from twofactor_server.storage.migrator import apply_migrations
from twofactor_server.storage.migrator import migrations as migrations  # re-exported

log = logging.getLogger(__name__)

Row = dict[str, Any]
Params = Mapping[str, Any]
_MIGRATION_LOCK_ID = 0x2FAC7  # pg_advisory_lock key shared by every twofactor server
_START_UP_SECONDS = 10.0  # how long start-up waits for its first connection


_INT8_OID = 20
_NO_SUCH_PREPARED_STATEMENT = b"26000"  # invalid_sql_statement_name


@dataclass(frozen=True)
class HotStatement:
    """A statement on the hottest path (the accepted Verify), run without psycopg's cursor:
    prepared by name once per connection, its parameters sent as text, its one row read as
    integers. Through Cursor.execute a statement costs the server ~130,000 instructions of
    Python (query conversion, parameter dumping, the row maker) against ~20,000 this way
    (docs/benchmarks.md). Written with the same `%(name)s` placeholders as every statement."""

    name: str  # the prepared statement's name on each connection; unique per statement
    sql: str
    param_names: tuple[str, ...] = field(init=False)
    postgres_sql: bytes = field(init=False)

    def __post_init__(self) -> None:
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            if match[1] not in names:
                names.append(match[1])
            return f"${names.index(match[1]) + 1}"

        object.__setattr__(self, "postgres_sql", re.sub(r"%\((\w+)\)s", positional, self.sql).encode())
        object.__setattr__(self, "param_names", tuple(names))


class Transaction(Protocol):
    dialect: str  # "postgres" | "sqlite"
    # Appended to a SELECT to hold its rows until commit; empty where the
    # whole transaction is already exclusive (SQLite).
    row_lock: str

    def execute(self, sql: str, params: Params | None = None) -> int:
        """Run a statement; return the number of rows it touched."""

    def one(self, sql: str, params: Params | None = None) -> Row | None: ...

    def all(self, sql: str, params: Params | None = None) -> list[Row]: ...

    def hot_row(self, statement: HotStatement, params: Params) -> tuple[int, ...] | None:
        """Run a HotStatement (parameters: str, int or None); its first row's values, integers
        and never NULL, or None when it returns no row."""

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the transaction has committed and its connection is back in the
        pool (never on rollback): work that must not hold a connection, like publishing."""


class Database(Protocol):
    dialect: str  # "postgres" | "sqlite"
    # Set whenever a call finds the storage unavailable, so the health probe looks at once.
    unavailable: threading.Event

    def transaction(self) -> Any:
        """A context manager yielding a Transaction; commits on success, rolls back on error."""

    def statements(self) -> Any:
        """A context manager yielding a Transaction whose statements each commit on their own:
        no BEGIN, no COMMIT, for hot paths whose single statements are atomic by themselves."""

    def ping(self) -> None:
        """One round trip to the database within the storage timeout; StorageUnavailable if not."""

    def migrate(self) -> list[str]: ...

    def close(self) -> None: ...


class _Connection(psycopg.Connection[Row]):
    """A pooled connection that keeps one cursor for all the statements run on it: a new
    cursor per statement (what Connection.execute makes) costs about 20 µs of Python."""

    statement_cursor: psycopg.Cursor[Row] | None = None
    hot_prepared: frozenset[str] = frozenset()  # the HotStatements prepared on this connection


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
        self._pool: ConnectionPool[_Connection] = ConnectionPool(
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
        self._probe: psycopg.Connection[Row] | None = None
        self._probe_lock = threading.Lock()
        self._probe_failed = False

    @contextmanager
    def transaction(self) -> Iterator[_PostgresTransaction]:
        with self._connection() as conn:
            try:
                with conn.transaction():  # COMMIT, or ROLLBACK on error
                    tx = _PostgresTransaction(conn)
                    yield tx
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
        deadline = monotonic() + self._timeout
        try:
            conn = self._pool.getconn(timeout=self._timeout)
        except PoolTimeout as error:
            self._unavailable(error)
        try:
            return conn, self._watchdog.watch(conn.pgconn.socket, deadline)
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
        """SELECT 1 on a connection of the probe's own (a busy pool is not an unreachable
        database), within the storage timeout. Once the database answers again after a
        failure, the pool's connections, likely broken by the outage, are replaced."""
        with self._probe_lock:
            deadline = monotonic() + self._timeout
            try:
                if self._probe is None:
                    self._probe = psycopg.connect(
                        self._url,
                        autocommit=True,
                        row_factory=dict_row,
                        connect_timeout=self._connect_timeout,
                    )
                watch = self._watchdog.watch(self._probe.pgconn.socket, deadline)
                try:
                    self._probe.execute("SELECT 1")
                finally:
                    if self._watchdog.release(watch):
                        self._probe.close()
                        self._probe = None
            except psycopg.OperationalError as error:
                if self._probe is not None:
                    self._probe.close()
                    self._probe = None
                self._probe_failed = True
                raise StorageUnavailable() from error
            if self._probe_failed:
                self._probe_failed = False
                self._pool.drain()

    def migrate(self) -> list[str]:
        # At start-up, and possibly behind another server's migration: no statement deadline.
        conn = self._start_up_connection()
        try:
            # Two servers starting at once: the second waits, then finds nothing to do.
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
            try:
                with conn.transaction():
                    return apply_migrations(_PostgresTransaction(conn), self.dialect)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
        finally:
            self._pool.putconn(conn)

    def _start_up_connection(self) -> _Connection:
        """A connection, asking again for _START_UP_SECONDS: the database may be starting too."""
        give_up = monotonic() + _START_UP_SECONDS
        while True:
            try:
                return self._pool.getconn(timeout=self._timeout)
            except PoolTimeout:
                if monotonic() >= give_up:
                    raise

    def close(self) -> None:
        self._pool.close()
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None
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
        self.unavailable.set()
        _unavailable(error)


class _Statements:
    """statements() of PostgresDatabase, a plain context manager: every Verify pays for it, and
    two generator-based ones (contextlib) cost more Python than the statement's own libpq call."""

    __slots__ = ("_conn", "_db", "_tx", "_watch")

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    def __enter__(self) -> _PostgresTransaction:
        self._conn, self._watch = self._db._checkout()
        self._tx = _PostgresTransaction(self._conn)
        return self._tx

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        self._db._checkin(self._conn, self._watch)
        if isinstance(error, psycopg.OperationalError):
            self._db._unavailable(error)
        if error is None:
            self._tx.run_committed_actions()


class _CommitActions:
    """What both backends' transactions keep for after the commit (Transaction.after_commit)."""

    _committed_actions: tuple[Callable[[], None], ...] = ()  # few, and mostly none

    def after_commit(self, action: Callable[[], None]) -> None:
        self._committed_actions = (*self._committed_actions, action)

    def run_committed_actions(self) -> None:
        """Called by the Database once the commit is done and the connection given back."""
        for action in self._committed_actions:
            action()


class _PostgresTransaction(_CommitActions):
    dialect = "postgres"
    row_lock = " FOR UPDATE"

    def __init__(self, conn: _Connection) -> None:
        cursor = conn.statement_cursor
        if cursor is None:
            cursor = conn.statement_cursor = conn.cursor()
        self._cursor = cursor
        self._conn = conn

    def execute(self, sql: str, params: Params | None = None) -> int:
        return self._cursor.execute(sql, params).rowcount

    def one(self, sql: str, params: Params | None = None) -> Row | None:
        return self._cursor.execute(sql, params).fetchone()

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        return self._cursor.execute(sql, params).fetchall()

    def hot_row(self, statement: HotStatement, params: Params) -> tuple[int, ...] | None:
        conn = self._conn
        pgconn = conn.pgconn
        values = [_as_text(params[name]) for name in statement.param_names]
        if pgconn.transaction_status != TransactionStatus.IDLE:
            # Inside BEGIN, through the cursor: a failed statement can't be sent again there.
            row = self.one(statement.sql, params)
            return None if row is None else tuple(int(value) for value in row.values())
        # libpq's blocking calls release the GIL and wait on the socket, so the deadline
        # watchdog's shutdown wakes them as it wakes psycopg's own waits.
        name = statement.name.encode()
        if statement.name in conn.hot_prepared:
            result = pgconn.exec_prepared(name, values)  # type: ignore[arg-type]  # None: NULL
            if result.error_field(DiagnosticField.SQLSTATE) == _NO_SUCH_PREPARED_STATEMENT:
                # psycopg's upkeep of its own prepared statements sends DEALLOCATE ALL after a
                # ROLLBACK or a DROP on this connection, which drops ours too: prepare it again.
                conn.hot_prepared = conn.hot_prepared - {statement.name}
        if statement.name not in conn.hot_prepared:
            # ints typed int8 (an INSERT ... SELECT can't infer them); text left for the server to infer
            types = [_INT8_OID if isinstance(params[key], int) else 0 for key in statement.param_names]
            _check(conn, pgconn.prepare(name, statement.postgres_sql, types), ExecStatus.COMMAND_OK)
            conn.hot_prepared = conn.hot_prepared | {statement.name}
            result = pgconn.exec_prepared(name, values)  # type: ignore[arg-type]
        _check(conn, result, ExecStatus.TUPLES_OK)
        if result.ntuples == 0:
            return None
        return tuple(int(result.get_value(0, column)) for column in range(result.nfields))  # type: ignore[arg-type]


def _as_text(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"a HotStatement parameter must be str, int or None, not {type(value).__name__}")


def _check(conn: _Connection, result: psycopg.pq.abc.PGresult, expected: ExecStatus) -> None:
    """Raise what psycopg's cursor would for a failed libpq call: OperationalError for a lost
    connection, the SQLSTATE's class (DeadlockDetected, ...) for an error of the statement."""
    if result.status == expected:
        return
    if conn.pgconn.status == ConnStatus.BAD:
        message = conn.pgconn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(message or "connection lost")
    raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)


class SqliteDatabase:
    """The embedded default: one connection, one transaction at a time. Another process holding
    the file's write lock is waited for at most `timeout` seconds (SQLite's busy timeout)."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, timeout: float = 2.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.unavailable = threading.Event()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = _dict_factory
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute(f"PRAGMA busy_timeout={max(1, round(timeout * 1000))}")
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[_SqliteTransaction]:
        with self._lock, _sqlite_errors(self.unavailable):
            # IMMEDIATE takes the write lock up front, so a read-then-write can't interleave.
            self._conn.execute("BEGIN IMMEDIATE")
            tx = _SqliteTransaction(self._conn)
            try:
                yield tx
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        tx.run_committed_actions()

    @contextmanager
    def statements(self) -> Iterator[_SqliteTransaction]:
        with (
            self._lock,
            _sqlite_errors(self.unavailable),
        ):  # the connection is in autocommit mode outside BEGIN
            tx = _SqliteTransaction(self._conn)
            yield tx
        tx.run_committed_actions()

    def ping(self) -> None:
        with self.statements() as q:
            q.one("SELECT 1")

    def migrate(self) -> list[str]:
        with self.transaction() as tx:
            return apply_migrations(tx, self.dialect)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _SqliteTransaction(_CommitActions):
    dialect = "sqlite"
    row_lock = ""  # BEGIN IMMEDIATE and the connection lock already serialize transactions

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params | None = None) -> int:
        return self._conn.execute(_to_sqlite(sql), params or {}).rowcount

    def one(self, sql: str, params: Params | None = None) -> Row | None:
        row: Row | None = self._conn.execute(_to_sqlite(sql), params or {}).fetchone()
        return row

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        return self._conn.execute(_to_sqlite(sql), params or {}).fetchall()

    def hot_row(self, statement: HotStatement, params: Params) -> tuple[int, ...] | None:
        for name in statement.param_names:
            _as_text(params[name])  # the same parameters as on PostgreSQL, or the same TypeError
        row = self.one(statement.sql, params)
        return None if row is None else tuple(int(value) for value in row.values())


# SQLite's primary result codes that a retry can fix: busy, locked, I/O error, disk
# full, can't open the file, lock protocol error. "no such table" and syntax
# errors share sqlite3.OperationalError with these, but are bugs.
_SQLITE_RETRYABLE = {5, 6, 10, 13, 14, 15}


@contextmanager
def _sqlite_errors(unavailable: threading.Event) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as error:
        if getattr(error, "sqlite_errorcode", 0) & 0xFF in _SQLITE_RETRYABLE:
            unavailable.set()
            _unavailable(error)
        raise


def _unavailable(error: Exception) -> NoReturn:
    """Log one line saying what failed, and raise the domain's retryable storage error."""
    log.warning("storage unavailable: %s: %s", type(error).__name__, " ".join(str(error).split())[:300])
    raise StorageUnavailable() from error


def open_database(url: str, *, data_dir: Path, pool_size: int = 10, timeout: float = 2.0) -> Database:
    """PostgreSQL for a postgres:// URL; the SQLite file under data_dir when url is empty.
    `timeout` bounds each unit of work (TWOFACTOR_STORAGE_TIMEOUT_SECONDS)."""
    if not url:
        return SqliteDatabase(data_dir / "twofactor.sqlite3", timeout=timeout)
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresDatabase(url, pool_size=pool_size, timeout=timeout)
    raise ValueError("TWOFACTOR_DATABASE_URL must be a postgresql:// URL (or empty for the embedded SQLite)")


@lru_cache(maxsize=512)
def _to_sqlite(sql: str) -> str:
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def _dict_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}
