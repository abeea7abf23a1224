"""Migration 0002_outbox on a database that already holds challenges: the rows stay valid,
count as published, and one still queued is recovered (its message may be long gone)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from twofactor_server.storage import outbox, outbox_recovery
from twofactor_server.storage.database import migrations, open_database


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("postgres_url")) if backend == "postgres" else ""


def test_rows_from_before_the_migration_are_published_and_recovered(
    database_url: str, tmp_path: Path
) -> None:
    db = open_database(database_url, data_dir=tmp_path)
    types = {"BLOB": "BYTEA", "SERIAL_PK": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}
    if db.dialect == "sqlite":
        types = {"BLOB": "BLOB", "SERIAL_PK": "INTEGER PRIMARY KEY AUTOINCREMENT"}
    version, initial = migrations()[0]
    assert version == "0001_initial"
    try:
        with db.transaction() as tx:  # a database as the previous release left it
            tx.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY, applied_at BIGINT)")
            for statement in re.sub(r"--[^\n]*", "", initial.format(**types)).split(";"):
                if statement.strip():
                    tx.execute(statement)
            tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ('0001_initial', 0)")
            tx.execute("INSERT INTO users (user_id, created_at) VALUES ('old', 1000)")
            tx.execute(
                "INSERT INTO challenges (challenge_id, user_id, method, purpose, destination, code_hash, "
                "code_ciphertext, locale, created_at, expires_at, delivery_status, updated_at) VALUES "
                "('c1', 'old', 'email', 'login', 'old@example.com', %(h)s, %(s)s, 'en', 1000, 600000, "
                "'queued', 1000)",
                {"h": b"hash", "s": b"sealed"},
            )
        applied = db.migrate()
        assert applied[0] == "0002_outbox" and "0001_initial" not in applied
        with db.transaction() as tx:
            row = outbox.get_challenge(tx, "c1")
            assert row is not None
            assert (row.published_at, row.publish_generation, row.lease_until) == (1000, 0, None)
            assert [c.challenge_id for c in outbox.live_challenges(tx, "old", "login", 2000, 5)] == ["c1"]
            taken = outbox_recovery.take_for_republish(
                tx, 20_000, stale_before=10_000, interval_ms=10_000, limit=10
            )
            assert [(c.challenge_id, c.publish_generation) for c in taken] == [("c1", 1)]
            # The old message (generation 0), late rather than lost, still delivers when it comes.
            claimed = outbox.claim_delivery(tx, "c1", 0, 20_000, 5_000)
            assert claimed is not None and claimed.lease_until == 25_000
            # While the lease is held, nobody else claims, the new message neither; after it ran
            # out, recovery takes it back.
            assert outbox.claim_delivery(tx, "c1", 1, 24_000, 5_000) is None
            assert (
                outbox_recovery.take_for_republish(tx, 24_000, stale_before=0, interval_ms=0, limit=10) == []
            )
            again = outbox_recovery.take_for_republish(tx, 25_000, stale_before=0, interval_ms=0, limit=10)
            assert [(c.challenge_id, c.publish_generation) for c in again] == [("c1", 2)]
            # Never delivered before its code expired (storage or every worker down): EXPIRED, wiped.
            assert outbox_recovery.expire_undelivered(tx, 599_999) == []
            assert outbox_recovery.expire_undelivered(tx, 600_000) == ["email"]
            expired = outbox.get_challenge(tx, "c1")
            assert expired is not None
            assert (expired.delivery_status, expired.code_ciphertext) == ("expired", None)
            assert expired.failure_reason == outbox_recovery.EXPIRED_REASON
    finally:
        db.close()
