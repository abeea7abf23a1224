"""Migrations: applied once under a lock on both stores, each recorded with the time it was applied;
the SQL is neither formatted nor split on ";"."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from twofactor_server.app import create_server
from twofactor_server.settings import Settings, SettingsError
from twofactor_server.storage.database import open_database
from twofactor_server.storage.migrator import (
    migrations,
    pending_migrations,
    sqlite_statements,
    with_dialect_types,
)


def test_migrations_apply_once_with_the_time_they_were_applied(settings: Settings) -> None:
    versions = [version for version, _ in migrations()]
    before = int(time.time() * 1000)
    db = open_database(settings.database_url, data_dir=settings.data_dir)
    try:
        assert db.migrate() == versions
        assert db.migrate() == []  # idempotent
        with db.transaction() as tx:
            rows = tx.all("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    finally:
        db.close()
    after = int(time.time() * 1000)
    assert [r["version"] for r in rows] == versions
    assert all(before <= r["applied_at"] <= after for r in rows), rows


def test_each_migration_commits_in_a_transaction_of_its_own(settings: Settings) -> None:
    """One transaction for every pending file held each one's locks (0006's exclusive lock on
    challenges) through the later ones' index builds and backfills: reads of the table waited
    past the storage timeout. Each row of schema_migrations is written by its migration's own
    transaction, so PostgreSQL gives each a different xmin."""
    if not settings.database_url:
        return  # PostgreSQL's transaction ids; SQLite takes the same path (apply_migrations)
    db = open_database(settings.database_url, data_dir=settings.data_dir)
    try:
        db.migrate()
        with db.transaction() as tx:
            row = tx.one(
                "SELECT COUNT(*) AS n, COUNT(DISTINCT xmin::text) AS transactions FROM schema_migrations"
            )
    finally:
        db.close()
    assert row is not None and row["transactions"] == row["n"] == len(migrations())


def test_servers_migrating_at_once_apply_each_file_once(settings: Settings) -> None:
    dbs = [open_database(settings.database_url, data_dir=settings.data_dir) for _ in range(4)]
    applied: list[list[str]] = []
    start = threading.Barrier(len(dbs))

    def migrate(index: int) -> None:
        start.wait(30)
        applied.append(dbs[index].migrate())

    threads = [threading.Thread(target=migrate, args=(i,)) for i in range(len(dbs))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for db in dbs:
            db.close()
    # Each file once, whoever applied it: under PostgreSQL's advisory lock one server applies
    # them all; on SQLite each file's transaction takes the write lock, and the servers may share
    # the files out, each applying in order.
    everything = [version for version, _ in migrations()]
    assert sorted(version for one in applied for version in one) == everything
    assert all(one == sorted(one) for one in applied)
    if settings.database_url:
        assert sorted(applied, key=len) == [[], [], [], everything]


def test_placeholders_are_replaced_literally_and_nothing_else_is_interpreted() -> None:
    text = "CREATE TABLE t (b {BLOB}, s TEXT DEFAULT '{kept} 100%');"
    assert with_dialect_types(text, "postgres") == "CREATE TABLE t (b BYTEA, s TEXT DEFAULT '{kept} 100%');"
    assert with_dialect_types(text, "sqlite").startswith("CREATE TABLE t (b BLOB,")


def test_sqlite_statements_are_cut_by_sqlites_own_tokenizer(tmp_path: Path) -> None:
    script = (
        "-- a comment; with a semicolon\n"
        "CREATE TABLE notes (body TEXT DEFAULT 'a; b');\n"
        "INSERT INTO notes (body) VALUES ('x;\n y');\n"
        "-- trailing comment\n"
    )
    statements = sqlite_statements(script)
    assert len(statements) == 2
    assert statements[1].endswith("VALUES ('x;\n y');")


def test_without_migrate_on_start_the_server_refuses_a_database_behind_it(settings: Settings) -> None:
    off = replace(settings, migrate_on_start=False)
    with pytest.raises(SettingsError, match=r"lacks migrations 0001_initial.*run `twofactor migrate` first"):
        create_server(off)
    db = open_database(settings.database_url, data_dir=settings.data_dir)
    try:
        assert pending_migrations(db) == [version for version, _ in migrations()]
        db.migrate()  # the migrate job
        assert pending_migrations(db) == []
    finally:
        db.close()
    server, port = create_server(off)
    server.stop(grace=None)
    assert port > 0


def test_a_migration_split_per_backend_has_the_same_versions_on_both() -> None:
    postgres, sqlite = migrations("postgres"), migrations("sqlite")
    assert [v for v, _ in postgres] == [v for v, _ in sqlite]
    assert "0008_verify_state" in dict(postgres)
    assert dict(postgres)["0008_verify_state"] != dict(sqlite)["0008_verify_state"]


def test_the_backup_code_counts_start_from_the_codes_already_stored(settings: Settings) -> None:
    """0008 applied to a database that has codes: each user's unused ones, counted once; a row
    for every user with codes or methods."""
    db = open_database(settings.database_url, data_dir=settings.data_dir)
    try:
        db.migrate()
        with db.transaction() as tx:  # back to before 0008
            if tx.dialect == "postgres":
                tx.execute(
                    "DROP FUNCTION backup_codes_added, backup_codes_removed, backup_code_used, "
                    "method_changed CASCADE"
                )
            else:
                for trigger in (
                    "backup_codes_added",
                    "backup_codes_removed",
                    "backup_code_used",
                    "method_added",
                    "method_removed",
                    "method_changed",
                ):
                    tx.execute(f"DROP TRIGGER {trigger}")
            tx.execute("DROP TABLE verify_state")
            tx.execute("DELETE FROM schema_migrations WHERE version = '0008_verify_state'")
            for user, used in (("ana", [0, 3]), ("ben", list(range(10))), ("cy", [])):
                tx.execute("INSERT INTO users (user_id, created_at) VALUES (%(u)s, 0)", {"u": user})
                for position in range(10):
                    tx.execute(
                        "INSERT INTO backup_codes (user_id, position, code_hash, code_ciphertext, used_at) "
                        "VALUES (%(u)s, %(p)s, %(h)s, %(h)s, %(used)s)",
                        {
                            "u": user,
                            "p": position,
                            "h": bytes([position]) * 8,
                            "used": 1 if position in used else None,
                        },
                    )
            tx.execute("INSERT INTO users (user_id, created_at) VALUES ('dee', 0)")  # no method, no code
            tx.execute("INSERT INTO methods (user_id, method, enabled_at) VALUES ('cy', 'email', 0)")
        assert db.migrate() == ["0008_verify_state"]
        with db.transaction() as tx:
            rows = tx.all("SELECT user_id, backup_codes_unused, secret_version FROM verify_state")
    finally:
        db.close()
    counts = {r["user_id"]: (r["backup_codes_unused"], r["secret_version"]) for r in rows}
    assert counts == {"ana": (8, 0), "ben": (0, 0), "cy": (10, 0)}  # "dee": no row, nothing to count
