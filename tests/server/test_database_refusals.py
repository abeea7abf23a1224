"""A database URL that can never work is a configuration error at start (one line, exit 2), not
ten seconds of waiting for a database "that may be starting" and exit 1; one that does not
answer yet is still waited for (tests/server/test_cli.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL
from tests.server.test_cli import TWOFACTOR
from tests.server.test_supervisor import production_env


def with_url_part(**parts: str) -> str:
    return urlunsplit(urlsplit(POSTGRES_ADMIN_URL)._replace(**parts))


ADMIN = urlsplit(POSTGRES_ADMIN_URL)
NO_SUCH_ROLE = with_url_part(netloc=f"tf_no_such_role@{ADMIN.hostname}:{ADMIN.port or 5432}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (with_url_part(path="/tf_no_such_database"), 'database "tf_no_such_database" does not exist'),
        (
            with_url_part(
                netloc="tf_no_such_role@"
                + urlsplit(POSTGRES_ADMIN_URL).hostname
                + ":"
                + str(urlsplit(POSTGRES_ADMIN_URL).port or 5432)
            ),
            'role "tf_no_such_role" does not exist',
        ),
        (with_url_part(query="sslmode=bogus"), 'invalid sslmode value: "bogus"'),
    ],
    ids=["no such database", "no such role", "an option libpq can't read"],
)
def test_a_refused_connection_is_a_configuration_error(
    tmp_path: Path, postgres_available: None, url: str, reason: str
) -> None:
    migrations_off = {"TWOFACTOR_MIGRATE_ON_START": "false"}  # README's fleet setting
    worker = {**migrations_off, "TWOFACTOR_BROKER_URL": REDIS_URL}
    for command, more in (("migrate", {}), ("serve", {}), ("serve", migrations_off), ("worker", worker)):
        result = subprocess.run(
            [TWOFACTOR, command],
            env={**production_env(tmp_path, url, 0), "TWOFACTOR_LOG_FORMAT": "text", **more},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, (command, more, result.stderr)
        # One line of ours (the pool's own warnings, from its thread, may come before or after it).
        (said,) = [line for line in result.stderr.splitlines() if line.startswith("twofactor:")]
        assert said.startswith("twofactor: configuration error: TWOFACTOR_DATABASE_URL: the database at "), (
            said
        )
        assert f"refused the connection: {reason}; fix the URL" in said
        assert "Traceback" not in result.stderr
