"""Every RPC of both services through the SDK, against the real server.

The server runs on the embedded SQLite store (the SDK doesn't care which
store answers) with the test clock, so TOTP codes are computed with pyotp and
nothing sleeps. SMS codes are read from a capturing SMS provider that the
server loads by dotted path, like an operator's own gateway class.
"""

from __future__ import annotations

import asyncio
import datetime
import queue
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pyotp
import pytest
import twofactor
from twofactor import Method

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, Clock, Harness, ServerFactory
from twofactor_server.app import MAX_REQUEST_BYTES
from twofactor_server.delivery.providers import SmsMessage

WAIT = 10.0  # the bound on every wait in this module, in seconds
AUTHENTICATOR, EMAIL, SMS = Method.METHOD_AUTHENTICATOR, Method.METHOD_EMAIL, Method.METHOD_SMS


class CapturingSms:
    """An SMS provider class the server builds by dotted path; every instance shares the outbox."""

    outbox: queue.Queue[SmsMessage] = queue.Queue()

    def send_sms(self, message: SmsMessage) -> str:
        self.outbox.put(message)
        return f"captured-{self.outbox.qsize()}"


SMS_PROVIDER = f"{__name__}:CapturingSms"


def next_sms_code(to: str) -> str:
    message = CapturingSms.outbox.get(timeout=WAIT)
    assert message.to == to
    match = re.search(r"\b(\d{6,10})\b", message.text)
    assert match is not None, message.text
    return match.group(1)


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def server(start_server: ServerFactory) -> Iterator[Harness]:
    while not CapturingSms.outbox.empty():
        CapturingSms.outbox.get_nowait()
    yield start_server(sms_provider=SMS_PROVIDER)


@pytest.fixture
def client(server: Harness) -> Iterator[twofactor.TwoFactorClient]:
    with twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client:
        yield client


@pytest.fixture
def admin(server: Harness) -> Iterator[twofactor.AdminClient]:
    with twofactor.AdminClient(server.target, token=ADMIN_TOKEN) as admin:
        yield admin


def totp(secret: str, clock: Clock) -> str:
    return pyotp.TOTP(secret).at(clock.now)


def enroll_authenticator(
    client: twofactor.TwoFactorClient, clock: Clock, user_id: str
) -> tuple[str, list[str]]:
    start = client.start_enrollment(
        user_id=user_id, method=AUTHENTICATOR, account_name=f"{user_id}@example.com"
    )
    confirm = client.confirm_enrollment(
        user_id=user_id, method=AUTHENTICATOR, code=totp(start.authenticator.secret, clock)
    )
    assert confirm.confirmed
    clock.advance(30)  # the confirming code can't be used again
    return start.authenticator.secret, list(confirm.backup_codes)


# --- TwoFactorService ---------------------------------------------------------------


