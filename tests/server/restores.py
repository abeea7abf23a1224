"""Another environment's database, and restoring it into the one a server is running on, for the
tests of what a server does with values another key sealed under its version: the one way they
reach a server whose start-up check recorded, or compared, its key's fingerprint.

SQLite: the backup API, as sqlite3's `.restore`. PostgreSQL (one schema each): every table's
rows replaced in one transaction with triggers off, as pg_restore's data section loads them."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from tests.conftest import POSTGRES_ADMIN_URL
from twofactor_server.settings import Settings
from twofactor_server.storage.database import sqlite_path


@contextmanager
def other_environment(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """`settings` pointed at a database of its own, on the same backend."""
    if not settings.database_url:
        yield replace(settings, data_dir=tmp_path / "elsewhere")
        return
    schema = f"tf_elsewhere_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        separator = "&" if urlsplit(POSTGRES_ADMIN_URL).query else "?"
        yield replace(
            settings, database_url=f"{POSTGRES_ADMIN_URL}{separator}options=-csearch_path%3D{schema}"
        )
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def restore(source: Settings, target: Settings) -> None:
    """Replace what `target`'s database holds with what `source`'s does (both migrated alike)."""
    if not target.database_url:
        with (
            closing(sqlite3.connect(sqlite_path(source.data_dir))) as backup,
            closing(sqlite3.connect(sqlite_path(target.data_dir))) as restored,
        ):
            backup.backup(restored)
        return
    with psycopg.connect(source.database_url) as conn:
        (source_schema,) = conn.execute("SELECT current_schema()").fetchone() or ("",)
    with psycopg.connect(target.database_url) as conn:
        (schema,) = conn.execute("SELECT current_schema()").fetchone() or ("",)
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                "AND table_type = 'BASE TABLE' AND table_name <> 'schema_migrations'",
                (schema,),
            )
        ]
        identities = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = %s AND is_identity = 'YES'",
            (schema,),
        ).fetchall()
        conn.execute("SET LOCAL session_replication_role = replica")  # no trigger, no foreign key check
        for table in tables:
            into, into_source = sql.Identifier(schema, table), sql.Identifier(source_schema, table)
            conn.execute(sql.SQL("DELETE FROM {}").format(into))
            conn.execute(
                sql.SQL("INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM {}").format(into, into_source)
            )
        for table, column in identities:
            conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE(MAX({}), 0) + 1, false) FROM {}"
                ).format(sql.Identifier(column), sql.Identifier(schema, table)),
                (f'"{schema}"."{table}"', column),
            )
