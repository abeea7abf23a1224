"""AdminService end to end over a real gRPC channel, on SQLite and PostgreSQL: reset, unlock, users,
policy and the audit log."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    LOCKED_FOR_GOOD_AFTER_3,
    SMS,
    CountingDatabase,
    enroll_authenticator,
    error_info,
    totp_now,
    verify,
)
from tests.server.stored_rows import query
from tests.server.test_backup_codes import wait_until_waiting
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.storage.store import WITHDRAWN_REASON
from twofactor_server.usecases.admin import Admin

Metadata = tuple[tuple[str, str], ...]


def app(h: Harness, request_id: str) -> Metadata:
    return (*h.app_metadata, ("x-request-id", request_id))


def admin(h: Harness, request_id: str) -> Metadata:
    return (*h.admin_metadata, ("x-request-id", request_id))


def get_user(h: Harness, user_id: str) -> admin_pb.User:
    return h.admin.GetUser(admin_pb.GetUserRequest(user_id=user_id), metadata=h.admin_metadata).user


def reset(h: Harness, user_id: str, reason: str = "lost phone", request_id: str = "") -> admin_pb.User:
    metadata = admin(h, request_id) if request_id else h.admin_metadata
    return h.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id=user_id, reason=reason), metadata=metadata
    ).user


def status(h: Harness, user_id: str) -> pb.GetStatusResponse:
    return h.twofactor.GetStatus(pb.GetStatusRequest(user_id=user_id), metadata=h.app_metadata)


def audit_events(h: Harness, user_id: str = "", page_size: int = 1000) -> list[admin_pb.AuditEvent]:
    response = h.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(user_id=user_id, page_size=page_size), metadata=h.admin_metadata
    )
    assert not response.next_page_token
    return list(response.events)


def wrong_code(secret: str, clock: Clock) -> str:
    """A code the authenticator shows at no time step near now (a few steps either way)."""
    near = {totp_now(secret, clock, offset_steps=k) for k in range(-4, 5)}
    return next(c for c in ("987654", "876543", "765432", "654321", "543210", "432109") if c not in near)


def page_token(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode()


class RecordingDispatcher:
    """Queues nothing: the test reads the code from the database, as a worker would."""

    def __init__(self) -> None:
        self.challenge_ids: list[str] = []
        self._lock = threading.Lock()

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        with self._lock:
            self.challenge_ids.append(challenge_id)


def sent_code(h: Harness, challenge_id: str) -> str:
    rows = query(
        h.settings, "SELECT code_ciphertext FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id}
    )
    sealed = bytes(rows[0]["code_ciphertext"])
    return Keyring.parse(TEST_KEYS).decrypt(sealed, purpose=CHALLENGE_CODE, user_id=challenge_id).decode()


# ---- ResetUser ----------------------------------------------------------------------------------


def test_reset_makes_the_user_enroll_again(harness: Harness, clock: Clock) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="alice", email="alice@example.com", phone="+14155551234"),
        metadata=harness.app_metadata,
    )
    old_secret, old_codes = enroll_authenticator(harness, clock, "alice")
    assert verify(harness, "alice", wrong_code(old_secret, clock)).result == pb.VERIFY_RESULT_REJECTED
    assert get_user(harness, "alice").failed_attempts == 1

    after = reset(harness, "alice")
    assert after.user_id == "alice"
    assert list(after.enabled_methods) == [] and list(after.pending_methods) == []
    assert after.backup_codes_remaining == 0 and after.failed_attempts == 0
    assert not after.HasField("locked_until") and not after.locked_permanently
    # Contacts are kept.
    assert (after.masked_email, after.masked_phone) == ("a***@example.com", "+1******1234")

    state = status(harness, "alice")
    assert list(state.enabled_methods) == [] and list(state.pending_methods) == []
    assert state.backup_codes_remaining == 0 and state.email_registered and state.phone_registered
    stored = query(
        harness.settings, "SELECT COUNT(*) AS n FROM methods WHERE user_id = %(u)s", {"u": "alice"}
    )
    assert stored[0]["n"] == 0, "the authenticator secret is still stored"

    # Neither the old authenticator code nor an old backup code gets the user in.
    for code in (totp_now(old_secret, clock), old_codes[0]):
        with pytest.raises(grpc.RpcError) as not_enrolled:
            verify(harness, "alice", code)
        assert not_enrolled.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(not_enrolled.value).reason == "NOT_ENROLLED"
    with pytest.raises(grpc.RpcError) as no_codes:
        harness.twofactor.GetBackupCodes(
            pb.GetBackupCodesRequest(user_id="alice"), metadata=harness.app_metadata
        )
    assert error_info(no_codes.value).reason == "NOT_ENROLLED"

    # Enrollment works again, with a new secret and new backup codes.
    new_secret, new_codes = enroll_authenticator(harness, clock, "alice")
    assert new_secret != old_secret and not set(new_codes) & set(old_codes)
    old_totp, new_totp = totp_now(old_secret, clock), totp_now(new_secret, clock)
    new_window = {totp_now(new_secret, clock, offset_steps=k) for k in (-1, 0, 1)}
    if old_totp not in new_window:  # a clash has probability ~3e-6; then only the new code can be checked
        assert verify(harness, "alice", old_totp).result == pb.VERIFY_RESULT_REJECTED
    assert verify(harness, "alice", old_codes[1]).result == pb.VERIFY_RESULT_REJECTED
    accepted = verify(harness, "alice", new_totp)
    assert accepted.result == pb.VERIFY_RESULT_ACCEPTED and accepted.matched == pb.CODE_KIND_AUTHENTICATOR


def test_reset_clears_a_lockout(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "bob")
    bad = wrong_code(secret, clock)
    for _ in range(5):
        last = verify(harness, "bob", bad)
    assert last.result == pb.VERIFY_RESULT_LOCKED
    assert get_user(harness, "bob").HasField("locked_until")
    after = reset(harness, "bob")
    assert not after.HasField("locked_until") and after.failed_attempts == 0


def test_reset_drops_pending_enrollments_and_sent_codes(start_server: ServerFactory, clock: Clock) -> None:
    dispatcher = RecordingDispatcher()
    h = start_server(dispatcher=dispatcher)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="carol", email="carol@example.com"), metadata=h.app_metadata
    )
    first = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="carol", method=EMAIL), metadata=h.app_metadata
    )
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id="carol", method=EMAIL, code=sent_code(h, first.challenge.challenge_id)
        ),
        metadata=h.app_metadata,
    )
    assert confirmed.confirmed
    clock.advance(31)  # past the resend cooldown
    login = h.twofactor.SendCode(pb.SendCodeRequest(user_id="carol", method=EMAIL), metadata=h.app_metadata)
    login_code = sent_code(h, login.challenge.challenge_id)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(
            user_id="carol", method=AUTHENTICATOR, verification_token=confirmed.verification_token
        ),
        metadata=h.app_metadata,
    )
    assert list(status(h, "carol").pending_methods) == [AUTHENTICATOR]

    after = reset(h, "carol")
    assert list(after.pending_methods) == [] and list(after.enabled_methods) == []
    waiting = query(
        h.settings,
        "SELECT code_ciphertext, superseded_at FROM challenges WHERE user_id = %(u)s AND consumed_at IS NULL",
        {"u": "carol"},
    )
    assert len(waiting) == 1  # the login code
    assert waiting[0]["code_ciphertext"] is None, "a code waiting for delivery can still be sent"
    assert waiting[0]["superseded_at"] is not None
    # Nothing will send it: the app polling its delivery hears so now, not when it would expire.
    withdrawn = h.twofactor.GetChallenge(
        pb.GetChallengeRequest(user_id="carol", challenge_id=login.challenge.challenge_id),
        metadata=h.app_metadata,
    ).challenge
    assert withdrawn.delivery_status == common_pb2.DELIVERY_STATUS_EXPIRED
    assert withdrawn.failure_reason == WITHDRAWN_REASON

    # Enroll email again: the login code sent before the reset must not work.
    clock.advance(31)
    again = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="carol", method=EMAIL), metadata=h.app_metadata
    )
    assert h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id="carol", method=EMAIL, code=sent_code(h, again.challenge.challenge_id)
        ),
        metadata=h.app_metadata,
    ).confirmed
    assert verify(h, "carol", login_code).result == pb.VERIFY_RESULT_REJECTED


def test_reset_is_idempotent(harness: Harness, clock: Clock) -> None:
    enroll_authenticator(harness, clock, "dave")
    first = reset(harness, "dave")
    second = reset(harness, "dave")
    assert second == first
    assert list(status(harness, "dave").enabled_methods) == []
    # A user with nothing enrolled can be reset too.
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="erin", email="erin@example.com"), metadata=harness.app_metadata
    )
    assert reset(harness, "erin").masked_email == "e***@example.com"


def test_reset_is_refused_when_the_policy_forbids_it(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(policy={"allow_admin_reset": False})
    secret, codes = enroll_authenticator(h, clock, "frank")
    with pytest.raises(grpc.RpcError) as refused:
        reset(h, "frank", request_id="req-refused")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "ADMIN_RESET_DISABLED"

    # Nothing changed.
    assert list(status(h, "frank").enabled_methods) == [AUTHENTICATOR]
    assert verify(h, "frank", codes[0]).matched == pb.CODE_KIND_BACKUP_CODE
    assert verify(h, "frank", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
    # The attempt is on record, as a failure.
    attempts = [e for e in audit_events(h, "frank") if e.action == "user_reset"]
    assert [(e.outcome, e.actor, e.request_id) for e in attempts] == [("failure", "operator", "req-refused")]
    # Refused for an unknown user too, and nothing is recorded for a user who doesn't exist.
    with pytest.raises(grpc.RpcError) as unknown:
        reset(h, "nobody")
    assert error_info(unknown.value).reason == "ADMIN_RESET_DISABLED"
    assert audit_events(h, "nobody") == []


def test_reset_needs_a_reason_and_a_known_user(harness: Harness, clock: Clock) -> None:
    enroll_authenticator(harness, clock, "gina")
    with pytest.raises(grpc.RpcError) as no_reason:
        reset(harness, "gina", reason="")
    assert no_reason.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(no_reason.value).reason == "INVALID_REASON"
    assert list(status(harness, "gina").enabled_methods) == [AUTHENTICATOR]
    with pytest.raises(grpc.RpcError) as unknown:
        reset(harness, "nobody")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(unknown.value).reason == "USER_NOT_FOUND"


# ---- UnlockUser ---------------------------------------------------------------------------------


def test_unlock_ends_a_lockout(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "henry")
    bad = wrong_code(secret, clock)
    for _ in range(5):
        last = verify(harness, "henry", bad)
    assert last.result == pb.VERIFY_RESULT_LOCKED
    locked = get_user(harness, "henry")
    assert locked.failed_attempts == 5 and locked.locked_until.seconds == int(clock.now) + 60
    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="henry"), metadata=harness.app_metadata)
    assert status.locked_until.seconds == int(clock.now) + 60 and not status.locked_permanently

    unlocked = harness.admin.UnlockUser(
        admin_pb.UnlockUserRequest(user_id="henry"), metadata=harness.admin_metadata
    ).user
    assert unlocked.failed_attempts == 0 and not unlocked.HasField("locked_until")
    assert list(unlocked.enabled_methods) == [AUTHENTICATOR]
    # The right code works at once, without waiting for the lock to run out.
    assert verify(harness, "henry", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED


def test_unlock_ends_a_permanent_lockout(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(policy=LOCKED_FOR_GOOD_AFTER_3)
    secret, _ = enroll_authenticator(h, clock, "ivan")
    bad = wrong_code(secret, clock)
    for _ in range(3):
        clock.advance(2)
        verify(h, "ivan", bad)
    user = get_user(h, "ivan")
    assert user.locked_permanently and not user.HasField("locked_until")
    # The login site sees it too, and offers no code to send.
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="ivan"), metadata=h.app_metadata)
    assert status.locked_permanently and not status.HasField("locked_until")
    assert verify(h, "ivan", totp_now(secret, clock)).result == pb.VERIFY_RESULT_LOCKED

    after = h.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id="ivan"), metadata=h.admin_metadata).user
    assert not after.locked_permanently and after.failed_attempts == 0
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="ivan"), metadata=h.app_metadata)
    assert not status.locked_permanently and not status.HasField("locked_until")
    assert verify(h, "ivan", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
    # Unlocking a user who is not locked is harmless.
    again = h.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id="ivan"), metadata=h.admin_metadata).user
    assert not again.locked_permanently and again.failed_attempts == 0


# ---- GetUser, GetPolicy ---------------------------------------------------------------------------


def test_get_user_shows_state_with_masked_contacts(harness: Harness, clock: Clock) -> None:
    created = clock.now
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="judy", email="judy@example.com", phone="+14155551234"),
        metadata=harness.app_metadata,
    )
    fresh = get_user(harness, "judy")
    assert fresh.created_at.seconds == int(created) and not fresh.HasField("last_verified_at")
    assert list(fresh.enabled_methods) == [] and fresh.backup_codes_remaining == 0

    clock.advance(100)
    secret, codes = enroll_authenticator(harness, clock, "judy")
    verified_at = clock.now
    assert verify(harness, "judy", codes[0]).matched == pb.CODE_KIND_BACKUP_CODE
    clock.advance(7)
    verify(harness, "judy", wrong_code(secret, clock))

    user = get_user(harness, "judy")
    assert user.user_id == "judy"
    assert list(user.enabled_methods) == [AUTHENTICATOR] and list(user.pending_methods) == []
    assert user.masked_email == "j***@example.com"
    assert user.masked_phone == "+1******1234"
    assert user.backup_codes_remaining == 9
    assert user.failed_attempts == 1 and not user.HasField("locked_until") and not user.locked_permanently
    assert user.created_at.seconds == int(created)
    assert user.last_verified_at.seconds == int(verified_at)
    wire = user.SerializeToString()
    for secret_text in (
        "judy@example.com",
        "4155551234",
        secret,
        *codes,
        *(c.replace("-", "") for c in codes),
    ):
        assert secret_text.encode() not in wire


def test_get_user_list_users_and_get_status_see_one_moment_while_resets_and_enrollments_commit(
    start_server: ServerFactory, clock: Clock
) -> None:
    """A user's state is several tables (the user, the methods, the backup codes): a read of it is
    one moment, never the methods before a change committed and the backup codes after it. On
    PostgreSQL, READ COMMITTED gave each statement its own snapshot: with another server resetting
    and enrolling the user, GetStatus answered a pending authenticator, no method and ten backup
    codes, a state the user was never in (backup codes come and go with the first method)."""
    writer, reader = start_server(), start_server()
    enroll_authenticator(writer, clock, "kai")
    done = threading.Event()
    seen: list[str] = []

    def reset_and_enroll() -> None:
        try:
            for _ in range(60):
                writer.admin.ResetUser(
                    admin_pb.ResetUserRequest(user_id="kai", reason="lost phone"),
                    metadata=writer.admin_metadata,
                )
                enroll_authenticator(writer, clock, "kai")
                if seen:
                    return
        finally:
            done.set()

    def read() -> None:
        while not done.is_set() and not seen:
            status = reader.twofactor.GetStatus(
                pb.GetStatusRequest(user_id="kai"), metadata=reader.app_metadata
            )
            user = get_user(reader, "kai")
            listing = reader.admin.ListUsers(admin_pb.ListUsersRequest(), metadata=reader.admin_metadata)
            [listed] = listing.users
            for name, state in (("GetStatus", status), ("GetUser", user), ("ListUsers", listed)):
                if state.backup_codes_remaining and not state.enabled_methods:
                    seen.append(f"{name}: {state.backup_codes_remaining} backup codes, no method")

    threads = [threading.Thread(target=reset_and_enroll), *(threading.Thread(target=read) for _ in range(3))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not seen, seen[0]


def test_get_user_of_an_unknown_user_is_not_found(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        get_user(harness, "nobody")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(unknown.value).reason == "USER_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as empty:
        get_user(harness, "")
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(empty.value).reason == "INVALID_USER_ID"


def test_get_policy_reports_the_policy_in_force(start_server: ServerFactory) -> None:
    h = start_server(
        policy={
            "allowed_methods": ("authenticator", "sms"),
            "force_two_factor": True,
            "allow_admin_reset": False,
            "issuer": "Example Corp",
            "backup_code_count": 8,
            "code_length": 8,
            "code_ttl_seconds": 300,
            "max_attempts_per_code": 3,
            "resend_cooldown_seconds": 45,
            "lockout_threshold": 4,
            "lockout_base_seconds": 90,
            "max_consecutive_failures": 50,
        }
    )
    policy = h.admin.GetPolicy(admin_pb.GetPolicyRequest(), metadata=h.admin_metadata).policy
    assert list(policy.allowed_methods) == [AUTHENTICATOR, SMS]
    assert policy.force_two_factor and not policy.allow_admin_reset
    assert policy.issuer == "Example Corp"
    assert (policy.backup_code_count, policy.code_length, policy.max_attempts_per_code) == (8, 8, 3)
    assert (policy.code_ttl.seconds, policy.resend_cooldown.seconds, policy.lockout_base.seconds) == (
        300,
        45,
        90,
    )
    assert (policy.lockout_threshold, policy.max_consecutive_failures) == (4, 50)


# ---- the audit log ------------------------------------------------------------------------------


def test_every_action_is_audited_with_actor_request_id_and_outcome(harness: Harness, clock: Clock) -> None:
    h, user = harness, "kate"
    at: dict[str, int] = {}  # request id -> the clock (ms) when it was made
    typed: list[str] = []  # every code sent to the server

    def step(request_id: str) -> str:
        clock.advance(1)
        at[request_id] = int(clock.now * 1000)
        return request_id

    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=AUTHENTICATOR), metadata=app(h, step("r-start"))
    )
    secret = start.authenticator.secret
    right = totp_now(secret, clock)
    bad = wrong_code(secret, clock)
    typed += [right, bad]
    assert not h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=AUTHENTICATOR, code=bad),
        metadata=app(h, step("r-wrong")),
    ).confirmed
    step("r-confirm")
    typed.append(totp_now(secret, clock))
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=AUTHENTICATOR, code=typed[-1]),
        metadata=app(h, "r-confirm"),
    )
    codes = list(confirm.backup_codes)
    typed.append(codes[0])
    backup_login = h.twofactor.Verify(
        pb.VerifyRequest(user_id=user, code=codes[0]), metadata=app(h, step("r-backup"))
    )
    assert backup_login.matched == pb.CODE_KIND_BACKUP_CODE
    fresh = h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id=user, verification_token=backup_login.verification_token),
        metadata=app(h, step("r-regenerate")),
    )
    for i in range(5):
        last = h.twofactor.Verify(
            pb.VerifyRequest(user_id=user, code=bad), metadata=app(h, step(f"r-fail-{i}"))
        )
    assert last.result == pb.VERIFY_RESULT_LOCKED
    h.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id=user), metadata=admin(h, step("r-unlock")))
    clock.advance(30)  # the next time step: the confirming code can't log in again
    typed.append(totp_now(secret, clock))
    login = h.twofactor.Verify(
        pb.VerifyRequest(user_id=user, code=typed[-1]), metadata=app(h, step("r-login"))
    )
    assert login.result == pb.VERIFY_RESULT_ACCEPTED
    h.twofactor.DisableMethod(
        pb.DisableMethodRequest(
            user_id=user, method=AUTHENTICATOR, verification_token=login.verification_token
        ),
        metadata=app(h, step("r-disable")),
    )
    h.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id=user, reason="lost phone"), metadata=admin(h, step("r-reset"))
    )

    events = audit_events(h, user)
    assert [e.event_id for e in events] == sorted((e.event_id for e in events), reverse=True)
    seen = [(e.action, e.outcome, e.actor, e.request_id) for e in reversed(events)]
    assert seen == [
        ("enrollment_started", "success", "backend", "r-start"),
        ("enrollment_confirmed", "failure", "backend", "r-wrong"),
        ("enrollment_confirmed", "success", "backend", "r-confirm"),
        ("backup_codes_generated", "success", "backend", "r-confirm"),
        ("backup_code_used", "success", "backend", "r-backup"),
        ("backup_codes_regenerated", "success", "backend", "r-regenerate"),
        *[("verification_rejected", "failure", "backend", f"r-fail-{i}") for i in range(4)],
        ("user_locked", "success", "backend", "r-fail-4"),
        ("verification_locked", "failure", "backend", "r-fail-4"),
        ("user_unlocked", "success", "operator", "r-unlock"),
        ("method_disabled", "success", "backend", "r-disable"),
        ("user_reset", "success", "operator", "r-reset"),
    ]
    for event in events:
        assert event.user_id == user
        assert event.time.seconds * 1000 + event.time.nanos // 1_000_000 == at[event.request_id]
    assert next(e for e in events if e.action == "user_reset").detail == "lost phone"
    assert next(e for e in events if e.action == "enrollment_started").detail == "authenticator"

    # Never a code, a secret or a token, in the API or in the table.
    needles = {secret, secret.lower(), APP_TOKEN, ADMIN_TOKEN, *typed, *codes, *fresh.codes}
    needles |= {backup_login.verification_token, login.verification_token, confirm.verification_token}
    needles |= {c.replace("-", "") for c in (*codes, *fresh.codes)}
    texts = [f"{e.actor} {e.user_id} {e.action} {e.request_id} {e.outcome} {e.detail}" for e in events]
    rows = query(h.settings, "SELECT actor, user_id, action, request_id, outcome, detail FROM audit_events")
    texts += [" ".join(str(v) for v in row.values()) for row in rows]
    assert len(rows) == len(events)
    for needle in needles:
        assert not any(needle in text for text in texts), f"{needle!r} is in the audit log"


def test_a_request_without_an_id_gets_a_generated_one(harness: Harness) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="liam", email="liam@example.com"), metadata=harness.app_metadata
    )
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="liam", email="liam2@example.com"), metadata=harness.app_metadata
    )
    ids = [e.request_id for e in audit_events(harness, "liam")]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1]


def test_audit_events_page_newest_first_by_user(harness: Harness, clock: Clock) -> None:
    calls: list[tuple[str, str]] = []
    for i in range(19):
        user = "mia" if i % 3 else "noah"
        clock.advance(1)
        harness.twofactor.SetContact(
            pb.SetContactRequest(user_id=user, email=f"{user}{i}@example.com"),
            metadata=app(harness, f"r-{i}"),
        )
        calls.append((user, f"r-{i}"))

    mias = [rid for user, rid in reversed(calls) if user == "mia"]
    assert len(mias) == 12
    pages: list[list[admin_pb.AuditEvent]] = []
    token = ""
    for _ in range(10):  # bounded: 12 events in pages of 5 take 3
        page = harness.admin.ListAuditEvents(
            admin_pb.ListAuditEventsRequest(user_id="mia", page_size=5, page_token=token),
            metadata=harness.admin_metadata,
        )
        pages.append(list(page.events))
        token = page.next_page_token
        if len(pages) == 1:
            # An event recorded while paging lands before the first page; later pages are unaffected.
            harness.twofactor.SetContact(
                pb.SetContactRequest(user_id="mia", phone="+14155550000"), metadata=app(harness, "r-late")
            )
        if not token:
            break
    assert [len(p) for p in pages] == [5, 5, 2]
    flat = [e for p in pages for e in p]
    assert [e.request_id for e in flat] == mias
    assert all(e.user_id == "mia" for e in flat)
    assert [e.event_id for e in flat] == sorted((e.event_id for e in flat), reverse=True)
    times = [e.time.seconds for e in flat]
    assert times == sorted(times, reverse=True)

    everyone = audit_events(harness)
    assert [e.request_id for e in everyone] == ["r-late", *(rid for _, rid in reversed(calls))]
    default_size = harness.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(), metadata=harness.admin_metadata
    )
    assert len(default_size.events) == 20 and not default_size.next_page_token


# ---- ListUsers ------------------------------------------------------------------------------------


def list_all_users(h: Harness, *, page_size: int, user_filter: int) -> tuple[list[admin_pb.User], list[int]]:
    users: list[admin_pb.User] = []
    sizes: list[int] = []
    token = ""
    for _ in range(100):  # bounded
        page = h.admin.ListUsers(
            admin_pb.ListUsersRequest(page_size=page_size, page_token=token, filter=user_filter),  # type: ignore[arg-type]
            metadata=h.admin_metadata,
        )
        users += page.users
        sizes.append(len(page.users))
        token = page.next_page_token
        if not token:
            return users, sizes
    raise AssertionError("ListUsers never returned a last page")


def test_list_users_pages_through_every_user_and_filters_by_enabled(harness: Harness, clock: Clock) -> None:
    ids = [f"user-{i:02d}" for i in range(25)]
    for user_id in ids:
        harness.twofactor.SetContact(
            pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com"),
            metadata=harness.app_metadata,
        )
    enabled = set(ids[::3])
    for user_id in sorted(enabled):
        enroll_authenticator(harness, clock, user_id)
    # A pending enrollment is not an enabled method.
    harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="user-01", method=AUTHENTICATOR), metadata=harness.app_metadata
    )

    users, sizes = list_all_users(harness, page_size=10, user_filter=admin_pb.USER_FILTER_UNSPECIFIED)
    assert sizes == [10, 10, 5]
    assert [u.user_id for u in users] == ids
    for user in users:
        assert list(user.enabled_methods) == ([AUTHENTICATOR] if user.user_id in enabled else [])
        assert user.masked_email == "u***@example.com"
        assert user.backup_codes_remaining == (10 if user.user_id in enabled else 0)
    assert list(next(u for u in users if u.user_id == "user-01").pending_methods) == [AUTHENTICATOR]

    on, on_sizes = list_all_users(harness, page_size=4, user_filter=admin_pb.USER_FILTER_ENABLED)
    assert [u.user_id for u in on] == sorted(enabled) and on_sizes == [4, 4, 1]
    off, _ = list_all_users(harness, page_size=10, user_filter=admin_pb.USER_FILTER_NOT_ENABLED)
    assert [u.user_id for u in off] == [i for i in ids if i not in enabled]

    everyone, default_sizes = list_all_users(
        harness, page_size=0, user_filter=admin_pb.USER_FILTER_UNSPECIFIED
    )
    assert len(everyone) == 25 and default_sizes == [25]


def test_list_users_reads_a_page_in_two_statements_with_each_users_own_count(
    harness: Harness, clock: Clock
) -> None:
    """A statement per user put a full page (1,000) past the storage timeout on a database a few
    milliseconds away; the page's counts come from one grouped statement, each user's own."""
    used = {"p-0": 0, "p-1": 1, "p-2": 3}
    for user_id, spent in used.items():
        _, backup = enroll_authenticator(harness, clock, user_id)
        for code in backup[:spent]:
            assert verify(harness, user_id, code).result == pb.VERIFY_RESULT_ACCEPTED
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="p-3", email="p3@example.com"), metadata=harness.app_metadata
    )
    db = CountingDatabase(harness.server.db)
    admin_cases = Admin(db, harness.settings.policy, None, clock)  # type: ignore[arg-type]
    users, next_token = admin_cases.list_users(page_size=10, page_token="", enabled=None)
    assert next_token == ""
    assert {u.user_id: u.backup_codes_remaining for u in users} == {
        "p-0": 10,
        "p-1": 9,
        "p-2": 7,
        "p-3": 0,
    }
    assert (db.transactions, db.statements_run) == (1, 3)  # the users, their methods, their counts


def test_list_users_refuses_an_unknown_filter_and_page_size(harness: Harness) -> None:
    for request, reason in (
        (admin_pb.ListUsersRequest(filter=7), "INVALID_FILTER"),  # type: ignore[arg-type]
        (admin_pb.ListUsersRequest(page_size=1001), "INVALID_PAGE_SIZE"),
        (admin_pb.ListUsersRequest(page_size=-1), "INVALID_PAGE_SIZE"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            harness.admin.ListUsers(request, metadata=harness.admin_metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(refused.value).reason == reason
    with pytest.raises(grpc.RpcError) as events:
        harness.admin.ListAuditEvents(
            admin_pb.ListAuditEventsRequest(page_size=1001), metadata=harness.admin_metadata
        )
    assert error_info(events.value).reason == "INVALID_PAGE_SIZE"


BAD_TOKENS = {
    "not base64": "not a token!",
    "bad padding": "abc",
    "not utf-8": page_token(b"\xff\xfe\xfd"),
    "unknown kind": page_token(b"x:1"),
    "no position": page_token(b"e:"),
    "letters for an event id": page_token(b"e:abc"),
    "negative event id": page_token(b"e:-5"),
    "non-ascii digits": page_token("e:²".encode()),
    "event id past 64 bits": page_token(b"e:" + b"9" * 30),
    "more digits than int() reads": page_token(b"e:" + b"0" * 5000),  # zeros: not past 64 bits
    "NUL in a user id": page_token(b"u:\x00"),
    "user id too long": page_token(b"u:" + b"a" * 300),
}


@pytest.mark.parametrize("token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_a_bad_page_token_is_an_invalid_argument(harness: Harness, token: str) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="olga", email="olga@example.com"), metadata=harness.app_metadata
    )
    for call, request in (
        (harness.admin.ListUsers, admin_pb.ListUsersRequest(page_token=token)),
        (harness.admin.ListAuditEvents, admin_pb.ListAuditEventsRequest(page_token=token)),
        (harness.admin.ListAuditEvents, admin_pb.ListAuditEventsRequest(user_id="olga", page_token=token)),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call(request, metadata=harness.admin_metadata)  # type: ignore[operator]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (call, refused.value.details())
        assert error_info(refused.value).reason == "INVALID_PAGE_TOKEN"


def test_a_page_token_of_one_list_is_refused_by_the_other(harness: Harness) -> None:
    for i in range(3):
        harness.twofactor.SetContact(
            pb.SetContactRequest(user_id=f"p{i}", email=f"p{i}@example.com"), metadata=harness.app_metadata
        )
    users = harness.admin.ListUsers(admin_pb.ListUsersRequest(page_size=1), metadata=harness.admin_metadata)
    events = harness.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(page_size=1), metadata=harness.admin_metadata
    )
    assert users.next_page_token and events.next_page_token
    with pytest.raises(grpc.RpcError) as wrong_list:
        harness.admin.ListAuditEvents(
            admin_pb.ListAuditEventsRequest(page_token=users.next_page_token), metadata=harness.admin_metadata
        )
    assert error_info(wrong_list.value).reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(grpc.RpcError) as wrong_list:
        harness.admin.ListUsers(
            admin_pb.ListUsersRequest(page_token=events.next_page_token), metadata=harness.admin_metadata
        )
    assert error_info(wrong_list.value).reason == "INVALID_PAGE_TOKEN"


@pytest.mark.parametrize("call", ["GetStatus", "GetUser", "ListUsers"])
def test_a_users_state_is_read_at_one_moment_when_a_reset_commits_between_its_reads(
    start_server: ServerFactory, clock: Clock, backend: str, call: str
) -> None:
    """The race above, made certain: the backup codes' table is held while the read has the user
    and the methods, and a reset (methods and codes gone) commits before it reads the codes. One
    moment is the state before the reset: a method and its ten codes, never a method and none."""
    if backend != "postgres":
        return  # SQLite's transactions are serialized: no commit falls between a read's statements
    h = start_server()
    enroll_authenticator(h, clock, "kit")
    read = {
        "GetStatus": lambda: h.twofactor.GetStatus(
            pb.GetStatusRequest(user_id="kit"), metadata=h.app_metadata
        ),
        "GetUser": lambda: get_user(h, "kit"),
        "ListUsers": lambda: h.admin.ListUsers(admin_pb.ListUsersRequest(), metadata=h.admin_metadata).users[
            0
        ],
    }[call]
    with psycopg.connect(h.settings.database_url, autocommit=True) as holder, ThreadPoolExecutor(1) as pool:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE backup_codes IN ACCESS EXCLUSIVE MODE")
        reading = pool.submit(read)
        wait_until_waiting(holder, [reading], call)
        holder.execute("DELETE FROM methods WHERE user_id = 'kit'")
        holder.execute("DELETE FROM backup_codes WHERE user_id = 'kit'")
        holder.execute("COMMIT")
        state = reading.result(timeout=30)
    assert (list(state.enabled_methods), state.backup_codes_remaining) == ([AUTHENTICATOR], 10)