def test_authenticator_enrollment_verify_and_backup_codes(
    client: twofactor.TwoFactorClient, clock: Clock
) -> None:
    status = client.get_status(user_id="alice")
    assert list(status.enabled_methods) == []
    assert set(status.allowed_methods) == {AUTHENTICATOR, EMAIL, SMS}

    start = client.start_enrollment(
        user_id="alice",
        method=AUTHENTICATOR,
        account_name="alice@example.com",
        qr_formats=[twofactor.QrCodeFormat.QR_CODE_FORMAT_PNG],
    )
    assert start.method == AUTHENTICATOR
    assert start.WhichOneof("setup") == "authenticator"
    assert start.authenticator.otpauth_uri.startswith("otpauth://totp/")
    assert start.authenticator.qr_png.startswith(b"\x89PNG") and start.authenticator.qr_svg == ""
    assert list(client.get_status(user_id="alice").pending_methods) == [AUTHENTICATOR]

    confirm = client.confirm_enrollment(
        user_id="alice", method=AUTHENTICATOR, code=totp(start.authenticator.secret, clock)
    )
    assert confirm.confirmed and confirm.result == twofactor.ConfirmResult.CONFIRM_RESULT_CONFIRMED
    assert list(confirm.enabled_methods) == [AUTHENTICATOR]
    assert len(confirm.backup_codes) == 10

    clock.advance(30)
    accepted = client.verify(user_id="alice", code=totp(start.authenticator.secret, clock))
    assert accepted.result == twofactor.VerifyResult.VERIFY_RESULT_ACCEPTED
    assert accepted.matched == twofactor.CodeKind.CODE_KIND_AUTHENTICATOR

    with pytest.raises(twofactor.StepUpRequired) as raised:
        client.get_backup_codes(user_id="alice")
    assert raised.value.reason == "STEP_UP_REQUIRED"
    shown = client.get_backup_codes(user_id="alice", verification_token=accepted.verification_token)
    assert sorted(shown.codes) == sorted(confirm.backup_codes)
    backup = client.verify(user_id="alice", code=shown.codes[0])
    assert backup.matched == twofactor.CodeKind.CODE_KIND_BACKUP_CODE
    assert backup.backup_codes_remaining == 9

    regenerated = client.regenerate_backup_codes(
        user_id="alice", verification_token=backup.verification_token
    )
    assert len(regenerated.codes) == 10
    assert set(regenerated.codes).isdisjoint(confirm.backup_codes)
    stale = client.verify(user_id="alice", code=shown.codes[1])
    assert stale.result == twofactor.VerifyResult.VERIFY_RESULT_REJECTED

    # Regenerating spent the proof: disabling needs a new one.
    with pytest.raises(twofactor.StepUpRequired):
        client.disable_method(
            user_id="alice", method=AUTHENTICATOR, verification_token=backup.verification_token
        )
    clock.advance(30)
    again = client.verify(user_id="alice", code=totp(start.authenticator.secret, clock))
    disabled = client.disable_method(
        user_id="alice", method=AUTHENTICATOR, verification_token=again.verification_token
    )
    assert list(disabled.enabled_methods) == []


def test_sms_enrollment_send_code_challenge_and_verify(
    client: twofactor.TwoFactorClient, clock: Clock
) -> None:
    contact = client.set_contact(user_id="bob", phone="+14155550123", email="bob@example.com")
    assert contact.masked_phone.endswith("0123")
    assert contact.masked_email.endswith("@example.com")

    start = client.start_enrollment(user_id="bob", method=SMS, locale="en")
    assert start.WhichOneof("setup") == "challenge"
    assert start.challenge.method == SMS
    confirm = client.confirm_enrollment(user_id="bob", method=SMS, code=next_sms_code("+14155550123"))
    assert confirm.confirmed
    assert list(confirm.enabled_methods) == [SMS]
    clock.advance(60)  # past the resend cooldown that the enrollment code started

    sent = client.send_code(user_id="bob", method=SMS, idempotency_key="login-1").challenge
    assert sent.method == SMS
    assert sent.masked_destination.endswith("0123")
    again = client.send_code(user_id="bob", method=SMS, idempotency_key="login-1").challenge
    assert again.challenge_id == sent.challenge_id  # the same challenge; nothing new sent
    code = next_sms_code("+14155550123")

    looked_up = client.get_challenge(user_id="bob", challenge_id=sent.challenge_id).challenge
    assert looked_up.challenge_id == sent.challenge_id
    assert looked_up.delivery_status in (
        twofactor.DeliveryStatus.DELIVERY_STATUS_SENDING,
        twofactor.DeliveryStatus.DELIVERY_STATUS_SENT,
    )

    verified = client.verify(user_id="bob", code=code)
    assert verified.result == twofactor.VerifyResult.VERIFY_RESULT_ACCEPTED
    assert verified.matched == twofactor.CodeKind.CODE_KIND_SMS
    assert CapturingSms.outbox.empty()


def test_request_id_reaches_the_audit_log(
    client: twofactor.TwoFactorClient, admin: twofactor.AdminClient
) -> None:
    client.set_contact(user_id="carol", email="carol@example.com", request_id="req-from-the-login-backend")

    (event,) = admin.iter_audit_events(user_id="carol")
    assert (event.action, event.request_id, event.actor) == (
        "contact_changed",
        "req-from-the-login-backend",
        "backend",
    )


