"""The fingerprint each key version's key leaves in the database at its first start, and the
refusal of another key under that version at every later start (server, each child of
`serve --processes`, worker, `keys` commands), on a fresh database too: nothing sealed yet is
no longer a window in which two keys under one version both start and both seal."""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, ServerFactory
from tests.server.helpers import enroll_authenticator, totp_now, verify
from tests.server.stored_rows import query
from tests.server.test_key_commands import TWOFACTOR, env_for, run
from twofactor_server.app import create_server
from twofactor_server.domain.keyring import Keyring
from twofactor_server.settings import Settings, SettingsError
from twofactor_server.storage.database import Database, open_database
from twofactor_server.usecases.key_rotation import require_keys_for_stored_values

KEY_2 = Keyring.new_key_spec(2)
OTHER_KEY_1 = Keyring.new_key_spec(1)
REFUSAL = (
    "TWOFACTOR_KEYS' key version {v} is not the key this database recorded for version {v} "
    "(another environment's, or mistyped?): configure version {v}'s original key; a new key never "
    "reuses a version number"
)


def recorded(settings: Settings) -> dict[int, bytes]:
    rows = query(settings, "SELECT version, fingerprint FROM key_fingerprints")
    return {int(row["version"]): bytes(row["fingerprint"]) for row in rows}


def key_bytes(spec: str) -> bytes:
    return base64.b64decode(spec.partition(":")[2])


