"""`twofactor keygen`, `token` and `keys status | rotate` as operators run them, and the keyring
checks every command makes at start (configuration errors, exit status 2, no traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.conftest import APP_TOKEN, POSTGRES_ADMIN_URL, TEST_KEYS, Clock, ServerFactory
from tests.server.helpers import enroll_authenticator
from tests.smtp_sink import free_port
from twofactor_server.cli import main
from twofactor_server.domain import backup_codes
from twofactor_server.domain.keyring import BACKUP_CODE, TOTP_SECRET, Keyring
from twofactor_server.settings import PolicySettings, Settings, SettingsError
from twofactor_server.storage import keys, store
from twofactor_server.storage.database import Database, open_database
from twofactor_server.storage.records import StoredBackupCode
from twofactor_server.usecases.backup_codes import BackupCodes, backup_code_data
from twofactor_server.usecases.key_rotation import MAX_BATCH_SIZE, KeyRotation, require_keys_for_stored_values
from twofactor_server.usecases.notices import Notices

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))
KEY_2 = Keyring.new_key_spec(2)
TOKENS = f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}"
BAD_KEYRINGS = {
    "duplicate": (
        f"{TEST_KEYS},{KEY_2},1:{KEY_2.partition(':')[2]}",
        "entry 3 of 3 (version 1): version 1 appears twice",
    ),
    "wrong length": (
        f"{TEST_KEYS},2:AAAAAAAAAAAAAAAAAAAAAA==",
        "entry 2 of 2 (version 2): the key is 16 bytes",
    ),
    "bad base64": (f"{TEST_KEYS},2:not*base64", "entry 2 of 2 (version 2): the key is not valid base64"),
}
COMMANDS = {
    "serve": [TWOFACTOR, "serve"],
    "worker": [TWOFACTOR, "worker"],
    "worker module": [sys.executable, "-m", "twofactor_workers"],
    "migrate": [TWOFACTOR, "migrate"],
    "keys status": [TWOFACTOR, "keys", "status"],
    "keys rotate": [TWOFACTOR, "keys", "rotate"],
}


def env_for(settings: Settings, **variables: str) -> dict[str, str]:
    """The environment of a `twofactor` process on the test's store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    store_vars = (  # console delivery with PostgreSQL needs the explicit opt-in
        {"DATABASE_URL": settings.database_url, "ALLOW_CONSOLE_DELIVERY": "true"}
        if settings.database_url
        else {}
    )
    values = {"DATA_DIR": str(settings.data_dir), "TOKENS": TOKENS, **store_vars, **variables}
    env.update({f"TWOFACTOR_{k}": v for k, v in values.items()})
    return env


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_keygen_prints_an_entry_of_the_asked_version_and_says_how_to_add_it() -> None:
    made = run([TWOFACTOR, "keygen", "--version", "7"], dict(os.environ))
    assert made.returncode == 0
    entry = made.stdout.strip()
    assert entry.startswith("7:") and len(made.stdout.splitlines()) == 1
    keyring = Keyring.parse(f"{TEST_KEYS},{entry}")  # appends as it is
    assert keyring.versions == (1, 7)
    assert "TWOFACTOR_KEYS" in made.stderr and "TWOFACTOR_ACTIVE_KEY_VERSION" in made.stderr
    assert run([TWOFACTOR, "keygen"], dict(os.environ)).stdout.startswith("1:")
    refused = run([TWOFACTOR, "keygen", "--version", "0"], dict(os.environ))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr


def test_token_prints_an_entry_ready_to_append(tmp_path: Path) -> None:
    made = run([TWOFACTOR, "token", "new-backend", "app"], dict(os.environ))
    assert made.returncode == 0
    token = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("token:"))
    entry = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("TWOFACTOR_TOKENS"))
    settings = Settings.from_env({"TWOFACTOR_TOKENS": f"{TOKENS},{entry}"})
    assert [t.name for t in settings.tokens] == ["backend", "new-backend"]
    assert settings.tokens[1].sha256 == hashlib.sha256(token.encode()).digest()
    assert "remove the old entry" in made.stderr


