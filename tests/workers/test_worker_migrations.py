"""A worker honours TWOFACTOR_MIGRATE_ON_START as the server does: off, it migrates nothing (the
fleet's migrate job does, at the hour the operator chose) and refuses to start, exit status 2,
while the database lacks one of its migrations. It used to migrate at start whatever the setting:
rolling out a new worker ran the migrations then."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg

from tests.conftest import REDIS_URL, TEST_KEYS
from tests.server.test_cli import TWOFACTOR, env_for


def test_with_migrations_at_start_off_a_worker_refuses_an_unmigrated_database(
    tmp_path: Path, postgres_url: str, redis_available: None
) -> None:
    env = env_for(
        tmp_path,
        DATABASE_URL=postgres_url,
        BROKER_URL=REDIS_URL,
        KEYS=TEST_KEYS,
        MIGRATE_ON_START="false",
        ALLOW_CONSOLE_DELIVERY="true",
    )
    result = subprocess.run([TWOFACTOR, "worker"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "the database lacks migrations 0001_initial" in result.stderr
    assert "run `twofactor migrate` first" in result.stderr
    with psycopg.connect(postgres_url) as conn:
        migrated = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    assert migrated == (False,)  # nothing was applied
