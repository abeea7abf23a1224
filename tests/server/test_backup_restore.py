"""Backup and restore, as the README says: pg_dump the database, pg_restore it into a new one,
start a server on it with the same keyring, and every user still verifies; with another keyring
the server refuses to start."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import POSTGRES_ADMIN_URL, Clock, ServerFactory, require_service
from tests.server.helpers import enroll_authenticator, totp_now, verify
from twofactor_server.domain.keyring import Keyring
from twofactor_server.settings import SettingsError


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.fixture
def databases(postgres_available: None) -> Iterator[tuple[str, str]]:
    """Two fresh databases: the original and the one it is restored into."""
    names = [f"tf_backup_{uuid.uuid4().hex[:10]}", f"tf_restored_{uuid.uuid4().hex[:10]}"]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{names[0]}"')
    try:
        yield names[0], names[1]
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


README = Path(__file__).resolve().parents[2] / "README.md"


def run(*command: str) -> None:
    binary = shutil.which(command[0])
    if binary is None:
        require_service(command[0], FileNotFoundError(command[0]))
    result = subprocess.run([binary or command[0], *command[1:]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def url_of(database: str) -> str:
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"


def test_a_dump_restored_with_the_same_keyring_verifies_every_user(
    start_server: ServerFactory, clock: Clock, databases: tuple[str, str], tmp_path: Path
) -> None:
    original, restored = databases
    h = start_server(database_url=url_of(original))
    users = {f"user{n}": enroll_authenticator(h, clock, f"user{n}") for n in range(3)}
    h.channel.close()
    h.server.stop(grace=None)

    dump = tmp_path / "twofactor.dump"
    run("pg_dump", "--format=custom", "--no-owner", f"--file={dump}", url_of(original))
    run("createdb", "--host=127.0.0.1", "--username=postgres", restored)
    run("pg_restore", "--no-owner", f"--dbname={url_of(restored)}", str(dump))

    back = start_server(database_url=url_of(restored))  # the same TWOFACTOR_KEYS as the original
    for user_id, (secret, backup_codes) in users.items():
        assert verify(back, user_id, totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
        assert verify(back, user_id, backup_codes[0]).result == pb.VERIFY_RESULT_ACCEPTED

    # README's step after restoring an older dump: every unused backup code retired, with the
    # counts the server reads kept right; the other methods go on.
    (retire,) = re.findall(r'psql "\$RESTORED_DATABASE" -c "(UPDATE backup_codes [^"]+)"', README.read_text())
    with psycopg.connect(url_of(restored), autocommit=True) as conn:
        conn.execute(retire)  # type: ignore[arg-type]  # the README's own statement
    clock.advance(30)
    for user_id, (secret, backup_codes) in users.items():
        assert verify(back, user_id, backup_codes[1]).result == pb.VERIFY_RESULT_REJECTED
        accepted = verify(back, user_id, totp_now(secret, clock))
        assert accepted.result == pb.VERIFY_RESULT_ACCEPTED and accepted.backup_codes_remaining == 0
    back.channel.close()
    back.server.stop(grace=None)

    # With another keyring (a key of another version) the restored database is refused at start,
    # naming the key version its values need, rather than answering every Verify with an error.
    with pytest.raises(SettingsError, match=r"key version 1 \("):
        start_server(database_url=url_of(restored), keys=Keyring.new_key_spec(2))
