"""A database URL that can never work is a configuration error at start (one line, exit 2), not
ten seconds of waiting for a database "that may be starting" and exit 1; one that does not
answer yet is still waited for (tests/server/test_cli.py)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import psycopg
import pytest

from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL
from tests.server.test_cli import TWOFACTOR
from tests.server.test_supervisor import production_env
from twofactor_server.storage.refusals import require_readable_url


def with_url_part(**parts: str) -> str:
    return urlunsplit(urlsplit(POSTGRES_ADMIN_URL)._replace(**parts))


def run_on(tmp_path: Path, url: str, command: str, more: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`twofactor <command>` with the production settings on the database at `url`."""
    return subprocess.run(
        [TWOFACTOR, command],
        env={**production_env(tmp_path, url, 0), **more},
        capture_output=True,
        text=True,
        timeout=120,
    )


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
        result = run_on(tmp_path, url, command, {"TWOFACTOR_LOG_FORMAT": "text", **more})
        assert result.returncode == 2, (command, more, result.stderr)
        # One line of ours (the pool's own warnings, from its thread, may come before or after it).
        (said,) = [line for line in result.stderr.splitlines() if line.startswith("twofactor:")]
        assert said.startswith("twofactor: configuration error: TWOFACTOR_DATABASE_URL: the database at "), (
            said
        )
        assert f"refused the connection: {reason}; fix the URL" in said
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "password",
    ["S3cret%zzPw", "Xy/9Qz+base64", "S3cret@Pw"],
    ids=["unencoded %", "unencoded /", "unencoded @"],
)
def test_a_url_libpq_cant_read_is_a_configuration_error_that_shows_no_password(
    tmp_path: Path, password: str
) -> None:
    """A password pasted into the URL as it is (base64 has /): libpq's message quotes it, or
    reads part of it as the host and port. Refused at once, naming the variable, showing none
    of the URL, in every command that opens the database."""
    url = f"postgresql://twofactor:{password}@{ADMIN.hostname}:{ADMIN.port or 5432}/accounts"
    for command, more in (("migrate", {}), ("serve", {}), ("worker", {"TWOFACTOR_BROKER_URL": REDIS_URL})):
        result = run_on(tmp_path, url, command, {"TWOFACTOR_LOG_FORMAT": "json", **more})
        assert result.returncode == 2, (command, result.stderr)
        assert password not in result.stdout + result.stderr and password[:6] not in result.stderr
        assert result.stderr.strip() == (
            "twofactor: configuration error: TWOFACTOR_DATABASE_URL: libpq can't read this URL: "
            "percent-encode the user name and password (% as %25, / as %2F, @ as %40, : as %3A)"
        ), command


def test_a_percent_encoded_password_is_read_as_it_was_meant() -> None:
    """What the refusal asks for works: the same passwords, percent-encoded, pass the check."""
    for password in ("S3cret%25zzPw", "Xy%2F9Qz+base64", "p%40ss%3Aword"):
        require_readable_url(f"postgresql://twofactor:{password}@127.0.0.1:5432/accounts?sslmode=disable")


@pytest.fixture
def role_without_ddl(postgres_url: str) -> Iterator[str]:
    """A URL of the test's schema for a role that may use it but not create tables in it (a
    least-privilege application role)."""
    role = f"tf_no_ddl_{uuid.uuid4().hex[:10]}"
    schema = parse_qs(urlsplit(postgres_url).query)["options"][0].partition("=")[2]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    try:
        parts = urlsplit(postgres_url)
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'REVOKE USAGE ON SCHEMA "{schema}" FROM "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def test_a_role_that_may_not_create_tables_is_one_line_not_a_traceback(
    tmp_path: Path, role_without_ddl: str
) -> None:
    """`migrate` and `serve` printed psycopg's traceback, and a worker started anyway on a
    database without its tables: each is now the one line that says what to do, exit 2."""
    for command, more in (("migrate", {}), ("serve", {}), ("worker", {"TWOFACTOR_BROKER_URL": REDIS_URL})):
        result = run_on(tmp_path, role_without_ddl, command, {"TWOFACTOR_LOG_FORMAT": "text", **more})
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        (said,) = [line for line in result.stderr.splitlines() if line.startswith("twofactor")]
        assert said.startswith("twofactor: configuration error: TWOFACTOR_DATABASE_URL: the database at "), (
            said
        )
        assert said.endswith(
            "refused the migrations: permission denied for schema "
            f"{parse_qs(urlsplit(role_without_ddl).query)['options'][0].partition('=')[2]}; run "
            "`twofactor migrate` as a role that may create tables, then start with "
            "TWOFACTOR_MIGRATE_ON_START=false"
        ), said
