"""Step-up: sensitive calls for an enrolled user need a fresh verification_token from Verify,
over a real channel on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import json_format
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TOKENS, Clock, Harness, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    confirm_authenticator,
    enroll_authenticator,
    error_info,
    start_authenticator,
    totp_now,
    verified_token,
    verify,
)
from twofactor_server.settings import Settings, SettingsError, TokenSetting

OTHER_APP_TOKEN = "test-other-app-token"
OTHER_APP = TokenSetting(
    "other-backend", frozenset({"app"}), hashlib.sha256(OTHER_APP_TOKEN.encode()).digest()
)
OTHER_METADATA = (("authorization", f"Bearer {OTHER_APP_TOKEN}"),)

# Each guarded call, made for `user` with `token`; it succeeds for an enrolled user with a valid one.
GuardedCall = Callable[[Harness, str, str], object]
GUARDED: dict[str, GuardedCall] = {
    "GetBackupCodes": lambda h, user, token: h.twofactor.GetBackupCodes(
        pb.GetBackupCodesRequest(user_id=user, verification_token=token), metadata=h.app_metadata
    ),
    "RegenerateBackupCodes": lambda h, user, token: h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id=user, verification_token=token), metadata=h.app_metadata
    ),
    "DisableMethod": lambda h, user, token: h.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id=user, method=AUTHENTICATOR, verification_token=token),
        metadata=h.app_metadata,
    ),
    "StartEnrollment(AUTHENTICATOR)": lambda h, user, token: h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=AUTHENTICATOR, verification_token=token),
        metadata=h.app_metadata,
    ),
    "StartEnrollment(EMAIL)": lambda h, user, token: h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=EMAIL, verification_token=token),
        metadata=h.app_metadata,
    ),
    "SetContact": lambda h, user, token: h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user, phone="+14155550199", verification_token=token),
        metadata=h.app_metadata,
    ),
}


def set_email(h: Harness, user: str, token: str = "") -> None:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user, email=f"{user}@example.com", verification_token=token),
        metadata=h.app_metadata,
    )


def refused_for_step_up(call: Callable[[], object]) -> str:
    """Make the call, expect STEP_UP_REQUIRED; return the one-line message."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, raised.value.details()
    assert error_info(raised.value).reason == "STEP_UP_REQUIRED", raised.value.details()
    return str(raised.value.details())


@pytest.mark.parametrize("rpc", list(GUARDED))
def test_every_guarded_call_needs_a_fresh_token_of_the_same_user_and_caller(
    start_server: ServerFactory, clock: Clock, rpc: str
) -> None:
    h = start_server(tokens=(*TOKENS, OTHER_APP))
    call = GUARDED[rpc]
    set_email(h, "alice")  # no method yet: no token needed
    alice, _ = enroll_authenticator(h, clock, "alice")
    bob, _ = enroll_authenticator(h, clock, "bob")

    message = refused_for_step_up(lambda: call(h, "alice", ""))
    assert "verification_token" in message and "Verify" in message
    refused_for_step_up(lambda: call(h, "alice", "tfv1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"))
    refused_for_step_up(lambda: call(h, "alice", "not a token"))
    # Another user's token.
    refused_for_step_up(lambda: call(h, "alice", verified_token(h, clock, "bob", bob)))
    # Alice's token, but asked for by another API caller.
    other = h.twofactor.Verify(
        pb.VerifyRequest(user_id="alice", code=totp_now(alice, clock)), metadata=OTHER_METADATA
    )
    assert other.result == pb.VERIFY_RESULT_ACCEPTED and other.verification_token
    clock.advance(30)
    refused_for_step_up(lambda: call(h, "alice", other.verification_token))
    # Alice's own token, expired: TWOFACTOR_STEP_UP_SECONDS (300) have passed since it was issued.
    expired = verified_token(h, clock, "alice", alice)  # moves the clock 30 s on
    clock.advance(300 - 30)
    refused_for_step_up(lambda: call(h, "alice", expired))

    # A fresh one works, for this call, still near the end of its lifetime.
    fresh = verified_token(h, clock, "alice", alice)
    clock.advance(300 - 30 - 1)
    call(h, "alice", fresh)


