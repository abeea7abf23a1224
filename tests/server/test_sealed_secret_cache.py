"""A server process keeps the sealed authenticator secrets it read (usecases/sealed_secrets.py),
so an accepted Verify is one statement. A cached copy is never trusted over the database:
after a reset, a new enrollment or a key rotation done by another server or connection, the
process holding the cache answers as if it had none (its statements touch no row for a
secret that is no longer the enabled one, and it reads the user afresh)."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import replace

import grpc
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    enroll_authenticator,
    error_info,
    totp_now,
    verified_token,
    verify,
)
from twofactor_server.domain import lockout, totp
from twofactor_server.domain.clock import now_ms
from twofactor_server.domain.keyring import Keyring, version_of
from twofactor_server.domain.models import Caller, VerifyResult
from twofactor_server.settings import PolicySettings, Settings
from twofactor_server.storage import attempts, store
from twofactor_server.storage.database import Database, open_database
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.key_rotation import KeyRotation
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.sealed_secrets import CachedSecret, SealedSecrets
from twofactor_server.usecases.users import lock_after_failures
from twofactor_server.usecases.verification import Verification

ACCEPTED = pb.VERIFY_RESULT_ACCEPTED
KEY_2 = Keyring.new_key_spec(2)
CALLER = Caller(actor="test", request_id="test")


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        raise AssertionError("nothing is sent in these tests")


def test_an_admin_reset_by_another_server_leaves_no_cached_secret_to_accept(
    start_server: ServerFactory, clock: Clock
) -> None:
    holder, other = start_server(), start_server()
    secret, _ = enroll_authenticator(holder, clock, "ana")
    assert verify(holder, "ana", totp_now(secret, clock)).result == ACCEPTED  # now cached by `holder`
    clock.advance(30)
    other.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id="ana", reason="lost phone"), metadata=other.admin_metadata
    )
    with pytest.raises(grpc.RpcError) as raised:
        verify(holder, "ana", totp_now(secret, clock))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert error_info(raised.value).reason == "NOT_ENROLLED"


def test_a_new_enrollment_on_another_server_makes_the_cached_secrets_codes_wrong(
    start_server: ServerFactory, clock: Clock
) -> None:
    holder, other = start_server(), start_server()
    old, _ = enroll_authenticator(holder, clock, "ben")
    assert verify(holder, "ben", totp_now(old, clock)).result == ACCEPTED  # now cached by `holder`
    clock.advance(30)
    token = verified_token(other, clock, "ben", old)
    new = other.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="ben", method=AUTHENTICATOR, verification_token=token),
        metadata=other.app_metadata,
    ).authenticator.secret
    confirm = other.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="ben", method=AUTHENTICATOR, code=totp_now(new, clock)),
        metadata=other.app_metadata,
    )
    assert confirm.confirmed
    clock.advance(30)
    assert totp_now(old, clock) != totp_now(new, clock)

    stale = verify(holder, "ben", totp_now(old, clock))
    assert stale.result == pb.VERIFY_RESULT_REJECTED and not stale.verification_token
    threshold = holder.settings.policy.lockout_threshold
    assert stale.attempts_left == threshold - 1, "a code of the replaced secret is a wrong code"
    fresh = verify(holder, "ben", totp_now(new, clock))
    assert fresh.result == ACCEPTED and fresh.attempts_left == threshold


def verification_with(db: Database, keyring: Keyring, clock: Clock, cache: SealedSecrets) -> Verification:
    policy = PolicySettings(notify_users=False)
    challenges = Challenges(db, keyring, policy, NoDispatch(), clock)
    notices = Notices(db, keyring, policy, NoDispatch(), clock)
    backup_codes = BackupCodes(db, keyring, policy, notices, clock)
    return Verification(db, keyring, policy, challenges, backup_codes, notices, clock, cache)


def enabled_secret(db: Database, user_id: str) -> bytes:
    with db.transaction() as tx:
        [method] = [m for m in store.methods_of(tx, user_id) if m.method == "authenticator"]
    assert method.secret is not None
    return method.secret


def test_a_key_rotation_by_another_connection_is_followed_not_trusted(
    start_server: ServerFactory, settings: Settings, other_connection: Database, clock: Clock
) -> None:
    """The cache-holding process has both keys (a rotation's middle stage). After `keys rotate`
    re-encrypts the secret, the cached copy (its version) is refused by both one-statement decisions;
    the right code is still accepted (read afresh), the cache follows, a replay is refused."""
    enrolling = start_server()  # key 1 only: the secret is sealed under key 1
    secret, _ = enroll_authenticator(enrolling, clock, "cy")
    both = Keyring.parse(f"{TEST_KEYS},{KEY_2}")
    cache = SealedSecrets()
    holder_db = open_database(settings.database_url, data_dir=settings.data_dir)
    try:
        holder = verification_with(holder_db, both, clock, cache)
        assert holder.verify("cy", totp_now(secret, clock), caller=CALLER).result == VerifyResult.ACCEPTED
        cached = cache.get("cy")
        assert cached is not None and version_of(cached.sealed) == 1
        clock.advance(30)

        report = KeyRotation(other_connection, both, clock, batch_size=10).rotate()
        assert report.remaining == ()
        rotated = enabled_secret(other_connection, "cy")
        assert version_of(rotated) == 2 and rotated != cached.sealed

        now = now_ms(clock)
        step = totp.time_step(clock())
        policy = PolicySettings()
        with other_connection.statements() as q:  # the stale copy decides nothing
            unlocked = policy.max_consecutive_failures
            stale = attempts.accept_totp_step_unlocked(
                q, "cy", step, cached.version, cached.epoch, now, unlocked_below=unlocked
            )
            assert stale is None
            schedule, later = lockout.lock_schedule(policy, now)
            counted = attempts.count_failure_unlocked(
                q,
                "cy",
                cached.version,
                cached.epoch,
                now,
                unlocked_below=unlocked,
                threshold=policy.lockout_threshold,
                schedule=schedule,
                later=later,
            )
            assert counted is None

        code = totp_now(secret, clock)
        outcome = holder.verify("cy", code, caller=CALLER)
        assert outcome.result == VerifyResult.ACCEPTED and outcome.verification_token
        now_cached = cache.get("cy")
        assert now_cached is not None and now_cached.sealed == rotated, (
            "the cache holds what the database holds"
        )
        assert now_cached.version > cached.version
        replay = holder.verify("cy", code, caller=CALLER)
        assert replay.result == VerifyResult.REJECTED
        assert replay.attempts_left == policy.lockout_threshold, "a double submit is not counted"
    finally:
        holder_db.close()


def test_the_one_statement_count_locks_as_count_failure_does(
    settings: Settings, other_connection: Database, clock: Clock
) -> None:
    """count_failure_unlocked (a wrong code on the fast path) leaves the counters exactly as
    count_failure's rule says, for every failure count up to the permanent lock."""
    db = other_connection
    policy = replace(
        PolicySettings(),
        lockout_threshold=3,
        lockout_base_seconds=2,
        lockout_max_seconds=20,
        max_consecutive_failures=12,
    )
    sealed = Keyring.parse(TEST_KEYS).encrypt(b"x" * 20, purpose="totp_secret", user_id="dee")
    now = now_ms(clock)
    with db.transaction() as tx:
        store.ensure_user(tx, "dee", now)
        store.start_method_enrollment(tx, "dee", "authenticator", now, with_proof=True, pending_secret=sealed)
        assert store.enable_method(tx, "dee", "authenticator", now)
        snapshot = attempts.verify_snapshot(tx, "dee")
    assert snapshot is not None and snapshot.authenticator_secret == sealed
    version = snapshot.secret_version
    assert version is not None
    schedule, later = lockout.lock_schedule(policy, now)
    for failures in range(1, policy.max_consecutive_failures + 1):
        with db.transaction() as tx:
            attempts.set_attempts(tx, "dee", failures - 1, None)
        with db.statements() as q:
            counted = attempts.count_failure_unlocked(
                q,
                "dee",
                version,
                snapshot.credential_epoch,
                now,
                unlocked_below=policy.max_consecutive_failures,
                threshold=policy.lockout_threshold,
                schedule=schedule,
                later=later,
            )
        locks, until = lock_after_failures(failures, policy, now)
        assert counted == (failures, until if locks else None), failures
    with db.statements() as q:  # locked for good: nothing more is counted
        assert (
            attempts.count_failure_unlocked(
                q,
                "dee",
                version,
                snapshot.credential_epoch,
                now,
                unlocked_below=policy.max_consecutive_failures,
                threshold=policy.lockout_threshold,
                schedule=schedule,
                later=later,
            )
            is None
        )


def test_the_cache_is_bounded_and_forgets_the_oldest_first() -> None:
    cache = SealedSecrets(max_entries=2)
    one, two, three, four = (CachedSecret(bytes([i]), i, 1) for i in range(1, 5))
    cache.put("a", one)
    cache.put("b", two)
    cache.put("a", three)  # written again: now the newest
    cache.put("c", four)  # full: "b" goes
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (three, None, four, 2)
    cache.put("c", None)
    assert cache.get("c") is None and len(cache) == 1


def _new_secret(user_id: str) -> tuple[str, bytes]:
    """A fresh authenticator secret: base32 for the app, sealed as the server stores it."""
    secret = totp.new_secret()
    sealed = Keyring.parse(TEST_KEYS).encrypt(secret, purpose="totp_secret", user_id=user_id)
    return base64.b32encode(secret).decode(), sealed


def _wrong_code(clock: Clock, *secrets: str) -> str:
    """Six digits that none of `secrets` shows within the accepted drift."""
    shown = {totp_now(secret, clock, offset_steps=k) for secret in secrets for k in (-1, 0, 1)}
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in shown)