def test_a_fresh_database_records_the_first_key_and_starts_again_with_it(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    first = start_server()
    secret, _ = enroll_authenticator(first, clock, "alice")
    first.server.stop(grace=None)
    (fingerprint,) = recorded(settings).values()
    assert list(recorded(settings)) == [1]
    assert fingerprint == Keyring.parse(TEST_KEYS).fingerprint(1)
    # No key material: neither the key, nor a plain hash of it, nor a part of it.
    key = key_bytes(TEST_KEYS)
    assert fingerprint != key and fingerprint != hashlib.sha256(key).digest()
    assert key not in fingerprint and fingerprint[:16] not in key
    again = start_server()  # the same key: it starts, and its users' codes work
    assert verify(again, "alice", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
    assert recorded(settings) == {1: fingerprint}  # recorded once


def test_another_key_under_a_recorded_version_is_refused_on_a_fresh_database(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    """Nothing sealed yet (no value to try the key on): the first server recorded its key, and a
    second one with another key under version 1 refuses to start, in one line naming the version
    and what to do; nothing it would have sealed exists, so nobody is locked out."""
    first = start_server()
    with pytest.raises(SettingsError) as refused:
        create_server(replace(settings, keys=OTHER_KEY_1), clock=clock)
    message = str(refused.value)
    assert message.startswith(REFUSAL.format(v=1)) and "\n" not in message
    assert OTHER_KEY_1.partition(":")[2] not in message and TEST_KEYS.partition(":")[2] not in message
    assert recorded(settings) == {1: Keyring.parse(TEST_KEYS).fingerprint(1)}  # unchanged
    assert first.port  # the first goes on serving


@pytest.mark.parametrize("command", ["serve", "worker", "keys rotate", "keys status"])
def test_every_command_refuses_another_key_under_a_recorded_version(
    start_server: ServerFactory, settings: Settings, command: str
) -> None:
    start_server().server.stop(grace=None)  # records version 1's key; nothing sealed
    result = run(
        [TWOFACTOR, *command.split()],
        env_for(settings, KEYS=OTHER_KEY_1, LISTEN="127.0.0.1:0", BROKER_URL="redis://127.0.0.1:6379/0"),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert REFUSAL.format(v=1) in result.stderr
    assert OTHER_KEY_1.partition(":")[2] not in result.stderr
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert result.stderr.strip() in readme.splitlines()  # the line the README shows operators


@pytest.mark.parametrize("backend", ["postgres"])
def test_every_child_of_serve_processes_refuses_another_key(
    start_server: ServerFactory, settings: Settings
) -> None:
    start_server().server.stop(grace=None)
    result = run(
        [TWOFACTOR, "serve", "--processes", "2"],
        env_for(settings, KEYS=OTHER_KEY_1, LISTEN="127.0.0.1:0"),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    said = [line for line in result.stderr.splitlines() if line.strip()]
    # Each child that got as far as the check says the one line (the supervisor may stop the
    # other first); none starts.
    assert said and all(REFUSAL.format(v=1) in line for line in said), result.stderr
    assert "listening" not in result.stdout


def test_keys_status_compares_but_records_nothing(settings: Settings) -> None:
    """`keys status` changes nothing: on a database with no key recorded it records none (the
    key it was given may be a typo), and the first server to start records its own."""
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=30)
    db.migrate()  # a database the servers made, with nothing recorded yet
    db.close()
    status = run([TWOFACTOR, "keys", "status"], env_for(settings, KEYS=OTHER_KEY_1))
    assert status.returncode == 0, status.stdout + status.stderr
    assert recorded(settings) == {}


def test_a_new_version_records_its_key_at_its_first_start(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    """The rotation: key 2 deployed decrypt-only first records its fingerprint then, and another
    key 2 on a later process is refused, though nothing is sealed under version 2 yet."""
    start_server().server.stop(grace=None)
    start_server(keys=f"{TEST_KEYS},{KEY_2}", active_key_version=1).server.stop(grace=None)
    assert recorded(settings) == {v: Keyring.parse(f"{TEST_KEYS},{KEY_2}").fingerprint(v) for v in (1, 2)}
    other_2 = Keyring.new_key_spec(2)
    with pytest.raises(SettingsError, match=re.escape(REFUSAL.format(v=2))):
        create_server(replace(settings, keys=f"{TEST_KEYS},{other_2}"), clock=clock)
    # Key 1 retired after the rotation: its row stays, so no new key ever takes version 1.
    start_server(keys=KEY_2).server.stop(grace=None)
    with pytest.raises(SettingsError, match="key version 1 is not the key this database recorded"):
        create_server(replace(settings, keys=f"{OTHER_KEY_1},{KEY_2}"), clock=clock)


def test_an_upgraded_database_is_judged_by_its_values_before_a_fingerprint_is_recorded(
    start_server: ServerFactory, settings: Settings, clock: Clock, other_connection: Database
) -> None:
    """A database of the release before (values sealed, no fingerprint): a wrong key is refused
    by the values, as before, and records nothing; the right key then records its own."""
    h = start_server()
    enroll_authenticator(h, clock, "alice")
    h.server.stop(grace=None)
    with other_connection.transaction() as tx:
        tx.execute("DELETE FROM key_fingerprints")  # as before migration 0012
    with pytest.raises(SettingsError, match="key version 1 opens none of the values stored under it"):
        require_keys_for_stored_values(other_connection, Keyring.parse(OTHER_KEY_1))
    assert recorded(settings) == {}
    require_keys_for_stored_values(other_connection, Keyring.parse(TEST_KEYS))
    assert recorded(settings) == {1: Keyring.parse(TEST_KEYS).fingerprint(1)}


@pytest.mark.parametrize("backend", ["postgres"])
def test_first_starts_with_different_keys_at_once_one_wins_the_other_is_refused(
    settings: Settings, other_connection: Database
) -> None:
    """Two processes' first starts on a fresh database, with different keys under version 1,
    let go at the same moment: exactly one records its key and starts, the other is refused."""
    keyrings = [Keyring.parse(TEST_KEYS), Keyring.parse(OTHER_KEY_1)]
    dbs = [open_database(settings.database_url, data_dir=settings.data_dir, timeout=30) for _ in keyrings]
    outcomes: list[str | None] = [None, None]

    def start(i: int) -> None:
        try:
            require_keys_for_stored_values(dbs[i], keyrings[i])
            outcomes[i] = "started"
        except SettingsError as error:
            outcomes[i] = str(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    try:
        with psycopg.connect(settings.database_url, autocommit=True) as gate:
            # Both are held at their INSERT by a lock on the table, then let go together.
            gate.execute("BEGIN")
            gate.execute("LOCK TABLE key_fingerprints IN SHARE MODE")
            holder = gate.execute("SELECT pg_backend_pid()").fetchone()
            assert holder is not None
            for thread in threads:
                thread.start()
            with psycopg.connect(settings.database_url, autocommit=True) as monitor:
                deadline = time.monotonic() + 30
                while (
                    waiting := monitor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                        (holder[0],),
                    ).fetchone()
                ) is None or waiting[0] < 2:
                    assert time.monotonic() < deadline and all(t.is_alive() for t in threads), outcomes
                    time.sleep(0.01)
            gate.execute("COMMIT")
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
    finally:
        for db in dbs:
            db.close()
    assert outcomes.count("started") == 1, outcomes
    winner = outcomes.index("started")
    loser = outcomes[1 - winner]
    assert loser is not None and loser.startswith(REFUSAL.format(v=1)), outcomes
    assert recorded(settings) == {1: keyrings[winner].fingerprint(1)}


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_the_embedded_default_without_its_development_key_says_to_restore_it_or_start_afresh(
    start_server: ServerFactory, settings: Settings, command: str
) -> None:
    """`make serve` made a database and a development key; the key's file was lost since (nothing
    sealed yet). The start, which made a new development key, is refused in one line saying what
    to do: not TWOFACTOR_KEYS, never set here, nor a version's "original key" nobody has."""
    start_server(keys="").server.stop(grace=None)  # the development key's fingerprint recorded
    dev_secrets = settings.data_dir / "dev-secrets.json"
    dev_secrets.unlink()
    result = run(
        [TWOFACTOR, command], env_for(settings, LISTEN="127.0.0.1:0", BROKER_URL="redis://127.0.0.1:6379/0")
    )
    assert result.returncode == 2, result.stdout + result.stderr
    said = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"the development key in {dev_secrets} is not the key this database" in said[0]
    assert f"move {settings.data_dir} away" in said[0] and "TWOFACTOR_KEYS" not in said[0]