# --- AdminService -------------------------------------------------------------------


def test_admin_calls(client: twofactor.TwoFactorClient, admin: twofactor.AdminClient, clock: Clock) -> None:
    for user_id in ("u1", "u2", "u3", "u4", "u5"):
        client.set_contact(user_id=user_id, email=f"{user_id}@example.com")
    enroll_authenticator(client, clock, "u3")

    assert admin.get_user(user_id="u1").user.masked_email.endswith("@example.com")
    first = admin.list_users(page_size=2)
    assert [u.user_id for u in first.users] == ["u1", "u2"]
    assert first.next_page_token
    assert [u.user_id for u in admin.iter_users(page_size=2)] == ["u1", "u2", "u3", "u4", "u5"]
    enabled = admin.iter_users(filter=twofactor.UserFilter.USER_FILTER_ENABLED)
    assert [u.user_id for u in enabled] == ["u3"]

    policy = admin.get_policy().policy
    assert policy.backup_code_count == 10
    assert policy.resend_cooldown.seconds == 30

    # Five wrong codes lock the user; an admin unlocks.
    for _ in range(5):
        client.verify(user_id="u3", code="000000")
    assert admin.get_user(user_id="u3").user.HasField("locked_until")
    unlocked = admin.unlock_user(user_id="u3").user
    assert not unlocked.HasField("locked_until")
    assert unlocked.failed_attempts == 0

    reset = admin.reset_user(user_id="u3", reason="lost phone").user
    assert list(reset.enabled_methods) == []
    assert reset.masked_email.endswith("@example.com")

    events = list(admin.iter_audit_events(user_id="u3", page_size=2))
    assert events[0].action == "user_reset"
    assert events[0].detail == "lost phone"
    assert [e.event_id for e in events] == sorted((e.event_id for e in events), reverse=True)
    assert len(admin.list_audit_events(user_id="u3", page_size=2).events) == 2
    # The filters of ListAuditEvents: actions and [since, until).
    changes = admin.iter_audit_events(actions=["user_reset", "user_unlocked"], page_size=1)
    assert [(e.action, e.user_id) for e in changes] == [("user_reset", "u3"), ("user_unlocked", "u3")]
    now = datetime.datetime.fromtimestamp(clock.now, datetime.UTC)
    assert list(admin.iter_audit_events(user_id="u3", until=now - datetime.timedelta(days=1))) == []
    assert admin.list_audit_events(actions=["user_reset"], since=now).events[0].detail == "lost phone"
    naive = now.replace(tzinfo=None)  # read as UTC
    assert len(admin.list_audit_events(user_id="u3", since=naive).events) >= 1
    with pytest.raises(twofactor.InvalidArgument):
        admin.list_audit_events(since=now, until=now)


# --- errors, as the SDK raises them -------------------------------------------------------


def test_not_enrolled(client: twofactor.TwoFactorClient) -> None:
    client.set_contact(user_id="dave", email="dave@example.com")

    with pytest.raises(twofactor.NotEnrolled) as verify_error:
        client.verify(user_id="dave", code="123456")
    with pytest.raises(twofactor.NotEnrolled) as pending_error:
        client.confirm_enrollment(user_id="dave", method=AUTHENTICATOR, code="123456")
    with pytest.raises(twofactor.NotEnrolled) as disable_error:
        client.disable_method(user_id="dave", method=EMAIL)
    with pytest.raises(twofactor.NotEnrolled) as backup_error:
        client.get_backup_codes(user_id="dave")

    assert verify_error.value.reason == "NOT_ENROLLED"
    assert pending_error.value.reason == "NO_PENDING_ENROLLMENT"
    assert disable_error.value.reason == "METHOD_NOT_ENABLED"
    assert backup_error.value.reason == "NOT_ENROLLED"
    assert isinstance(verify_error.value, twofactor.FailedPrecondition)
    assert verify_error.value.code is grpc.StatusCode.FAILED_PRECONDITION


