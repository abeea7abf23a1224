"""The embedded default backend: SQLite, one connection, one transaction at a time.

SQL is written once, with psycopg's named placeholders `%(name)s`; this backend rewrites them to
`:name`."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from twofactor_server.storage.hot_statements import HotStatement, run_as_query, run_as_query_rows
from twofactor_server.storage.migrator import apply_migrations
from twofactor_server.storage.units import CommitActions, Params, Row, raise_unavailable


class SqliteDatabase:
    """The embedded default: one connection, one transaction at a time. Another process holding
    the file's write lock is waited for at most `timeout` seconds (SQLite's busy timeout)."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, timeout: float = 2.0) -> None:
        # The file holds every user's contacts and the audit trail: its owner's alone, as the
        # development keys beside it (SQLite gives its -wal and -shm files the file's mode).
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # an existing file is left as it is
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        self.unavailable = threading.Event()
        self._conn = sqlite3.connect(path, timeout=timeout, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = _dict_factory
        with _sqlite_errors(self.unavailable):
            _make_wal(self._conn, timeout)
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self, *, snapshot: bool = False) -> Iterator[_SqliteTransaction]:
        with self._lock, _sqlite_errors(self.unavailable):
            # IMMEDIATE takes the write lock up front, so a read-then-write can't interleave
            # (and every transaction, `snapshot` or not, reads one moment).
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
        return apply_migrations(self.transaction, self.dialect)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _SqliteTransaction(CommitActions):
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

    def hot_row(self, statement: HotStatement, params: Params) -> tuple[Any, ...] | None:
        return run_as_query(self.one, statement, params)

    def hot_rows(self, statement: HotStatement, params: Params) -> list[tuple[Any, ...]]:
        return run_as_query_rows(self.all, statement, params)

    def hot_last(self, statement: HotStatement, params: Params) -> None:
        run_as_query(self.one, statement, params)  # no round trip to save: run now


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
            raise_unavailable(error)
        raise


_SQLITE_BUSY = 5


def _make_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch a file to WAL, waiting up to `timeout` for another process making the same switch:
    SQLite answers that BUSY at once, without its busy handler (several processes starting
    together on a new file)."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", 0) & 0xFF != _SQLITE_BUSY or time.monotonic() > give_up:
                raise
            time.sleep(0.01)


@lru_cache(maxsize=512)
def _to_sqlite(sql: str) -> str:
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def _dict_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}
