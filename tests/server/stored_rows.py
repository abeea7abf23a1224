"""Read what the server stored, straight from its database (SQLite or PostgreSQL), for assertions."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from twofactor_server.settings import Settings
from twofactor_server.storage.database import open_database


def query(settings: Settings, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one SELECT (psycopg placeholders), read outside the server."""
    if settings.database_url:
        with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
    db = open_database("", data_dir=settings.data_dir)
    try:
        with db.transaction() as tx:
            return tx.all(sql, params)
    finally:
        db.close()


def tables(settings: Settings) -> list[str]:
    if settings.database_url:
        rows = query(
            settings,
            "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = current_schema()",
        )
    else:
        rows = query(settings, "SELECT name FROM sqlite_master WHERE type = 'table'")
    return [r["name"] for r in rows]


def all_cells(settings: Settings) -> list[bytes]:
    """Every non-null value of every column of every table, as bytes (text lower-cased too)."""
    cells: list[bytes] = []
    for table in tables(settings):
        for row in query(settings, f'SELECT * FROM "{table}"'):  # noqa: S608
            for value in row.values():
                if isinstance(value, (bytes, memoryview)):
                    cells.append(bytes(value))
                elif value is not None:
                    cells.append(str(value).encode())
                    cells.append(str(value).lower().encode())
    return cells