def test_contact_missing(client: twofactor.TwoFactorClient) -> None:
    with pytest.raises(twofactor.ContactMissing) as email_error:
        client.start_enrollment(user_id="erin", method=EMAIL)
    with pytest.raises(twofactor.ContactMissing) as phone_error:
        client.start_enrollment(user_id="erin", method=SMS)

    assert (email_error.value.contact, phone_error.value.contact) == ("email", "phone")
    assert email_error.value.domain == "twofactor.v1"


def test_method_not_allowed(start_server: ServerFactory) -> None:
    server = start_server(policy={"allowed_methods": ("authenticator",)})

    with (
        twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client,
        pytest.raises(twofactor.MethodNotAllowed) as raised,
    ):
        client.start_enrollment(user_id="frank", method=SMS)

    assert raised.value.reason == "METHOD_NOT_ALLOWED"
    assert raised.value.metadata["method"] == "sms"


def test_last_method_required(start_server: ServerFactory, clock: Clock) -> None:
    server = start_server(policy={"force_two_factor": True})

    with twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client:
        assert client.get_status(user_id="gina").enrollment_required
        secret, _ = enroll_authenticator(client, clock, "gina")
        token = client.verify(user_id="gina", code=totp(secret, clock)).verification_token
        with pytest.raises(twofactor.LastMethodRequired):
            client.disable_method(user_id="gina", method=AUTHENTICATOR, verification_token=token)


def test_admin_reset_disabled(start_server: ServerFactory) -> None:
    server = start_server(policy={"allow_admin_reset": False})

    with twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client:
        client.set_contact(user_id="hank", email="hank@example.com")
    with (
        twofactor.AdminClient(server.target, token=ADMIN_TOKEN) as admin,
        pytest.raises(twofactor.AdminResetDisabled),
    ):
        admin.reset_user(user_id="hank", reason="support ticket 42")


def test_rate_limited_resend_too_soon(client: twofactor.TwoFactorClient, clock: Clock) -> None:
    client.set_contact(user_id="ivy", phone="+14155550124")
    client.start_enrollment(user_id="ivy", method=SMS)
    client.confirm_enrollment(user_id="ivy", method=SMS, code=next_sms_code("+14155550124"))
    clock.advance(60)
    client.send_code(user_id="ivy", method=SMS)
    clock.advance(10)

    with pytest.raises(twofactor.RateLimited) as raised:
        client.send_code(user_id="ivy", method=SMS)

    assert raised.value.reason == "RESEND_TOO_SOON"
    assert raised.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raised.value.retry_after == datetime.timedelta(seconds=20)


def test_rate_limited_user_send_limit(start_server: ServerFactory) -> None:
    server = start_server(
        sms_provider=SMS_PROVIDER, policy={"resend_cooldown_seconds": 0, "sends_per_user_per_hour": 1}
    )

    with twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client:
        client.set_contact(user_id="jack", phone="+14155550125")
        client.start_enrollment(user_id="jack", method=SMS)
        with pytest.raises(twofactor.RateLimited) as raised:
            client.start_enrollment(user_id="jack", method=SMS)

    assert raised.value.reason == "USER_SEND_LIMIT"
    assert raised.value.retry_after == datetime.timedelta(hours=1)


def test_unavailable_broker(start_server: ServerFactory) -> None:
    """A broker that can't be reached: UNAVAILABLE with reason BROKER_UNAVAILABLE."""
    server = start_server(broker_url="redis://127.0.0.1:1/0", broker_timeout_seconds=1.0)

    with twofactor.TwoFactorClient(server.target, token=APP_TOKEN, timeout=30) as client:
        client.set_contact(user_id="kate", email="kate@example.com")
        with pytest.raises(twofactor.Unavailable) as raised:
            client.start_enrollment(user_id="kate", method=EMAIL)

    assert raised.value.reason == "BROKER_UNAVAILABLE"
    assert raised.value.retry_after == datetime.timedelta(seconds=1)


def test_unauthenticated(server: Harness) -> None:
    with (
        twofactor.TwoFactorClient(server.target, token="wrong-token") as client,
        pytest.raises(twofactor.Unauthenticated) as raised,
    ):
        client.get_status(user_id="alice")

    assert raised.value.reason == "INVALID_TOKEN"


