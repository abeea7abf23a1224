"""bench/populate.py writes the rows the product writes: users enrolled in bulk verify over gRPC with
their TOTP codes and backup codes, get email codes by SendCode, and their rows have the shape of a
user enrolled through the real server, column by column."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pyotp
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import AUTHENTICATOR, EMAIL, verified_token, verify
from tests.server.stored_rows import query
from tests.smtp_sink import SmtpSink, code_in
from twofactor_server.settings import Settings

BENCH = Path(__file__).resolve().parents[2] / "bench"
USERS = 50
EMAIL_EVERY = 5


def load_populate() -> ModuleType:
    """bench/ is a folder of scripts, not a package: load the module from its file."""
    spec = importlib.util.spec_from_file_location("populate", BENCH / "populate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["populate"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


populate = load_populate()


@pytest.fixture
def server(sink: SmtpSink, postgres_url: str, start_server: ServerFactory) -> Harness:
    # The sink first, so it is torn down after the server's delivery threads are done with it.
    return start_server(database_url=postgres_url, email_provider="smtp", smtp=sink.settings())


@pytest.fixture
def settings(tmp_path: Path, postgres_url: str) -> Settings:
    from tests.conftest import base_settings

    return base_settings(tmp_path, database_url=postgres_url)


def populated(server: Harness, clock: Clock, count: int = USERS) -> list[Any]:
    population = populate.Population(
        count,
        prefix="bulk-",
        keys=TEST_KEYS,
        now_ms=int(clock.now * 1000),
        email_every=EMAIL_EVERY,
        actor="backend",  # the app token's name in tests/conftest.py
    )
    users: list[Any] = populate.populate(
        server.settings.database_url, population, keep=range(count), processes=1, chunk=20
    )
    assert [u.index for u in users] == list(range(count))
    return users


def test_users_populated_in_bulk_verify_over_grpc(server: Harness, sink: SmtpSink, clock: Clock) -> None:
    users = populated(server, clock)
    for user in users:
        code = pyotp.TOTP(user.secret_base32).at(clock.now)
        assert verify(server, user.user_id, code).result == pb.VERIFY_RESULT_ACCEPTED, user.user_id
        # The step is used up now (the replay guard the bulk rows carry too).
        assert verify(server, user.user_id, code).result == pb.VERIFY_RESULT_REJECTED
        wrong = pyotp.TOTP(user.secret_base32).at(clock.now + 600)
        assert verify(server, user.user_id, wrong).result == pb.VERIFY_RESULT_REJECTED
    status = server.twofactor.GetStatus(
        pb.GetStatusRequest(user_id=users[1].user_id), metadata=server.app_metadata
    )
    assert list(status.enabled_methods) == [AUTHENTICATOR]
    assert status.backup_codes_remaining == 10


def test_backup_codes_of_populated_users_work_once(server: Harness, clock: Clock) -> None:
    users = populated(server, clock, count=6)
    for user in users:
        first, second = user.backup_codes[0], user.backup_codes[-1]
        assert verify(server, user.user_id, first).result == pb.VERIFY_RESULT_ACCEPTED
        assert verify(server, user.user_id, first).result == pb.VERIFY_RESULT_REJECTED
        assert verify(server, user.user_id, second).result == pb.VERIFY_RESULT_ACCEPTED
        # Shown again (decrypted with the keyring) to a caller with a step-up proof: the rest of the set.
        token = verified_token(server, clock, user.user_id, user.secret_base32)
        shown = server.twofactor.GetBackupCodes(
            pb.GetBackupCodesRequest(user_id=user.user_id, verification_token=token),
            metadata=server.app_metadata,
        )
        assert sorted(shown.codes) == sorted(user.backup_codes[1:-1])


def test_populated_email_users_get_codes_by_send_code(server: Harness, sink: SmtpSink, clock: Clock) -> None:
    users = [u for u in populated(server, clock) if u.email]
    assert len(users) == USERS // EMAIL_EVERY
    for user in users:
        before = len(sink.messages)
        sent = server.twofactor.SendCode(
            pb.SendCodeRequest(user_id=user.user_id, method=EMAIL), metadata=server.app_metadata
        )
        message = sink.wait_for_messages(before + 1)[-1]
        assert message["To"] == user.email
        assert sent.challenge.challenge_id
        assert verify(server, user.user_id, code_in(message)).result == pb.VERIFY_RESULT_ACCEPTED
    status = server.twofactor.GetStatus(
        pb.GetStatusRequest(user_id=users[0].user_id), metadata=server.app_metadata
    )
    assert sorted(status.enabled_methods) == sorted([AUTHENTICATOR, EMAIL])


# ---- the rows themselves, against a user enrolled through the server ------------------------

COUNTS = {
    "failed_attempts",
    "credential_epoch",
    "position",
    "attempts",
    "delivery_attempts",
    "publish_generation",
    "backup_codes_unused",
    "secret_version",
}
LITERAL = {"method", "purpose", "locale", "delivery_status", "actor", "action", "outcome", "detail"}


def shape(row: dict[str, Any]) -> dict[str, Any]:
    """A row with what differs between two users of the same history taken out: ids, times and
    random bytes become what kind of value they are (bytes keep their length and key version)."""
    shaped: dict[str, Any] = {}
    for column, value in row.items():
        if column == "event_id":
            continue
        if value is None:
            shaped[column] = None
        elif isinstance(value, (bytes, memoryview)):
            raw = bytes(value)
            shaped[column] = ("bytes", len(raw), raw[:4])
        elif column in COUNTS or column in LITERAL:
            shaped[column] = value
        elif isinstance(value, int):
            shaped[column] = "time"
        else:
            shaped[column] = ("text", column)
    return shaped


def rows_of(settings: Settings, user_id: str) -> dict[str, list[dict[str, Any]]]:
    tables = {
        "users": "SELECT * FROM users WHERE user_id = %(u)s",
        "methods": "SELECT * FROM methods WHERE user_id = %(u)s ORDER BY method",
        "backup_codes": "SELECT * FROM backup_codes WHERE user_id = %(u)s ORDER BY position",
        "verify_state": "SELECT * FROM verify_state WHERE user_id = %(u)s",
        "audit_events": "SELECT * FROM audit_events WHERE user_id = %(u)s ORDER BY event_id",
        # Retention keeps challenges a day past expiry: the bulk rows hold the last login code only.
        "challenges": "SELECT * FROM challenges WHERE user_id = %(u)s AND purpose = 'login'",
    }
    return {name: [shape(r) for r in query(settings, sql, {"u": user_id})] for name, sql in tables.items()}


def enroll_through_the_server(h: Harness, sink: SmtpSink, clock: Clock, user_id: str) -> None:
    """What populate.py writes for an email user, done through the API: the authenticator, then
    the email address and the email method (each with a step-up proof), then a login code by email."""
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR), metadata=h.app_metadata
    )
    secret = start.authenticator.secret
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id=user_id, method=AUTHENTICATOR, code=pyotp.TOTP(secret).at(clock.now)
        ),
        metadata=h.app_metadata,
    )
    assert confirm.confirmed
    clock.advance(30)
    token = verified_token(h, clock, user_id, secret)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com", verification_token=token),
        metadata=h.app_metadata,
    )
    token = verified_token(h, clock, user_id, secret)
    before = len(sink.messages)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=EMAIL, verification_token=token),
        metadata=h.app_metadata,
    )
    code = code_in(sink.wait_for_messages(before + 1)[-1])
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user_id, method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert confirmed.confirmed
    clock.advance(31)  # past the resend cooldown
    before = len(sink.messages)
    h.twofactor.SendCode(pb.SendCodeRequest(user_id=user_id, method=EMAIL), metadata=h.app_metadata)
    login_code = code_in(sink.wait_for_messages(before + 1)[-1])
    assert verify(h, user_id, login_code).result == pb.VERIFY_RESULT_ACCEPTED
    # Delivery records 'sent' after the SMTP server took the message: wait for that row.
    for _ in range(600):
        rows = query(
            h.settings,
            "SELECT delivery_status FROM challenges WHERE user_id = %(u)s AND purpose = 'login'",
            {"u": user_id},
        )
        if rows and rows[0]["delivery_status"] == "sent":
            return
        import time

        time.sleep(0.05)
    raise AssertionError("the login code's delivery was never recorded as sent")


def test_bulk_rows_have_the_shape_of_an_enrollment_through_the_server(
    server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    enroll_through_the_server(server, sink, clock, "through-the-api")
    bulk = next(u for u in populated(server, clock, count=EMAIL_EVERY + 1) if u.email)
    expected = rows_of(server.settings, "through-the-api")
    assert rows_of(server.settings, bulk.user_id) == expected
    # And an authenticator-only user: the same rows up to the backup codes, nothing about email.
    plain = populate.Population(
        1, prefix="plain-", keys=TEST_KEYS, now_ms=int(clock.now * 1000), email_every=0, actor="backend"
    )
    populate.populate(server.settings.database_url, plain)
    rows = rows_of(server.settings, plain.user_id(0))
    assert rows["methods"] == [expected["methods"][0]]
    assert rows["backup_codes"] == expected["backup_codes"]
    assert rows["verify_state"] == [{**expected["verify_state"][0], "secret_version": 2}]
    assert rows["audit_events"] == expected["audit_events"][:3]
    assert rows["challenges"] == []
    assert rows["users"][0] == {**expected["users"][0], "email": None, "credential_epoch": 1}
