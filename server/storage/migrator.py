"""Schema migrations: the numbered files of migrations/, applied in order, once, each recorded
with the time it was applied. The caller (database.py) provides the transactions and the lock."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twofactor_server.storage.database import Database, Transaction

log = logging.getLogger(__name__)

_DIALECT_TYPES = {
    "postgres": {"BLOB": "BYTEA", "SERIAL_PK": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
    "sqlite": {"BLOB": "BLOB", "SERIAL_PK": "INTEGER PRIMARY KEY AUTOINCREMENT"},
}


DIALECTS = tuple(_DIALECT_TYPES)


def migrations(dialect: str = "postgres") -> list[tuple[str, str]]:
    """(version, SQL) of every migration for `dialect`, in order. Most are one file for both
    backends (NNNN_name.sql); one whose SQL can't be shared (triggers) is a file per backend,
    NNNN_name.postgres.sql and NNNN_name.sqlite.sql, under the one version NNNN_name."""
    assert dialect in DIALECTS
    folder = resources.files("twofactor_server.storage") / "migrations"
    found: dict[str, str] = {}
    for file in folder.iterdir():
        if not file.name.endswith(".sql"):
            continue
        version, _, only = file.name.removesuffix(".sql").partition(".")
        if only in ("", dialect):
            found[version] = file.read_text()
    return sorted(found.items())


def apply_migrations(
    transaction: Callable[[], AbstractContextManager[Transaction]], dialect: str
) -> list[str]:
    """Apply the migrations not yet recorded, in order, each in a transaction of its own
    (`transaction()` opens one) with its record and the time it was applied.

    One transaction each, not one for all: a migration's locks (an ALTER TABLE's exclusive
    one) then last for that migration only, not through every later one's index build or
    backfill; and one that fails leaves the earlier ones applied. Each checks the record again
    in its own transaction, so servers starting together (under the caller's lock, or SQLite's
    write lock) apply each file once. The SQL is never formatted and never split on ";": the
    backend's own parser finds the statements (PostgreSQL takes the whole file; SQLite's
    complete_statement()).
    """
    with transaction() as tx:
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at BIGINT)"
        )
    applied = []
    for version, text in migrations(dialect):
        with transaction() as tx:
            if tx.one("SELECT 1 AS found FROM schema_migrations WHERE version = %(v)s", {"v": version}):
                continue
            sql = with_dialect_types(text, dialect)
            if dialect == "postgres":
                tx.execute(sql)  # no parameters: psycopg sends the whole script, statements and all
            else:
                for statement in sqlite_statements(sql):
                    tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (%(v)s, %(at)s)",
                {"v": version, "at": int(time.time() * 1000)},
            )
        applied.append(version)
        log.info("applied migration %s", version)
    return applied


def pending_migrations(db: Database) -> list[str]:
    """The migrations this release has that the database has not applied (all of them on an empty one)."""
    with db.transaction() as tx:
        if tx.dialect == "postgres":
            exists = tx.one("SELECT to_regclass('schema_migrations') IS NOT NULL AS found")
        else:
            exists = tx.one(
                "SELECT COUNT(*) > 0 AS found FROM sqlite_master WHERE type = 'table' "
                "AND name = 'schema_migrations'"
            )
        done = set()
        if exists is not None and exists["found"]:
            done = {row["version"] for row in tx.all("SELECT version FROM schema_migrations")}
    return [version for version, _ in migrations(db.dialect) if version not in done]


def with_dialect_types(text: str, dialect: str) -> str:
    """Replace the literal placeholders {BLOB} and {SERIAL_PK} with the backend's types; nothing else
    in the text is interpreted (no str.format: braces and percent signs stay as written)."""
    for placeholder, sql_type in _DIALECT_TYPES[dialect].items():
        text = text.replace("{" + placeholder + "}", sql_type)
    return text


def sqlite_statements(sql: str) -> list[str]:
    """The statements of a script, cut where SQLite's own tokenizer says one is complete (so a ";"
    inside a string or a comment does not cut), for sqlite3, which runs one statement per call."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and re.sub(r"--[^\n]*", "", current).strip():
        raise ValueError(f"incomplete SQL statement at the end of a migration: {current.strip()[:80]!r}")
    return statements