def test_permission_denied(server: Harness) -> None:
    with (
        twofactor.AdminClient(server.target, token=APP_TOKEN) as admin,
        pytest.raises(twofactor.PermissionDenied) as raised,
    ):
        admin.get_policy()
    with (
        twofactor.TwoFactorClient(server.target, token=ADMIN_TOKEN) as client,
        pytest.raises(twofactor.PermissionDenied),
    ):
        client.get_status(user_id="alice")

    assert raised.value.reason == "SCOPE_REQUIRED"
    assert raised.value.metadata == {"scope": "admin"}


def test_invalid_argument(client: twofactor.TwoFactorClient, admin: twofactor.AdminClient) -> None:
    reasons = {}
    for name, call in {
        "user_id": lambda: client.get_status(user_id=""),
        "method": lambda: client.start_enrollment(user_id="leo", method=Method.METHOD_UNSPECIFIED),
        "email": lambda: client.set_contact(user_id="leo", email="not an address"),
        "code": lambda: client.verify(user_id="leo", code="x"),
        "reason": lambda: admin.reset_user(user_id="leo", reason=""),
        "page_token": lambda: admin.list_users(page_token="bogus"),
    }.items():
        with pytest.raises(twofactor.InvalidArgument) as raised:
            call()
        reasons[name] = raised.value.reason

    assert reasons == {
        "user_id": "INVALID_USER_ID",
        "method": "INVALID_METHOD",
        "email": "INVALID_EMAIL",
        "code": "INVALID_CODE",
        "reason": "INVALID_REASON",
        "page_token": "INVALID_PAGE_TOKEN",
    }


def test_not_found(client: twofactor.TwoFactorClient, admin: twofactor.AdminClient) -> None:
    with pytest.raises(twofactor.NotFound) as user_error:
        admin.get_user(user_id="nobody")
    client.set_contact(user_id="mia", email="mia@example.com")
    with pytest.raises(twofactor.NotFound) as challenge_error:
        client.get_challenge(user_id="mia", challenge_id="0" * 32)

    assert (user_error.value.reason, user_error.value.metadata) == ("USER_NOT_FOUND", {"user_id": "nobody"})
    assert challenge_error.value.reason == "CHALLENGE_NOT_FOUND"


def test_a_request_past_the_servers_size_limit_is_not_a_rate_limit(server: Harness) -> None:
    """gRPC refuses a request over 64 KiB with RESOURCE_EXHAUSTED and no reason, as it does a send
    limit: a RateLimited would have the caller wait and send the same request again, forever."""
    oversized = "a" * (MAX_REQUEST_BYTES + 1)
    with (
        twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client,
        pytest.raises(twofactor.RequestTooLarge) as raised,
    ):
        client.set_contact(user_id="nia", email=oversized)

    async def scenario() -> twofactor.TwoFactorError:
        async with twofactor.AsyncTwoFactorClient(server.target, token=APP_TOKEN) as client:
            with pytest.raises(twofactor.RequestTooLarge) as raised:
                await client.verify(user_id=oversized, code="123456")
            return raised.value

    for error in (raised.value, asyncio.run(scenario())):
        assert isinstance(error, twofactor.InvalidArgument)
        assert not isinstance(error, twofactor.RateLimited)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.retry_after is None


@contextmanager
def server_busy(server: Harness) -> Iterator[None]:
    """Hold the embedded SQLite store's write lock from another connection: every
    call then waits inside the server (up to its busy timeout) until released."""
    blocker = sqlite3.connect(
        server.settings.data_dir / "twofactor.sqlite3", isolation_level=None, timeout=WAIT
    )
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_deadline_exceeded(server: Harness, client: twofactor.TwoFactorClient) -> None:
    with server_busy(server), pytest.raises(twofactor.DeadlineExceeded) as raised:
        client.get_status(user_id="alice", timeout=0.2)

    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert list(client.get_status(user_id="alice").enabled_methods) == []  # the channel is fine afterwards


# --- retries across a restart --------------------------------------------------------


