"""The authenticator app (TOTP) end to end over a real gRPC channel, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlparse

import grpc
import pytest
from PIL import Image
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    LOCKED_FOR_GOOD_AFTER_3,
    enroll_authenticator,
    error_info,
    totp_now,
    verify,
)
from tests.server.qr_decoding import decoded, decoded_svg
from tests.server.stored_rows import all_cells


def step_to_where_only_the_new_secret_matches(clock: Clock, *, old_secret: str, new_secret: str) -> None:
    """Move the clock, a time step at a time, to the first step (this one if it will do) where
    the old app's code is none of the codes the new secret accepts (one step of drift each way).

    There a refusal of the old app's code can only mean the old secret is refused; without this,
    the two random secrets could show the same code by chance (about 3 in a million).
    """
    for _ in range(10):
        accepted = {totp_now(new_secret, clock, offset_steps=offset) for offset in (-1, 0, 1)}
        if totp_now(old_secret, clock) not in accepted:
            return
        clock.advance(30)
    raise AssertionError("the old and the new secret kept showing the same codes")


def test_enroll_confirm_verify_and_replay_is_rejected(harness: Harness, clock: Clock) -> None:
    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=harness.app_metadata)
    assert list(status.enabled_methods) == [] and not status.enrollment_required

    start = harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="alice", method=AUTHENTICATOR, account_name="alice@example.com"),
        metadata=harness.app_metadata,
    )
    assert start.WhichOneof("setup") == "authenticator"
    secret = start.authenticator.secret
    pending = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=harness.app_metadata)
    assert list(pending.pending_methods) == [AUTHENTICATOR] and list(pending.enabled_methods) == []

    wrong = harness.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id="alice",
            method=AUTHENTICATOR,
            code="000000" if totp_now(secret, clock) != "000000" else "111111",
        ),
        metadata=harness.app_metadata,
    )
    assert not wrong.confirmed and wrong.attempts_left == 4

    confirm = harness.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="alice", method=AUTHENTICATOR, code=totp_now(secret, clock)),
        metadata=harness.app_metadata,
    )
    assert confirm.confirmed
    assert list(confirm.enabled_methods) == [AUTHENTICATOR]
    assert len(confirm.backup_codes) == 10

    # The code that confirmed the enrollment is spent (RFC 6238 §5.2).
    assert verify(harness, "alice", totp_now(secret, clock)).result == pb.VERIFY_RESULT_REJECTED

    clock.advance(30)
    code = totp_now(secret, clock)
    accepted = verify(harness, "alice", code)
    assert accepted.result == pb.VERIFY_RESULT_ACCEPTED
    assert accepted.matched == pb.CODE_KIND_AUTHENTICATOR
    assert accepted.backup_codes_remaining == 10
    replay = verify(harness, "alice", code)
    assert replay.result == pb.VERIFY_RESULT_REJECTED and replay.matched == pb.CODE_KIND_UNSPECIFIED

    # A code from the previous step is older than the last accepted one: also a replay.
    clock.advance(30)
    assert (
        verify(harness, "alice", totp_now(secret, clock, offset_steps=-1)).result == pb.VERIFY_RESULT_REJECTED
    )
    assert verify(harness, "alice", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED

    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=harness.app_metadata)
    assert list(status.enabled_methods) == [AUTHENTICATOR] and list(status.pending_methods) == []


@pytest.mark.parametrize(
    ("formats", "png", "svg"),
    [
        ([], False, False),
        ([pb.QR_CODE_FORMAT_PNG], True, False),
        ([pb.QR_CODE_FORMAT_SVG], False, True),
        ([pb.QR_CODE_FORMAT_SVG, pb.QR_CODE_FORMAT_PNG, pb.QR_CODE_FORMAT_SVG], True, True),
    ],
    ids=["none by default", "png", "svg", "both, asked twice"],
)
def test_each_qr_code_format_asked_for_and_only_those_decode_to_the_otpauth_uri(
    harness: Harness, formats: list[pb.QrCodeFormat.ValueType], png: bool, svg: bool
) -> None:
    start = harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(
            user_id="bob", method=AUTHENTICATOR, account_name="bob@example.com", qr_formats=formats
        ),
        metadata=harness.app_metadata,
    )
    setup = start.authenticator
    uri = urlparse(setup.otpauth_uri)
    assert (uri.scheme, uri.netloc, uri.path) == ("otpauth", "totp", "/twofactor:bob%40example.com")
    query = parse_qs(uri.query)
    assert query["secret"] == [setup.secret] and query["issuer"] == ["twofactor"]
    assert len(setup.secret) == 32 and "=" not in setup.secret  # 160 bits, base32 without padding

    assert setup.qr_png.startswith(b"\x89PNG\r\n\x1a\n") == png and (setup.qr_png == b"") != png
    assert setup.qr_svg.startswith("<svg") == svg and (setup.qr_svg == "") != svg
    if png:
        assert decoded(Image.open(io.BytesIO(setup.qr_png))) == [setup.otpauth_uri]
        assert Image.open(io.BytesIO(setup.qr_png)).size[0] >= 200  # 6 pixels a module, quiet zone included
    if svg:
        assert decoded_svg(setup.qr_svg) == [setup.otpauth_uri]


def test_an_unknown_qr_code_format_is_refused_before_anything_is_enrolled(harness: Harness) -> None:
    for formats in ([pb.QR_CODE_FORMAT_UNSPECIFIED], [pb.QR_CODE_FORMAT_PNG, 7]):
        with pytest.raises(grpc.RpcError) as caught:
            harness.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="dan", method=AUTHENTICATOR, qr_formats=formats),
                metadata=harness.app_metadata,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "INVALID_QR_CODE_FORMAT"
    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="dan"), metadata=harness.app_metadata)
    assert list(status.pending_methods) == []


def test_an_account_name_with_a_colon_is_refused_before_anything_is_enrolled(harness: Harness) -> None:
    """The key URI's label is issuer:account, its ':' also read in its %3A form: an account name
    holding one shows another issuer in some apps and is refused by others."""
    for name in ("tenant-7:alice", "urn:example:user:42"):
        with pytest.raises(grpc.RpcError) as caught:
            harness.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="dan", method=AUTHENTICATOR, account_name=name),
                metadata=harness.app_metadata,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "INVALID_ACCOUNT_NAME"
        assert "can't hold ':'" in (caught.value.details() or "")
    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="dan"), metadata=harness.app_metadata)
    assert list(status.pending_methods) == []


def test_starting_again_replaces_the_pending_secret(harness: Harness, clock: Clock) -> None:
    first = harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="carol", method=AUTHENTICATOR), metadata=harness.app_metadata
    ).authenticator.secret
    second = harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="carol", method=AUTHENTICATOR), metadata=harness.app_metadata
    ).authenticator.secret
    assert first != second
    step_to_where_only_the_new_secret_matches(clock, old_secret=first, new_secret=second)
    stale = harness.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="carol", method=AUTHENTICATOR, code=totp_now(first, clock)),
        metadata=harness.app_metadata,
    )
    assert not stale.confirmed
    ok = harness.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="carol", method=AUTHENTICATOR, code=totp_now(second, clock)),
        metadata=harness.app_metadata,
    )
    assert ok.confirmed


def test_fifty_concurrent_verifies_of_one_code_accept_exactly_one(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "dave")
    code = totp_now(secret, clock)
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: verify(harness, "dave", code).result, range(50)))
    assert results.count(pb.VERIFY_RESULT_ACCEPTED) == 1
    assert len(results) == 50


def test_wrong_codes_lock_with_growing_retry_after(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "erin")
    right = totp_now(secret, clock)
    wrong = "000000" if right != "000000" else "111111"
    lefts = [verify(harness, "erin", wrong).attempts_left for _ in range(4)]
    assert lefts == [4, 3, 2, 1]

    fifth = verify(harness, "erin", wrong)
    assert fifth.result == pb.VERIFY_RESULT_LOCKED
    assert fifth.retry_after.seconds == 60
    assert fifth.locked_until.seconds == int(clock.now) + 60

    # While locked even the right code is refused, and it does not count as a failure.
    locked = verify(harness, "erin", right)
    assert locked.result == pb.VERIFY_RESULT_LOCKED and locked.retry_after.seconds == 60

    clock.advance(61)
    again = verify(harness, "erin", wrong)  # the sixth failure doubles the lock
    assert again.result == pb.VERIFY_RESULT_LOCKED and again.retry_after.seconds == 120

    clock.advance(121)
    ok = verify(harness, "erin", totp_now(secret, clock))
    assert ok.result == pb.VERIFY_RESULT_ACCEPTED
    # A success resets the budget.
    assert verify(harness, "erin", wrong).attempts_left == 4


def test_third_consecutive_failure_locks_for_good_with_a_limit_of_three(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(policy=LOCKED_FOR_GOOD_AFTER_3)
    secret, _ = enroll_authenticator(h, clock, "frank")
    wrong = "000000" if totp_now(secret, clock) != "000000" else "111111"
    # The first two failures lock for a second each (each call comes after the lock ran out).
    for _ in range(2):
        clock.advance(2)
        timed = verify(h, "frank", wrong)
        assert timed.result == pb.VERIFY_RESULT_LOCKED and timed.retry_after.seconds == 1
    # The third in a row locks for good: no retry_after, and no time ends it.
    clock.advance(2)
    result = verify(h, "frank", wrong)
    assert result.result == pb.VERIFY_RESULT_LOCKED and not result.HasField("retry_after")
    clock.advance(10_000)
    assert verify(h, "frank", totp_now(secret, clock)).result == pb.VERIFY_RESULT_LOCKED


def test_verify_without_enrollment_is_a_failed_precondition(harness: Harness) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="gina", email="g@example.com"), metadata=harness.app_metadata
    )
    with pytest.raises(grpc.RpcError) as raised:
        verify(harness, "gina", "123456")
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "NOT_ENROLLED"
    with pytest.raises(grpc.RpcError) as unknown:
        verify(harness, "nobody", "123456")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(unknown.value).reason == "USER_NOT_FOUND"


def test_no_table_holds_the_totp_secret_in_clear(harness: Harness, clock: Clock) -> None:
    import base64

    secret_b32, backup = enroll_authenticator(harness, clock, "henry")
    raw = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    needles = [
        raw,
        secret_b32.encode(),
        secret_b32.lower().encode(),
        raw.hex().encode(),
        base64.b64encode(raw),
    ]
    needles += [c.encode() for c in backup] + [c.replace("-", "").encode() for c in backup]
    cells = all_cells(harness.settings)
    assert cells, "the search found no data at all"
    assert any(b"henry" in cell for cell in cells)  # the search does see the user's rows
    for needle in needles:
        assert not any(needle in cell for cell in cells), "a secret is stored in clear"


def test_re_enrolling_right_after_a_login_accepts_the_new_apps_current_code(
    harness: Harness, clock: Clock
) -> None:
    old_secret, _ = enroll_authenticator(harness, clock, "ivan")
    login = verify(harness, "ivan", totp_now(old_secret, clock))
    assert login.result == pb.VERIFY_RESULT_ACCEPTED
    new_secret = harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(
            user_id="ivan", method=AUTHENTICATOR, verification_token=login.verification_token
        ),
        metadata=harness.app_metadata,
    ).authenticator.secret
    # Same time step as the login a moment ago, but another secret: not a replay.
    confirm = harness.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="ivan", method=AUTHENTICATOR, code=totp_now(new_secret, clock)),
        metadata=harness.app_metadata,
    )
    assert confirm.confirmed and list(confirm.backup_codes) == []  # not the first method: codes are kept
    assert verify(harness, "ivan", totp_now(new_secret, clock)).result == pb.VERIFY_RESULT_REJECTED
    clock.advance(30)
    step_to_where_only_the_new_secret_matches(clock, old_secret=old_secret, new_secret=new_secret)
    assert verify(harness, "ivan", totp_now(old_secret, clock)).result == pb.VERIFY_RESULT_REJECTED
    assert verify(harness, "ivan", totp_now(new_secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