@pytest.mark.parametrize(
    ("name", "scopes", "said"),
    [
        ("login-backend", "admins", "scopes must be app, admin or app+admin, got 'admins'"),
        ("backend", "app,admin", "scopes must be app, admin or app+admin, got 'app,admin'"),
        ("backend", "app:admin", "scopes must be app, admin or app+admin, got 'app:admin'"),
        ("backend", "", "scopes must be app, admin or app+admin, got ''"),
        ("ops,eu", "app", "a token name has no ',' or ':' and no space at either end, got 'ops,eu'"),
        ("ops:eu", "app", "a token name has no ',' or ':' and no space at either end, got 'ops:eu'"),
        (" ops", "app", "a token name has no ',' or ':' and no space at either end, got ' ops'"),
        ("", "app", "a token name has no ',' or ':' and no space at either end, got ''"),
    ],
)
def test_token_refuses_an_entry_the_server_would_refuse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, scopes: str, said: str
) -> None:
    for variable in list(os.environ):
        if variable.startswith("TWOFACTOR_"):
            monkeypatch.delenv(variable)
    assert main(["token", name, scopes]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"twofactor token: {said}\n"


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("keyring", list(BAD_KEYRINGS))
def test_a_bad_keyring_stops_every_command_with_one_line(
    tmp_path: Path, base_settings_for_cli: Settings, command: str, keyring: str
) -> None:
    spec, message = BAD_KEYRINGS[keyring]
    result = run(
        COMMANDS[command], env_for(base_settings_for_cli, KEYS=spec, BROKER_URL="redis://127.0.0.1:1/0")
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"twofactor: configuration error: TWOFACTOR_KEYS: {message}")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert KEY_2.partition(":")[2] not in result.stderr  # never a key in the message


def test_an_active_version_missing_from_the_keyring_stops_start_up(base_settings_for_cli: Settings) -> None:
    result = run([TWOFACTOR, "serve"], env_for(base_settings_for_cli, KEYS=TEST_KEYS, ACTIVE_KEY_VERSION="2"))
    assert result.returncode == 2
    assert "TWOFACTOR_ACTIVE_KEY_VERSION is 2, but TWOFACTOR_KEYS has only version(s) 1" in result.stderr


@pytest.fixture
def base_settings_for_cli(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_keyring_missing_a_version_still_in_use_refuses_to_start(
    start_server: ServerFactory, settings: Settings, clock: Clock, command: str
) -> None:
    h = start_server()
    enroll_authenticator(h, clock, "alice")
    h.server.stop(grace=None)
    result = run(
        [TWOFACTOR, command],
        env_for(settings, KEYS=KEY_2, LISTEN="127.0.0.1:0", BROKER_URL="redis://127.0.0.1:6379/0"),
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert (
        "stored values need key version 1 (1 TOTP secrets, 10 backup-code ciphertexts, "
        "10 backup-code hashes), which TWOFACTOR_KEYS lacks"
    ) in result.stderr


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_another_key_under_a_version_in_use_refuses_to_start(
    start_server: ServerFactory, settings: Settings, clock: Clock, command: str
) -> None:
    """A key that parses but is not the one the stored values were sealed with (another
    environment's, pasted under the same version) would count every right code as wrong and
    lock users out: the server and the worker refuse to start, in one line, naming the version."""
    h = start_server()
    enroll_authenticator(h, clock, "alice")
    h.server.stop(grace=None)
    other_key_1 = Keyring.new_key_spec(1)
    result = run(
        [TWOFACTOR, command],
        env_for(settings, KEYS=other_key_1, LISTEN="127.0.0.1:0", BROKER_URL="redis://127.0.0.1:6379/0"),
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "key version 1 opens none of the values stored under it" in result.stderr
    assert other_key_1.partition(":")[2] not in result.stderr
    restarted = start_server()  # the right key: it starts, and the user's codes work
    assert restarted.port


def seal_authenticator(db: Database, keyring: Keyring, user_id: str) -> None:
    """An enabled authenticator secret for `user_id`, sealed under the keyring's active key."""
    with db.transaction() as tx:
        store.ensure_user(tx, user_id, 0)
        sealed = keyring.encrypt(b"x" * 20, purpose=TOTP_SECRET, user_id=user_id)
        store.start_method_enrollment(tx, user_id, "authenticator", 0, with_proof=True, pending_secret=sealed)
        assert store.enable_method(tx, user_id, "authenticator", 0)


def test_a_key_that_opens_its_values_starts_though_one_value_does_not(
    settings: Settings, other_connection: Database
) -> None:
    """One damaged value is not a wrong key: the key opens the others, so the server starts."""
    keyring = Keyring.parse(TEST_KEYS)
    for user in ("bea", "cal"):
        seal_authenticator(other_connection, keyring, user)
    with other_connection.transaction() as tx:
        damaged = keyring.encrypt(b"x" * 20, purpose=TOTP_SECRET, user_id="someone else")
        tx.execute(  # bea's secret no longer authenticates (sealed for another user)
            "UPDATE methods SET secret = %(s)s WHERE user_id = 'bea'", {"s": damaged}
        )
    require_keys_for_stored_values(other_connection, keyring)
    with pytest.raises(SettingsError, match="key version 1 opens none"):
        require_keys_for_stored_values(other_connection, Keyring.parse(Keyring.new_key_spec(1)))


def test_keys_rotate_reports_a_damaged_value_as_damaged_not_as_a_wrong_key(
    other_connection: Database,
) -> None:
    """`keys rotate` runs once the keys open the values stored under their versions; a value that
    then doesn't open is damaged (README: reset its user). The report said to configure the
    original key, the message of a KEY_MISMATCH answer, sending the operator after a key that
    is right."""
    keyring = Keyring.parse(TEST_KEYS)
    for user in ("bea", "cal"):
        seal_authenticator(other_connection, keyring, user)
    with other_connection.transaction() as tx:
        damaged = keyring.encrypt(b"x" * 20, purpose=TOTP_SECRET, user_id="someone else")
        tx.execute("UPDATE methods SET secret = %(s)s WHERE user_id = 'bea'", {"s": damaged})
    both = Keyring.parse(f"{TEST_KEYS},{KEY_2}")
    require_keys_for_stored_values(other_connection, both)
    report = KeyRotation(other_connection, both).rotate()
    assert report.progress.problems
    for problem in report.progress.problems:
        assert problem.startswith("authenticator secret of user 'bea': ")
        assert "configure" not in problem and "damaged" in problem and "reset the user" in problem


def test_an_older_key_that_opens_none_of_its_values_refuses_to_start(other_connection: Database) -> None:
    """A wrong key under a version no longer active would count every right backup code still
    sealed under it as wrong, and lock its users out: refused as for the active version."""
    seal_authenticator(other_connection, Keyring.parse(TEST_KEYS), "dot")
    wrong_old_and_new = Keyring.parse(f"{Keyring.new_key_spec(1)},{KEY_2}")
    assert wrong_old_and_new.active_version == 2
    with pytest.raises(SettingsError) as refused:
        require_keys_for_stored_values(other_connection, wrong_old_and_new)
    assert "key version 1 opens none of the values stored under it (TOTP secrets)" in str(refused.value)
    assert "reported these values unreadable, reset their users" in str(refused.value)


@pytest.mark.parametrize("mistyped", ["active", "older"])
def test_keys_rotate_with_a_mistyped_key_refuses_and_changes_nothing(
    settings: Settings, other_connection: Database, mistyped: str
) -> None:
    """Rotating with a mistyped active key would seal every value anew under a key no server has;
    with a mistyped older one it would find them all unreadable. It refuses, in one line."""
    seal_authenticator(other_connection, Keyring.parse(TEST_KEYS), "old-user")
    seal_authenticator(other_connection, Keyring.parse(f"{TEST_KEYS},{KEY_2}"), "new-user")
    watcher = KeyRotation(other_connection, Keyring.parse(f"{TEST_KEYS},{KEY_2}"))
    before = versions(watcher)
    assert before == {1: 1, 2: 1}
    wrong_1, wrong_2 = Keyring.new_key_spec(1), Keyring.new_key_spec(2)
    entries = f"{TEST_KEYS},{wrong_2}" if mistyped == "active" else f"{wrong_1},{KEY_2}"
    rotated = run([TWOFACTOR, "keys", "rotate"], env_for(settings, KEYS=entries))
    assert rotated.returncode == 2, rotated.stdout + rotated.stderr
    assert len(rotated.stderr.strip().splitlines()) == 1 and "Traceback" not in rotated.stderr
    version = 2 if mistyped == "active" else 1
    assert f"key version {version} opens none of the values stored under it" in rotated.stderr
    assert "re-encrypt" not in rotated.stdout
    assert versions(watcher) == before


def test_keys_status_says_to_add_back_a_key_that_stored_values_need(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    """Rotation can't read what no configured key opens: the advice is to add the key back."""
    h = start_server()
    enroll_authenticator(h, clock, "ann")
    h.server.stop(grace=None)
    status = run([TWOFACTOR, "keys", "status"], env_for(settings, KEYS=KEY_2))
    assert "TWOFACTOR_KEYS lacks it, and stored values need it: add that key back" in status.stdout, (
        status.stdout + status.stderr
    )
    assert "run `twofactor keys rotate`" not in status.stdout


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        raise AssertionError("seeding sends nothing")


def seed(db: Database, users: int) -> dict[str, tuple[bytes, list[str]]]:
    """Users with an authenticator secret and ten backup codes under key 1, written by the use case's
    own storage calls (faster than enrolling each through the API); returns what each must still hold."""
    keyring = Keyring.parse(TEST_KEYS)
    quiet = PolicySettings(notify_users=False)
    codes = BackupCodes(db, keyring, quiet, Notices(db, keyring, quiet, NoDispatch(), Clock()), Clock())
    seeded = {}
    with db.transaction() as tx:
        for i in range(users):
            user_id = f"user-{i:05d}"
            secret = os.urandom(20)
            store.ensure_user(tx, user_id, 0)
            sealed = keyring.encrypt(secret, purpose=TOTP_SECRET, user_id=user_id)
            store.start_method_enrollment(
                tx, user_id, "authenticator", 0, with_proof=True, pending_secret=sealed
            )
            store.enable_method(tx, user_id, "authenticator", 0)
            shown = codes.replace_set(tx, user_id, 0)
            seeded[user_id] = (secret, [backup_codes.normalize(c) or "" for c in shown])
    return seeded


def versions(rotation: KeyRotation) -> dict[int, int]:
    found: dict[int, int] = {}
    for usage in rotation.status():
        found[usage.version] = found.get(usage.version, 0) + usage.count
    return found


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_rotation_resumes_and_loses_nothing(settings: Settings, stop_with: int) -> None:
    db = open_database(
        settings.database_url, data_dir=settings.data_dir, timeout=120
    )  # seeding is one long unit
    db.migrate()
    seeded = seed(db, 300)
    both = f"{TEST_KEYS},{KEY_2}"
    watcher = KeyRotation(db, Keyring.parse(both))
    env = env_for(settings, KEYS=both)
    process = subprocess.Popen(
        [TWOFACTOR, "keys", "rotate", "--batch-size", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while versions(watcher).get(2, 0) < 1000:  # wait until it is well under way (backup codes)
        assert process.poll() is None and time.monotonic() < deadline, "the rotation never started"
        time.sleep(0.005)
    process.send_signal(stop_with)
    _, err = process.communicate(timeout=120)
    midway = versions(watcher)
    assert midway.get(1, 0) > 0 and midway.get(2, 0) > 0, midway  # it was stopped part-way
    if stop_with == signal.SIGTERM:
        assert process.returncode == 1
        assert "interrupted: run `twofactor keys rotate` again to finish" in err and "Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL

    again = run([TWOFACTOR, "keys", "rotate"], env)
    assert again.returncode == 0, again.stderr
    assert "no TOTP secret or backup code uses another key version now" in again.stdout
    assert versions(watcher) == {2: 300 * (1 + 10 + 10)}
    status = run([TWOFACTOR, "keys", "status"], env)
    assert "key version 1 (in TWOFACTOR_KEYS):" in status.stdout
    assert "unused: it can be removed from TWOFACTOR_KEYS" in status.stdout
    as_json = json.loads(run([TWOFACTOR, "keys", "status", "--json"], env).stdout)
    assert as_json["versions"]["2"]["backup_code_hash"]["count"] == 3000

    # Nothing lost: with key 2 alone, every secret and every backup code is what was seeded.
    new_only = Keyring.parse(KEY_2)
    with db.transaction() as tx:
        for user_id, (secret, codes) in seeded.items():
            (method,) = store.methods_of(tx, user_id)
            assert method.secret is not None
            assert new_only.decrypt(method.secret, purpose=TOTP_SECRET, user_id=user_id) == secret
            rows = store.unused_backup_codes(tx, user_id)
            assert [
                new_only.decrypt(r.code_ciphertext, purpose=BACKUP_CODE, user_id=user_id).decode()
                for r in rows
            ] == codes
            for row, code in zip(rows, codes, strict=True):
                assert new_only.matches(row.code_hash, backup_code_data(user_id, code), purpose=BACKUP_CODE)
    db.close()


def test_the_largest_batch_size_is_one_statement_each_store_takes(other_connection: Database) -> None:
    """A batch of backup codes is one UPDATE with six parameters a row: at the largest batch the
    command allows, the statement stays within both stores' parameter limits."""
    swaps = [
        (StoredBackupCode(f"nobody-{i}", i % 10, b"h", b"c"), b"new hash", b"new ciphertext")
        for i in range(MAX_BATCH_SIZE)
    ]
    with other_connection.transaction() as tx:
        assert keys.swap_backup_codes(tx, swaps) == 0  # no such rows: nothing replaced, no error


@pytest.mark.parametrize("size", ["0", "-1", str(MAX_BATCH_SIZE + 1), "20000", "many"])
def test_keys_rotate_refuses_a_batch_size_out_of_range(settings: Settings, size: str) -> None:
    refused = run([TWOFACTOR, "keys", "rotate", "--batch-size", size], env_for(settings))
    assert refused.returncode == 2
    assert f"a batch size is a whole number from 1 to {MAX_BATCH_SIZE}" in refused.stderr
    assert "Traceback" not in refused.stderr and "re-encrypt" not in refused.stdout


@pytest.mark.parametrize("command", ["status", "rotate"])
def test_keys_commands_refuse_a_store_that_holds_no_twofactor_database(
    settings: Settings, command: str
) -> None:
    """A mistyped TWOFACTOR_DATA_DIR or URL must not get a new, empty database whose status says
    that every key can be removed: the command refuses, and creates nothing."""
    result = run([TWOFACTOR, "keys", command], env_for(settings, KEYS=TEST_KEYS))
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "can be removed" not in result.stdout
    if settings.database_url:
        assert "TWOFACTOR_DATABASE_URL: the database at" in result.stderr
        assert "has no twofactor tables: set it to the servers' database" in result.stderr
        with psycopg.connect(settings.database_url) as conn:
            assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)
    else:
        assert f"TWOFACTOR_DATA_DIR: {settings.data_dir} holds no twofactor database" in result.stderr
        assert not settings.data_dir.exists()


@pytest.mark.parametrize("command", ["status", "rotate"])
@pytest.mark.parametrize("mistake", ["database", "port"])
def test_keys_commands_on_a_database_that_is_not_there_answer_within_the_storage_timeout(
    tmp_path: Path, command: str, mistake: str
) -> None:
    """A mistyped database name is refused at once (exit 2), as by `serve` and `migrate`; a port
    nothing listens on is "retry later" (exit 1) after the start-up wait, not after the ten
    minutes a scan may take."""
    admin = urlsplit(POSTGRES_ADMIN_URL)
    url = urlunsplit(
        admin._replace(path="/tf_no_such_database")
        if mistake == "database"
        else admin._replace(netloc=f"{admin.username or 'postgres'}@127.0.0.1:{free_port()}")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= {
        "TWOFACTOR_DATABASE_URL": url,
        "TWOFACTOR_KEYS": TEST_KEYS,
        "TWOFACTOR_DATA_DIR": str(tmp_path),
        "TWOFACTOR_STORAGE_TIMEOUT_SECONDS": "1",
        "TWOFACTOR_LOG_FORMAT": "text",
    }
    result = run([TWOFACTOR, "keys", command], env)  # bounded: 120 s
    assert "Traceback" not in result.stderr
    if mistake == "database":
        assert result.returncode == 2, result.stderr
        assert 'refused the connection: database "tf_no_such_database" does not exist' in result.stderr
    else:
        assert result.returncode == 1, result.stderr
        assert "twofactor: the database can't be reached; retry later" in result.stderr