def _wait_blocked_by(db: Database, blocker_pid: int, timeout: float = 20.0) -> None:
    """Until some backend waits for a lock that backend `blocker_pid` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.statements() as q:
            row = q.one(
                "SELECT count(*) AS waiting FROM pg_stat_activity WHERE %(b)s = ANY(pg_blocking_pids(pid))",
                {"b": blocker_pid},
            )
        if row is not None and row["waiting"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"no statement came to wait for backend {blocker_pid}'s lock in {timeout} s")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("warm", [True, False], ids=["cached", "first-in-process"])
@pytest.mark.parametrize("change", ["reset", "reenroll"])
@pytest.mark.parametrize("right_code", [True, False], ids=["right-code", "wrong-code"])
def test_a_verify_that_waits_for_a_credential_change_is_decided_on_the_changed_user(
    start_server: ServerFactory,
    other_connection: Database,
    clock: Clock,
    warm: bool,
    change: str,
    right_code: bool,
) -> None:
    """A Verify whose one statement meets a reset or a new enrollment mid-way (it waits for the
    user's row lock, which the change holds until it commits) is decided on the user as changed:
    the old secret's right code is not accepted and no verification token comes out; a wrong
    code is not counted against the user's new start; the new secret's first code still works.
    (PostgreSQL re-checks such an UPDATE on the newest users row only: a condition on the
    verify_state row alone let the old secret through with the new epoch's token.)"""
    holder = start_server()
    old, _ = enroll_authenticator(holder, clock, "eve")
    if warm:
        assert verify(holder, "eve", totp_now(old, clock)).result == ACCEPTED  # cached by `holder`
        clock.advance(30)
    new, new_sealed = _new_secret("eve")
    code = totp_now(old, clock) if right_code else _wrong_code(clock, old, new)
    answers: list[object] = []

    def verify_old() -> None:
        try:
            answers.append(verify(holder, "eve", code))
        except grpc.RpcError as error:
            answers.append(error)

    now = now_ms(clock)
    with other_connection.transaction() as tx:
        changer = tx.one("SELECT pg_backend_pid() AS pid", {})
        assert changer is not None
        assert store.get_user(tx, "eve", lock=True) is not None
        if change == "reset":
            store.reset_user(tx, "eve")
        else:  # a new enrollment replaces the authenticator (StartEnrollment, ConfirmEnrollment)
            store.start_method_enrollment(
                tx, "eve", "authenticator", now, with_proof=True, pending_secret=new_sealed
            )
            assert store.enable_method(tx, "eve", "authenticator", now)
        racer = threading.Thread(target=verify_old)
        racer.start()
        _wait_blocked_by(other_connection, int(changer["pid"]))
    racer.join(timeout=30)
    assert not racer.is_alive() and len(answers) == 1
    answer = answers[0]
    if change == "reset":  # nothing enrolled any more
        assert isinstance(answer, grpc.RpcError), answer
        assert answer.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert error_info(answer).reason == "NOT_ENROLLED"
    else:
        assert isinstance(answer, pb.VerifyResponse), answer
        assert answer.result == pb.VERIFY_RESULT_REJECTED and not answer.verification_token
    with other_connection.transaction() as tx:
        after = store.get_user(tx, "eve")
    assert after is not None
    # No step taken with the old secret: a reset cleared the last step, a new enrollment kept an older one.
    if change == "reset":
        assert after.totp_last_step is None
    else:
        assert after.totp_last_step is not None and after.totp_last_step < totp.time_step(clock())
    # Counted only against the secret enrolled now, for which the old secret's codes are wrong;
    # a reset user starts at none.
    assert after.failed_attempts == (1 if change == "reenroll" else 0)
    if change == "reenroll":
        assert verify(holder, "eve", totp_now(new, clock)).result == ACCEPTED