def test_a_token_is_bounded_in_size(harness: Harness, clock: Clock) -> None:
    enroll_authenticator(harness, clock, "ann")
    with pytest.raises(grpc.RpcError) as raised:
        GUARDED["GetBackupCodes"](harness, "ann", "x" * 257)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == "INVALID_VERIFICATION_TOKEN"


def test_the_first_enrollment_needs_no_token_and_its_confirmation_brings_one(
    harness: Harness, clock: Clock
) -> None:
    set_email(harness, "carl")
    start = start_authenticator(harness, "carl")
    confirm = confirm_authenticator(harness, clock, "carl", start)
    assert confirm.result == pb.CONFIRM_RESULT_CONFIRMED and confirm.verification_token
    # The panel shows the new backup codes at once, with the token the confirmation returned.
    shown = GUARDED["GetBackupCodes"](harness, "carl", confirm.verification_token)
    assert isinstance(shown, pb.GetBackupCodesResponse)
    assert sorted(shown.codes) == sorted(confirm.backup_codes)
    # Ten minutes later the same token no longer works: the user must give a code again.
    clock.advance(600)
    refused_for_step_up(lambda: GUARDED["GetBackupCodes"](harness, "carl", confirm.verification_token))


def test_a_credential_change_retires_every_earlier_token(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "dora")
    token = verified_token(harness, clock, "dora", secret)
    GUARDED["GetBackupCodes"](harness, "dora", token)
    GUARDED["GetBackupCodes"](harness, "dora", token)  # reusable within its lifetime

    # Regenerating the backup codes moves the credential epoch: the token is spent.
    GUARDED["RegenerateBackupCodes"](harness, "dora", token)
    refused_for_step_up(lambda: GUARDED["GetBackupCodes"](harness, "dora", token))

    # So does a contact change.
    token = verified_token(harness, clock, "dora", secret)
    set_email(harness, "dora", token)
    refused_for_step_up(lambda: GUARDED["GetBackupCodes"](harness, "dora", token))

    # And an admin reset: after enrolling again, the token from before the reset is refused.
    token = verified_token(harness, clock, "dora", secret)
    harness.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id="dora", reason="lost phone"), metadata=harness.admin_metadata
    )
    enroll_authenticator(harness, clock, "dora")
    refused_for_step_up(lambda: GUARDED["GetBackupCodes"](harness, "dora", token))


def test_a_token_is_not_a_login_code(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "eli")
    token = verified_token(harness, clock, "eli", secret)
    with pytest.raises(grpc.RpcError) as raised:
        verify(harness, "eli", token)
    assert error_info(raised.value).reason == "INVALID_CODE"
    rejected = harness.twofactor.ConfirmEnrollment
    with pytest.raises(grpc.RpcError):
        rejected(
            pb.ConfirmEnrollmentRequest(user_id="eli", method=AUTHENTICATOR, code=token),
            metadata=harness.app_metadata,
        )


