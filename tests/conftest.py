"""Fixtures that start the real thing: PostgreSQL schemas, the embedded SQLite
store, and the gRPC server on a free port over a real channel."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from moto.server import ThreadedMotoServer
from twofactor.v1 import admin_service_pb2_grpc, twofactor_service_pb2_grpc

from tests.smtp_sink import SmtpSink, running_sink
from twofactor_server.app import TwoFactorServer, create_server
from twofactor_server.domain.keyring import Keyring
from twofactor_server.observability.logs import ContextFilter, JsonFormatter
from twofactor_server.settings import PolicySettings, Settings, TokenSetting
from twofactor_server.storage.database import Database, open_database

# The shared services the suite uses; the environment can point elsewhere (today's values are the defaults).
POSTGRES_ADMIN_URL = os.environ.get(
    "TWOFACTOR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TWOFACTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
APP_TOKEN = "test-app-token"
ADMIN_TOKEN = "test-admin-token"
TEST_KEYS = Keyring.new_key_spec(1)
TOKENS = (
    TokenSetting("backend", frozenset({"app"}), hashlib.sha256(APP_TOKEN.encode()).digest()),
    TokenSetting("operator", frozenset({"admin"}), hashlib.sha256(ADMIN_TOKEN.encode()).digest()),
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def without_password(url: str) -> str:
    """A service URL fit for a message: any password is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def require_service(name: str, error: Exception) -> None:
    """Without the service: fail in CI (it must be there), skip on a developer's machine."""
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class Clock:
    """A clock the test moves by hand, so expiry and lockouts need no sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def postgres_available() -> None:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as error:
        require_service(f"PostgreSQL at {without_password(POSTGRES_ADMIN_URL)}", error)


@pytest.fixture
def postgres_url(postgres_available: None) -> Iterator[str]:
    """A fresh schema for one test; the URL makes it the search path."""
    schema = f"tf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        separator = "&" if urlsplit(POSTGRES_ADMIN_URL).query else "?"
        yield f"{POSTGRES_ADMIN_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# Notices (emails about changes) are off unless a test is about them: the tests that count
# the messages reaching a sink count codes. tests/server/test_notices.py turns them on.
TEST_POLICY = PolicySettings(notify_users=False)


def base_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        keys=TEST_KEYS,
        tokens=TOKENS,
        max_workers=64,
        # tests read codes from console senders
        **{"allow_console_delivery": True, "policy": TEST_POLICY, **overrides},
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else ""
    return base_settings(tmp_path, database_url=url)


@dataclass
class Harness:
    """A running server and stubs on a real channel to it."""

    server: TwoFactorServer
    port: int
    channel: grpc.Channel
    twofactor: twofactor_service_pb2_grpc.TwoFactorServiceStub
    admin: admin_service_pb2_grpc.AdminServiceStub
    settings: Settings
    app_metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {APP_TOKEN}"),)
    admin_metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


ServerFactory = Callable[..., Harness]


def started_harness(chosen: Settings, clock: Clock, *, dispatcher: Any = None) -> Harness:
    """A server started from these settings, with stubs on a real channel to it (the caller stops it)."""
    server, port = create_server(chosen, clock=clock, dispatcher=dispatcher)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Harness(
        server,
        port,
        channel,
        twofactor_service_pb2_grpc.TwoFactorServiceStub(channel),
        admin_service_pb2_grpc.AdminServiceStub(channel),
        chosen,
    )


@pytest.fixture
def start_server(settings: Settings, clock: Clock) -> Iterator[ServerFactory]:
    """Start a server; keyword arguments replace Settings fields (`policy=` takes policy fields)."""
    started: list[Harness] = []

    def start(*, dispatcher: Any = None, **overrides: Any) -> Harness:
        policy = overrides.pop("policy", None)
        chosen = replace(settings, **overrides)
        if policy:
            chosen = replace(chosen, policy=replace(TEST_POLICY, **policy))
        harness = started_harness(chosen, clock, dispatcher=dispatcher)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.channel.close()
        harness.server.stop(grace=None)


@pytest.fixture
def harness(start_server: ServerFactory) -> Harness:
    return start_server()


@pytest.fixture
def other_connection(settings: Settings) -> Iterator[Database]:
    """A database connection of the test's own, as another process (`twofactor keys rotate`) has."""
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=30)
    db.migrate()  # a no-op behind a server that migrated first
    yield db
    db.close()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials for boto3's default chain; nothing from this machine's AWS config."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) on a free port, for this test."""
    with running_sink(SmtpSink()) as running:
        yield running


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's SNS in server mode, over real HTTP on 127.0.0.1."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        # stop() shuts the loop down but leaves the listening socket open (a ResourceWarning).
        server._server.server_close()  # type: ignore[union-attr]


class _LogLines(logging.Handler):
    """Every record the service's own loggers write during a test, at DEBUG, formatted as JSON."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(JsonFormatter())
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


# What a secret looks like in a line: the test tokens, a backup code, a base32 TOTP secret.
_LEAKS = re.compile(
    "|".join(
        [
            re.escape(APP_TOKEN),
            re.escape(ADMIN_TOKEN),
            r"\b[0-9abcdefghjkmnpqrstvwxyz]{5}-[0-9abcdefghjkmnpqrstvwxyz]{5}\b",
            r"\b[A-Z2-7]{32,}\b",
        ]
    )
)


@pytest.fixture(autouse=True)
def root_logging_left_as_found() -> Iterator[None]:
    """A test that runs the CLI in this process (`main(["config"])`) points the root logger at
    the stderr pytest captured for that test. Left there, records that later tests' threads log
    (an SMTP sink's, a pool's) hit that stream once closed: "--- Logging error ---" tracebacks
    in the suite's output."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before and type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """Scans every line the server and workers log in every test (tests/server/test_logs.py also
    checks each code and secret it exchanged by value)."""
    handler = _LogLines()
    loggers = [logging.getLogger(name) for name in ("twofactor_server", "twofactor_workers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    leaks = [line for line in handler.lines if _LEAKS.search(line)]
    assert leaks == [], f"secrets in log lines: {leaks[:5]}"
