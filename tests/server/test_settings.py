"""Configuration: every TWOFACTOR_* setting refuses a bad value with one line and exit status 2,
`twofactor config` shows the effective values with secrets masked, console delivery needs an opt-in
with PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import APP_TOKEN, TEST_KEYS
from twofactor_server.cli import main
from twofactor_server.configuration import setting_kinds
from twofactor_server.setting_values import mask_url
from twofactor_server.settings import Settings, SettingsError

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))

# A value each kind of setting refuses.
BAD_VALUES = {
    "int": "twelve",
    "float": "soon",
    "bool": "maybe",
    "choice": "bogus",
    "methods": "carrier-pigeon",
    "tokens": "not-a-token",
    "countries": "US,ZZ",
    "address": "no-port-here",
    "url": "ftp://example.com/x",
    "email": "nobody",
    "text": "line\x07break",  # a control character: a stray paste
}
SETTINGS = sorted(setting_kinds().items())
# More values a kind refuses: no number at all, or past the setting's range (a port past 65535).
MORE_BAD_VALUES = {
    "float": ("nan", "inf", "-inf", "1e-9", "1e9"),
    "address": ("127.0.0.1:99999", ":65536"),
}
BAD_CASES = [
    (name, value) for name, kind in SETTINGS for value in (BAD_VALUES[kind], *MORE_BAD_VALUES.get(kind, ()))
]
README = Path(__file__).parents[2] / "README.md"


def clean_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update({f"TWOFACTOR_{k}": v for k, v in variables.items()})
    return env


def test_every_setting_has_a_bad_value_to_try() -> None:
    assert len(SETTINGS) > 40
    assert {kind for _, kind in SETTINGS} <= BAD_VALUES.keys()


@pytest.mark.parametrize(("variable", "value"), BAD_CASES, ids=[f"{n}={v!r}" for n, v in BAD_CASES])
def test_a_bad_value_is_a_one_line_configuration_error(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("TWOFACTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv(variable, value)
    assert main(["config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"twofactor: configuration error: {variable}"), err


@pytest.mark.parametrize("variable", [name for name, kind in SETTINGS if kind == "float"])
def test_a_float_setting_takes_the_range_the_readme_gives(variable: str) -> None:
    # The SMTP row names its variables by suffix, each of the others has a row of its own.
    mention = f"`_{variable.removeprefix('TWOFACTOR_SMTP_')}`" if "_SMTP_" in variable else f"`{variable}`"
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `") and mention in line)
    documented = re.search(r"(\d[\d.]*) to (\d[\d.]*)", row[row.rindex(mention) :])
    assert documented, f"README gives no range for {variable}: {row}"
    low, high = float(documented[1]), float(documented[2])
    for inside in (documented[1], documented[2]):
        Settings.from_env({variable: inside})
    for outside in (low / 2, high * 2):
        with pytest.raises(SettingsError, match=f"{variable} must be between {documented[1]} and {high:g}"):
            Settings.from_env({variable: str(outside)})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tf:db-pass-9@db:5432/tf", "postgresql://tf:****@db:5432/tf"),
        ("postgresql://db/tf?password=db-pass-9", "postgresql://db/tf?password=****"),
        (
            "postgresql://db/tf?sslmode=require&PassWord=db-pass-9&connect_timeout=3",
            "postgresql://db/tf?sslmode=require&PassWord=****&connect_timeout=3",
        ),
        ("postgresql://db/tf?sslpassword=db-pass-9", "postgresql://db/tf?sslpassword=****"),
        (
            "postgresql://db/tf?pass%77ord=db-pass-9",
            "postgresql://db/tf?pass%77ord=****",
        ),  # libpq decodes keys
        ("postgresql://tf:db@pass-9@db/tf", "postgresql://tf:****@db/tf"),  # an unencoded @
        ("postgresql://tf:db/pass?9@db/tf", "postgresql://tf:****@db/tf"),
        (
            "postgresql://tf:db-pass-9@db/tf?application_name=a@b",
            "postgresql://tf:****@db/tf?application_name=a@b",
        ),
        ("postgresql://db/tf?application_name=a@b", "postgresql://db/tf?application_name=a@b"),
        ("redis://:redis-pass-7@redis:6379/0", "redis://:****@redis:6379/0"),
        ("redis://redis:6379/0?password=redis-pass-7", "redis://redis:6379/0?password=****"),
        ("host=db password=db-pass-9 dbname=tf", "host=db password=**** dbname=tf"),  # libpq conninfo
        ("host=db password = 'db pass 9' dbname=tf", "host=db password = **** dbname=tf"),
        ("twofactor@localhost", "twofactor@localhost"),
    ],
)
def test_mask_url_hides_every_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_config_and_its_error_lines_hide_passwords_in_query_parameters(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("TWOFACTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TWOFACTOR_DATABASE_URL", "postgresql://db/tf?password=db-pass-9")
    monkeypatch.setenv("TWOFACTOR_BROKER_URL", "redis://:redis-pass-7@redis-tail@redis:6379/0")
    assert main(["config"]) == 0
    out, err = capsys.readouterr()
    assert "TWOFACTOR_DATABASE_URL=postgresql://db/tf?password=****\n" in out
    assert "TWOFACTOR_BROKER_URL=redis://:****@redis:6379/0\n" in out
    for refused in ("http://db/tf?password=db-pass-9", "host=db password=db-pass-9"):
        monkeypatch.setenv("TWOFACTOR_DATABASE_URL", refused)
        assert main(["config"]) == 2
        more_out, more_err = capsys.readouterr()
        assert more_err.startswith("twofactor: configuration error: TWOFACTOR_DATABASE_URL must be")
        out, err = out + more_out, err + more_err
    for secret in ("db-pass-9", "redis-pass-7", "redis-tail"):
        assert secret not in out + err


def test_a_bad_log_level_stops_the_server_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [TWOFACTOR, "serve"],
        env=clean_env(LOG_LEVEL="bogus", DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "twofactor: configuration error: TWOFACTOR_LOG_LEVEL must be one of "
        "DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'BOGUS'\n"
    )


def test_config_prints_every_setting_with_secrets_masked(tmp_path: Path) -> None:
    result = subprocess.run(
        [TWOFACTOR, "config"],
        env=clean_env(
            KEYS=TEST_KEYS,
            SMTP_PASSWORD="hunter2-smtp",
            DATABASE_URL="postgresql://twofactor:db-pass-9@db.internal:5432/twofactor",
            BROKER_URL="redis://:redis-pass-7@redis.internal:6379/0",
            LOG_LEVEL="debug",
            LOG_FORMAT="text",
            DATA_DIR=str(tmp_path),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    shown = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert set(shown) == {name for name, _ in SETTINGS}
    assert shown["TWOFACTOR_KEYS"] == "****"
    assert shown["TWOFACTOR_SMTP_PASSWORD"] == "****"
    assert shown["TWOFACTOR_DATABASE_URL"] == "postgresql://twofactor:****@db.internal:5432/twofactor"
    assert shown["TWOFACTOR_BROKER_URL"] == "redis://:****@redis.internal:6379/0"
    assert shown["TWOFACTOR_LOG_LEVEL"] == "debug" and shown["TWOFACTOR_LISTEN"] == "127.0.0.1:50051"
    for secret in (TEST_KEYS.partition(":")[2], "hunter2-smtp", "db-pass-9", "redis-pass-7"):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("variable", ["EMAIL_PROVIDER", "SMS_PROVIDER"])
def test_console_delivery_with_postgresql_needs_an_explicit_opt_in(
    tmp_path: Path, postgres_url: str, variable: str, command: str
) -> None:
    """Refused with one line before the database is touched: a deploy with a wrong setting
    migrates nothing."""
    env = clean_env(
        DATABASE_URL=postgres_url,
        KEYS=TEST_KEYS,
        TOKENS=f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
        BROKER_URL="redis://127.0.0.1:6379/0",
        LISTEN="127.0.0.1:0",
        EMAIL_PROVIDER="smtp" if variable == "SMS_PROVIDER" else "console",
        SMS_PROVIDER="sns" if variable == "EMAIL_PROVIDER" else "console",
        DATA_DIR=str(tmp_path),
    )
    result = subprocess.run([TWOFACTOR, command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (said,) = result.stderr.splitlines()
    assert said.startswith(f"twofactor: configuration error: TWOFACTOR_{variable}=console prints codes")
    assert "TWOFACTOR_ALLOW_CONSOLE_DELIVERY=true" in said
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    assert tables == (0,), "migrated before the refusal"


@pytest.mark.parametrize(
    ("command", "variables", "named"),
    [
        ("serve", {"KEYS": "not-a-key"}, "TWOFACTOR_KEYS"),
        ("worker", {"KEYS": "1:not base64!", "BROKER_URL": "redis://127.0.0.1:6379/0"}, "TWOFACTOR_KEYS"),
        ("serve", {"DATA_DIR": "/proc/no-such-dir/data"}, "TWOFACTOR_DATA_DIR"),
    ],
)
def test_values_checked_when_used_are_one_line_errors_too(
    tmp_path: Path, command: str, variables: dict[str, str], named: str
) -> None:
    env = clean_env(**{"LISTEN": "127.0.0.1:0", "DATA_DIR": str(tmp_path), **variables})
    result = subprocess.run([TWOFACTOR, command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"twofactor: configuration error: {named}"), result.stderr
    assert result.stderr.count("\n") == 1


MISREAD = [
    ("TWOFACTOR_SNS_REGION", "us-east1"),  # DNS fails: every text retried until it expires
    ("TWOFACTOR_SNS_REGION", "US-EAST-1"),  # resolves, but signed for the wrong scope
    ("TWOFACTOR_SNS_SENDER_ID", "Acme Bank"),  # SNS refuses each of these sender ids: every
    ("TWOFACTOR_SNS_SENDER_ID", "AcmeSecurity2FA"),  # text would fail for good
    ("TWOFACTOR_SNS_SENDER_ID", "123456"),
    ("TWOFACTOR_SNS_SENDER_ID", "Acme_2FA"),
    ("TWOFACTOR_SMS_ALLOWED_COUNTRIES", ","),  # would read as every country: the guard off
    ("TWOFACTOR_SMS_ALLOWED_COUNTRIES", " , ,"),
    ("TWOFACTOR_ISSUER", "Acme: Login"),  # the app's label would show another issuer
    ("TWOFACTOR_ISSUER", "Example Corporation " * 60),  # no QR code holds it twice: INTERNAL on each
]


@pytest.mark.parametrize(("variable", "value"), MISREAD, ids=[f"{n}={v[:30]!r}" for n, v in MISREAD])
def test_a_value_sns_the_sms_guard_or_an_authenticator_app_would_misread_is_refused_at_start(
    variable: str, value: str
) -> None:
    with pytest.raises(SettingsError, match=f"^{variable} must "):
        Settings.from_env({variable: value})


def test_the_sns_values_aws_takes_are_accepted() -> None:
    for region in ("us-east-1", "ap-southeast-2", "us-gov-west-1", "cn-north-1", "eu-central-2"):
        assert Settings.from_env({"TWOFACTOR_SNS_REGION": region}).sns.region == region
    for sender_id in ("Acme", "ACME-2FA", "a", "Acme2FA1234"):
        assert Settings.from_env({"TWOFACTOR_SNS_SENDER_ID": sender_id}).sns.sender_id == sender_id


BROKER_URLS_MISREAD = [
    # A base64 password pasted as it is: redis-py and kombu read "Xy" as the port and print a
    # traceback that quotes it.
    ("redis://:Xy/9Qz+base64@127.0.0.1:6379/0", "its port is not a number from 0 to 65535"),
    ("redis://:pass?word@127.0.0.1:6379/0", "its port is not a number from 0 to 65535"),
    ("redis://:pass#word@127.0.0.1:6379/0", "its port is not a number from 0 to 65535"),
    # redis-py (the server) reads database 0 here and kombu (the worker) refuses it.
    ("redis://127.0.0.1:6379/deliveries", "the path after the host must be the database number"),
    ("redis://:secret@:6379/0", "it names no host"),
    ("redis://:s3cr[et@127.0.0.1:6379/0", "a [ or ] outside an IPv6 host"),
    ("redis://:s3cr]et@127.0.0.1:6379/0", "a [ or ] outside an IPv6 host"),
]


@pytest.mark.parametrize(("url", "problem"), BROKER_URLS_MISREAD, ids=[url for url, _ in BROKER_URLS_MISREAD])
def test_a_broker_url_redis_py_or_kombu_would_misread_is_refused_before_anything_starts(
    tmp_path: Path, url: str, problem: str
) -> None:
    """One line naming the variable and none of the URL, in the server and the worker, before
    either opens the database (this one does not exist: its refusal would be another line)."""
    database = "postgresql://postgres@127.0.0.1:5432/tf_never_created"
    password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]  # as typed, before any parsing
    for command in ("serve", "worker"):
        env = clean_env(LISTEN="127.0.0.1:0", DATA_DIR=str(tmp_path), DATABASE_URL=database, BROKER_URL=url)
        env |= {"TWOFACTOR_KEYS": TEST_KEYS, "TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true"}
        result = subprocess.run([TWOFACTOR, command], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr == (
            f"twofactor: configuration error: TWOFACTOR_BROKER_URL: can't read this URL ({problem}"
            + (", as in redis://host:6379/0" if "database number" in problem else "")
            + "): percent-encode the user name and password (% as %25, / as %2F, ? as %3F, # as %23, "
            "[ as %5B, ] as %5D, @ as %40, : as %3A)\n"
        ), command
        assert not password or password[:2] not in result.stderr.partition("(")[2].partition(")")[0]


def test_a_percent_encoded_broker_password_reaches_redis_py_and_kombu_as_it_was_meant() -> None:
    """What the refusal asks for works: the server's redis-py and the worker's kombu read the
    same password, host, port and database from the encoded URL; an unencoded @ or : (which
    both read right) and a URL with no database stay accepted."""
    import kombu.utils.url
    import redis.connection

    for url, password, db, virtual_host in (
        ("redis://:Xy%2F9Qz%2Bbase64%3F%23@127.0.0.1:6379/3", "Xy/9Qz+base64?#", 3, "3"),
        ("redis://:p@ss:word@127.0.0.1:6379/0", "p@ss:word", 0, "0"),
        ("rediss://default:s3cret@127.0.0.1:6379", "s3cret", 0, None),  # kombu's default: 0
        ("redis://:s3cret@127.0.0.1:6379//", "s3cret", 0, "/"),  # AMQP's default vhost: 0 to both
    ):
        assert Settings.from_env({"TWOFACTOR_BROKER_URL": url}).broker_url == url
        server = redis.connection.parse_url(url)
        worker = kombu.utils.url.parse_url(url)
        read_by_server = (server["password"], server["host"], server["port"], server.get("db", 0))
        assert read_by_server == (password, "127.0.0.1", 6379, db)
        read_by_worker = (worker["password"], worker["hostname"], worker["port"], worker["virtual_host"])
        assert read_by_worker == (password, "127.0.0.1", 6379, virtual_host)


@pytest.mark.parametrize(
    "value",
    [
        "twofactor@acme@example.com",  # every code would go out from <>
        "security@acme.example, alerts@acme.example",
        "Acme <security@acme.example> trailing",
        "sec urity@acme.example",
        "security@",
        "security@[127.0.0.1]",
    ],
)
def test_an_smtp_from_that_is_not_one_address_is_refused_at_start(value: str) -> None:
    with pytest.raises(SettingsError, match=r"^TWOFACTOR_SMTP_FROM must be one address, such as "):
        Settings.from_env({"TWOFACTOR_SMTP_FROM": value})


@pytest.mark.parametrize(
    "value",
    [
        "security@acme.example",
        "Acme Security <security@acme.example>",  # the README's display name of its own
        '"Acme Security" <security@acme.example>',
        "Sécurité Acme <security@acme.example>",
        "alerts@localhost",
        "noreply@acme.example.",  # a rooted host name
        "security@mail_relay.internal",  # an internal host with _
    ],
)
def test_an_smtp_from_with_or_without_a_display_name_is_accepted(value: str) -> None:
    assert Settings.from_env({"TWOFACTOR_SMTP_FROM": value}).smtp.from_address == value


def test_a_token_pasted_in_place_of_its_entry_is_refused_without_showing_it(tmp_path: Path) -> None:
    """`twofactor token` prints the token and its entry; the token in TWOFACTOR_TOKENS must not
    reach the log that says it is wrong: it is the caller's live secret."""
    token = "sLZKrrrb1WO6WWUizx-uFbu3gxRSuOnV9tQ_4JwUpoo"
    entry = f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}"
    for value, where in ((token, ""), (f"{entry},{token}", " (entry 2 of 2)")):
        env = clean_env(TOKENS=value, DATA_DIR=str(tmp_path))
        result = subprocess.run([TWOFACTOR, "serve"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr == (
            f"twofactor: configuration error: TWOFACTOR_TOKENS{where}: an entry is not "
            "name:scopes:sha256hex (the `TWOFACTOR_TOKENS entry:` line of `twofactor token`, not the "
            "token itself)\n"
        )
        assert token[:8] not in result.stdout + result.stderr


def token_entry_for(name: str, scopes: str, token: str) -> str:
    return f"{name}:{scopes}:{hashlib.sha256(token.encode()).hexdigest()}"


def test_one_token_in_two_disagreeing_entries_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server takes the last entry whose digest matches: the same token listed under two names
    (or two scope sets) would act, and be audited, as whichever comes last."""
    value = ",".join(
        (
            token_entry_for("login-backend", "app", APP_TOKEN),
            token_entry_for("ops", "admin", "another-token"),
            token_entry_for("support-desk", "app+admin", APP_TOKEN),
        )
    )
    for name in list(os.environ):
        if name.startswith("TWOFACTOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TWOFACTOR_TOKENS", value)
    assert main(["config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "twofactor: configuration error: TWOFACTOR_TOKENS (entry 3 of 3): entry 'support-desk' holds "
        "the same token as entry 1 ('login-backend') with another name or scopes: remove one of them, "
        "or give one a new token (`twofactor token NAME SCOPES`)\n"
    )


def test_a_rotation_keeps_the_name_and_a_repeated_entry_is_harmless() -> None:
    """The README's rotation appends the caller's new token under the same name: both stay valid
    and both are audited as that caller, so two entries of one name are taken."""
    old = token_entry_for("login-backend", "app", "old-token")
    new = token_entry_for("login-backend", "app", APP_TOKEN)
    settings = Settings.from_env({"TWOFACTOR_TOKENS": f"{old},{new},{new}"})
    assert [token.name for token in settings.tokens] == ["login-backend"] * 3