def test_step_up_off_lets_the_calls_through_without_a_token(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(policy={"step_up_required": False})
    secret, codes = enroll_authenticator(h, clock, "fay")
    shown = GUARDED["GetBackupCodes"](h, "fay", "")
    assert isinstance(shown, pb.GetBackupCodesResponse) and sorted(shown.codes) == sorted(codes)
    # Verify still hands out tokens (a caller can pass them whatever the setting).
    assert verified_token(h, clock, "fay", secret)


def test_the_step_up_settings_are_read_from_the_environment() -> None:
    assert Settings.from_env({}).policy.step_up_required
    assert Settings.from_env({}).policy.step_up_seconds == 300
    off = Settings.from_env({"TWOFACTOR_STEP_UP": "off", "TWOFACTOR_STEP_UP_SECONDS": "60"}).policy
    assert (off.step_up_required, off.step_up_seconds) == (False, 60)
    with pytest.raises(SettingsError, match="TWOFACTOR_STEP_UP must be one of required, off"):
        Settings.from_env({"TWOFACTOR_STEP_UP": "maybe"})
    with pytest.raises(SettingsError, match="TWOFACTOR_STEP_UP_SECONDS"):
        Settings.from_env({"TWOFACTOR_STEP_UP_SECONDS": "0"})


def test_a_short_step_up_lifetime_is_honoured(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(policy={"step_up_seconds": 60})
    secret, _ = enroll_authenticator(h, clock, "gus")
    token = verified_token(h, clock, "gus", secret)  # 30 s ago
    GUARDED["GetBackupCodes"](h, "gus", token)
    clock.advance(31)
    refused_for_step_up(lambda: GUARDED["GetBackupCodes"](h, "gus", token))


# ---- ConfirmEnrollment says what happened --------------------------------------------------------


def test_confirm_result_says_rejected_locked_or_confirmed(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(policy={"lockout_threshold": 2, "lockout_base_seconds": 60})
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="hal", method=AUTHENTICATOR), metadata=h.app_metadata
    )
    secret = start.authenticator.secret
    near = {totp_now(secret, clock, offset_steps=k) for k in range(-2, 3)}
    wrong = next(c for c in ("987654", "876543", "765432") if c not in near)

    def confirm(code: str) -> pb.ConfirmEnrollmentResponse:
        return h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="hal", method=AUTHENTICATOR, code=code),
            metadata=h.app_metadata,
        )

    rejected = confirm(wrong)
    assert (rejected.result, rejected.confirmed, rejected.attempts_left) == (
        pb.CONFIRM_RESULT_REJECTED,
        False,
        1,
    )
    assert not rejected.verification_token
    # grpcurl prints the message as JSON: the outcome is there, not just attempts_left.
    assert json_format.MessageToDict(rejected)["result"] == "CONFIRM_RESULT_REJECTED"
    locked = confirm(wrong)
    assert locked.result == pb.CONFIRM_RESULT_LOCKED and not locked.confirmed
    assert json_format.MessageToDict(locked)["result"] == "CONFIRM_RESULT_LOCKED"
    clock.advance(61)
    confirmed = confirm(totp_now(secret, clock))
    assert confirmed.result == pb.CONFIRM_RESULT_CONFIRMED and confirmed.confirmed
    assert json_format.MessageToDict(confirmed)["result"] == "CONFIRM_RESULT_CONFIRMED"


# ---- a user's own double submit -----------------------------------------------------------------


def test_sending_the_accepted_code_again_is_rejected_without_counting(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "ida")
    code = totp_now(secret, clock)
    assert verify(harness, "ida", code).result == pb.VERIFY_RESULT_ACCEPTED
    for _ in range(7):  # more than the lockout threshold (5)
        again = verify(harness, "ida", code)
        assert again.result == pb.VERIFY_RESULT_REJECTED and again.attempts_left == 5
        assert not again.verification_token
    user = harness.admin.GetUser(admin_pb.GetUserRequest(user_id="ida"), metadata=harness.admin_metadata).user
    assert user.failed_attempts == 0 and not user.HasField("locked_until")
    # A wrong code still counts.
    near = {totp_now(secret, clock, offset_steps=k) for k in range(-2, 3)}
    wrong = next(c for c in ("987654", "876543", "765432") if c not in near)
    assert verify(harness, "ida", wrong).attempts_left == 4


def test_fifty_concurrent_submits_of_one_right_code_accept_one_and_lock_nobody(
    harness: Harness, clock: Clock
) -> None:
    secret, _ = enroll_authenticator(harness, clock, "jon")
    code = totp_now(secret, clock)
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: verify(harness, "jon", code), range(50)))
    assert sum(r.result == pb.VERIFY_RESULT_ACCEPTED for r in responses) == 1
    # Every submit is counted before its code is decided on (so concurrency can't widen the
    # lockout); if five are in flight before the winner settles, a few may meet that passing
    # lock. None is left counted once all are answered, and none is accepted twice.
    others = [r for r in responses if r.result != pb.VERIFY_RESULT_ACCEPTED]
    assert all(r.result in (pb.VERIFY_RESULT_REJECTED, pb.VERIFY_RESULT_LOCKED) for r in others)
    assert not any(r.verification_token for r in others)
    user = harness.admin.GetUser(admin_pb.GetUserRequest(user_id="jon"), metadata=harness.admin_metadata).user
    assert user.failed_attempts == 0 and not user.HasField("locked_until") and not user.locked_permanently
    clock.advance(30)
    assert verify(harness, "jon", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