@pytest.mark.parametrize("retried", [True, False])
def test_retry_carries_a_call_across_a_server_restart(
    start_server: ServerFactory, clock: Clock, retried: bool
) -> None:
    """The server stops; the client's first attempt fails; a new server on the same
    port (same database) answers a retry. Without retries the same call fails."""
    first = start_server()
    port = first.port
    # Slow, random retry backoffs against a fast reconnect: some attempt lands after the restart.
    policy = twofactor.RetryPolicy(max_attempts=5, initial_backoff=2, max_backoff=10, backoff_multiplier=2)
    reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    failed = threading.Event()
    restarted: list[Harness] = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            failed.set()

    def restart() -> None:
        if failed.wait(WAIT):  # only after the client has failed to connect
            restarted.append(start_server(listen=f"127.0.0.1:{port}"))

    restarter = threading.Thread(target=restart)
    with twofactor.TwoFactorClient(
        first.target, token=APP_TOKEN, retry=policy if retried else None, options=reconnect
    ) as client:
        enroll_authenticator(client, clock, "nina")
        first.channel.close()
        first.server.stop(grace=None)
        client.channel.subscribe(watch)
        restarter.start()
        try:
            if retried:
                status = client.get_status(user_id="nina", timeout=40)
            else:
                with pytest.raises(twofactor.Unavailable):
                    client.get_status(user_id="nina", timeout=40)
        finally:
            restarter.join(WAIT)
            client.channel.unsubscribe(watch)

    assert failed.is_set()
    assert len(restarted) == 1
    assert restarted[0].port == port
    if retried:
        assert list(status.enabled_methods) == [AUTHENTICATOR]  # the new server, same database


# --- the async clients -----------------------------------------------------------------


def test_async_clients(server: Harness, clock: Clock) -> None:
    async def scenario() -> None:
        async with twofactor.AsyncTwoFactorClient(server.target, token=APP_TOKEN) as client:
            await client.set_contact(user_id="olga", phone="+14155550126")
            with pytest.raises(twofactor.ContactMissing) as raised:
                await client.start_enrollment(user_id="olga", method=EMAIL)
            assert raised.value.contact == "email"

            start = await client.start_enrollment(
                user_id="olga", method=AUTHENTICATOR, qr_formats=[twofactor.QrCodeFormat.QR_CODE_FORMAT_SVG]
            )
            assert start.authenticator.qr_svg.startswith("<svg") and start.authenticator.qr_png == b""
            secret = start.authenticator.secret
            confirm = await client.confirm_enrollment(
                user_id="olga", method=AUTHENTICATOR, code=totp(secret, clock)
            )
            assert confirm.confirmed
            clock.advance(30)
            verified = await client.verify(user_id="olga", code=totp(secret, clock))
            assert verified.result == twofactor.VerifyResult.VERIFY_RESULT_ACCEPTED

            await client.start_enrollment(
                user_id="olga", method=SMS, verification_token=verified.verification_token
            )
            code = await asyncio.to_thread(next_sms_code, "+14155550126")
            assert (await client.confirm_enrollment(user_id="olga", method=SMS, code=code)).confirmed
            clock.advance(60)
            challenge = (await client.send_code(user_id="olga", method=SMS)).challenge
            assert (await client.get_challenge(user_id="olga", challenge_id=challenge.challenge_id)).challenge
            code = await asyncio.to_thread(next_sms_code, "+14155550126")
            verified = await client.verify(user_id="olga", code=code)
            assert verified.matched == twofactor.CodeKind.CODE_KIND_SMS

            with pytest.raises(twofactor.StepUpRequired):
                await client.get_backup_codes(user_id="olga")
            token = verified.verification_token
            codes = (await client.get_backup_codes(user_id="olga", verification_token=token)).codes
            regenerated = await client.regenerate_backup_codes(user_id="olga", verification_token=token)
            assert len(regenerated.codes) == len(codes)
            clock.advance(30)
            token = (await client.verify(user_id="olga", code=totp(secret, clock))).verification_token
            disabled = await client.disable_method(user_id="olga", method=SMS, verification_token=token)
            assert list(disabled.enabled_methods) == [AUTHENTICATOR]
            assert list((await client.get_status(user_id="olga")).enabled_methods) == [AUTHENTICATOR]
            with server_busy(server), pytest.raises(twofactor.DeadlineExceeded):
                await client.get_status(user_id="olga", timeout=0.2)

        async with twofactor.AsyncAdminClient(server.target, token=ADMIN_TOKEN) as admin:
            assert (await admin.get_user(user_id="olga")).user.user_id == "olga"
            assert [u.user_id async for u in admin.iter_users()] == ["olga"]
            assert (await admin.list_users()).users[0].user_id == "olga"
            assert (await admin.get_policy()).policy.issuer
            assert (await admin.unlock_user(user_id="olga")).user.failed_attempts == 0
            assert list((await admin.reset_user(user_id="olga", reason="test")).user.enabled_methods) == []
            actions = [e.action async for e in admin.iter_audit_events(user_id="olga", page_size=3)]
            assert actions[0] == "user_reset"
            assert (await admin.list_audit_events(user_id="olga")).events[0].action == "user_reset"
            later = datetime.datetime.fromtimestamp(clock.now + 1, datetime.UTC)
            assert (await admin.list_audit_events(user_id="olga", since=later)).events == []
            resets = [e.action async for e in admin.iter_audit_events(actions=["user_reset"], until=later)]
            assert resets == ["user_reset"]
            with pytest.raises(twofactor.NotFound):
                await admin.get_user(user_id="nobody")

    asyncio.run(scenario())


def test_a_new_phone_for_sms_is_confirmed_through_the_sdk(
    client: twofactor.TwoFactorClient, clock: Clock
) -> None:
    client.set_contact(user_id="mia", phone="+14155550126")
    client.start_enrollment(user_id="mia", method=SMS)
    enabled = client.confirm_enrollment(user_id="mia", method=SMS, code=next_sms_code("+14155550126"))

    with pytest.raises(twofactor.ContactInUse) as in_use:
        client.set_contact(user_id="mia", phone="", verification_token=enabled.verification_token)
    assert in_use.value.contact == "phone"
    with pytest.raises(twofactor.NoPendingContactChange):
        client.confirm_contact(user_id="mia", method=SMS, code="123456")

    clock.advance(31)  # the confirmation code is a send: past the resend cooldown
    change = client.set_contact(
        user_id="mia", phone="+14155550127", verification_token=enabled.verification_token
    )
    assert change.masked_phone == "+1******0126"
    assert change.phone_confirmation.masked_destination == "+1******0127"
    confirmed = client.confirm_contact(user_id="mia", method=SMS, code=next_sms_code("+14155550127"))
    assert confirmed.result == twofactor.ConfirmResult.CONFIRM_RESULT_CONFIRMED
    assert confirmed.masked_phone == "+1******0127" and confirmed.verification_token


def test_the_async_client_confirms_a_contact_too(server: Harness, clock: Clock) -> None:
    async def scenario() -> twofactor.ConfirmResult.ValueType:
        async with twofactor.AsyncTwoFactorClient(server.target, token=APP_TOKEN) as client:
            await client.set_contact(user_id="ned", phone="+14155550128")
            await client.start_enrollment(user_id="ned", method=SMS)
            code = await asyncio.to_thread(next_sms_code, "+14155550128")
            enabled = await client.confirm_enrollment(user_id="ned", method=SMS, code=code)
            clock.advance(31)
            await client.set_contact(
                user_id="ned", phone="+14155550129", verification_token=enabled.verification_token
            )
            code = await asyncio.to_thread(next_sms_code, "+14155550129")
            wrong = "000000" if code != "000000" else "111111"
            rejected = await client.confirm_contact(user_id="ned", method=SMS, code=wrong)
            assert rejected.result == twofactor.ConfirmResult.CONFIRM_RESULT_REJECTED
            return (await client.confirm_contact(user_id="ned", method=SMS, code=code)).result

    assert asyncio.run(scenario()) == twofactor.ConfirmResult.CONFIRM_RESULT_CONFIRMED
