"""Backup codes end to end over a real gRPC channel, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import enroll_authenticator, error_info, verified_token, verify
from tests.server.stored_rows import all_cells, query
from twofactor_server.domain.keyring import BACKUP_CODE, Keyring

DISPLAYED = re.compile(r"^[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}$")


def get_codes(h: Harness, user_id: str, token: str) -> pb.GetBackupCodesResponse:
    return h.twofactor.GetBackupCodes(
        pb.GetBackupCodesRequest(user_id=user_id, verification_token=token), metadata=h.app_metadata
    )


def regenerate(h: Harness, user_id: str, token: str) -> pb.RegenerateBackupCodesResponse:
    return h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id=user_id, verification_token=token), metadata=h.app_metadata
    )


def accepted_backup(response: pb.VerifyResponse) -> bool:
    return response.result == pb.VERIFY_RESULT_ACCEPTED and response.matched == pb.CODE_KIND_BACKUP_CODE


def test_first_enrollment_gives_ten_well_formed_codes_that_are_shown_again(
    harness: Harness, clock: Clock
) -> None:
    enrolled_at = clock.now
    secret, codes = enroll_authenticator(harness, clock, "alice")
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(DISPLAYED.match(c) for c in codes), codes

    token = verified_token(harness, clock, "alice", secret)
    shown = get_codes(harness, "alice", token)
    assert sorted(shown.codes) == sorted(codes)
    assert shown.generated_at.seconds == int(enrolled_at)
    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=harness.app_metadata)
    assert status.backup_codes_remaining == 10

    # Only unused codes are shown again.
    assert accepted_backup(verify(harness, "alice", codes[3]))
    again = get_codes(harness, "alice", token)
    assert sorted(again.codes) == sorted(codes[:3] + codes[4:])
    assert again.generated_at == shown.generated_at


def test_the_count_follows_the_policy(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(policy={"backup_code_count": 4})
    secret, codes = enroll_authenticator(h, clock, "bob")
    assert len(codes) == 4
    assert len(regenerate(h, "bob", verified_token(h, clock, "bob", secret)).codes) == 4


def test_each_code_works_once_and_verify_reports_how_many_are_left(harness: Harness, clock: Clock) -> None:
    _, codes = enroll_authenticator(harness, clock, "carol")
    first = verify(harness, "carol", codes[0])
    assert accepted_backup(first) and first.backup_codes_remaining == 9
    replay = verify(harness, "carol", codes[0])
    assert replay.result == pb.VERIFY_RESULT_REJECTED and replay.matched == pb.CODE_KIND_UNSPECIFIED
    assert replay.backup_codes_remaining == 9
    second = verify(harness, "carol", codes[1])
    assert accepted_backup(second) and second.backup_codes_remaining == 8
    status = harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="carol"), metadata=harness.app_metadata)
    assert status.backup_codes_remaining == 8


def test_a_code_of_another_user_is_rejected(harness: Harness, clock: Clock) -> None:
    _, dans = enroll_authenticator(harness, clock, "dan")
    enroll_authenticator(harness, clock, "eve")
    assert verify(harness, "eve", dans[0]).result == pb.VERIFY_RESULT_REJECTED
    assert accepted_backup(verify(harness, "dan", dans[0]))


def test_regenerate_replaces_every_old_code_at_once(harness: Harness, clock: Clock) -> None:
    secret, old = enroll_authenticator(harness, clock, "frank")
    login = verify(harness, "frank", old[0])
    assert accepted_backup(login)
    clock.advance(5)
    fresh = regenerate(harness, "frank", login.verification_token)
    assert fresh.generated_at.seconds == int(clock.now)
    assert len(fresh.codes) == 10 and all(DISPLAYED.match(c) for c in fresh.codes)
    assert not set(fresh.codes) & set(old)

    shown = get_codes(harness, "frank", verified_token(harness, clock, "frank", secret))
    assert sorted(shown.codes) == sorted(fresh.codes) and shown.generated_at == fresh.generated_at
    # Old codes fail; stop before the failures lock the user (threshold 5).
    for code in old[1:4]:
        rejected = verify(harness, "frank", code)
        assert rejected.result == pb.VERIFY_RESULT_REJECTED and rejected.backup_codes_remaining == 10
    ok = verify(harness, "frank", fresh.codes[0])
    assert accepted_backup(ok) and ok.backup_codes_remaining == 9


def test_codes_are_accepted_whatever_the_case_spacing_dashes_and_look_alikes(
    harness: Harness, clock: Clock
) -> None:
    secret, codes = enroll_authenticator(harness, clock, "gina")
    # Look-alikes need a code holding a 0 and two others holding a 1; a set of ten lacks them with
    # probability ~25%, so draw new sets (bounded: 40 misses in a row has probability ~1e-25).
    for _ in range(40):
        zeros = [c for c in codes if "0" in c]
        ones = [c for c in codes if "1" in c and c != (zeros[0] if zeros else None)]
        if zeros and len(ones) >= 2:
            break
        codes = list(regenerate(harness, "gina", verified_token(harness, clock, "gina", secret)).codes)
    else:
        pytest.fail("no set of codes with a 0 and two 1s in 40 draws: the generator is broken")
    with_zero, with_one, with_another_one = zeros[0], ones[0], ones[1]
    others = [c for c in codes if c not in (with_zero, with_one, with_another_one)]

    typed_forms = [
        others[0].upper(),  # upper case
        others[1].replace("-", " "),  # a space for the dash
        others[2].replace("-", ""),  # no dash
        "  " + " ".join(others[3].upper()) + " ",  # spaced out
        with_zero.replace("0", "o").upper(),  # O for 0
        with_one.replace("1", "i"),  # i for 1
        with_another_one.replace("1", "L").replace("0", "o"),  # L for 1
    ]
    remaining = 10
    for typed in typed_forms:
        response = verify(harness, "gina", typed)
        remaining -= 1
        assert accepted_backup(response), typed
        assert response.backup_codes_remaining == remaining


def test_fifty_concurrent_uses_of_one_code_accept_exactly_one(harness: Harness, clock: Clock) -> None:
    secret, codes = enroll_authenticator(harness, clock, "henry")
    token = verified_token(harness, clock, "henry", secret)  # before the user is locked out
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: verify(harness, "henry", codes[0]), range(50)))
    assert len(responses) == 50
    assert sum(accepted_backup(r) for r in responses) == 1
    assert all(r.result != pb.VERIFY_RESULT_ACCEPTED for r in responses if not accepted_backup(r))
    used = query(
        harness.settings,
        "SELECT COUNT(*) AS n FROM backup_codes WHERE user_id = %(u)s AND used_at IS NOT NULL",
        {"u": "henry"},
    )
    assert used[0]["n"] == 1
    assert sorted(get_codes(harness, "henry", token).codes) == sorted(codes[1:])


def test_no_backup_code_is_stored_in_clear(harness: Harness, clock: Clock) -> None:
    _, first = enroll_authenticator(harness, clock, "ivan")
    login = verify(harness, "ivan", first[0])
    assert accepted_backup(login)
    second = list(regenerate(harness, "ivan", login.verification_token).codes)
    login = verify(harness, "ivan", second[0].upper().replace("-", " "))
    assert accepted_backup(login)
    get_codes(harness, "ivan", login.verification_token)

    cells = all_cells(harness.settings)
    assert any(b"ivan" in cell for cell in cells)  # the scan does see the user's rows
    stored = query(
        harness.settings,
        "SELECT code_hash, code_ciphertext FROM backup_codes WHERE user_id = %(u)s",
        {"u": "ivan"},
    )
    assert len(stored) == 10
    # Per code, a keyed HMAC-SHA256 and an AES-GCM ciphertext (each after the 4-byte key version),
    # both bound to the user: the server's keys open them, nothing else does.
    keyring = Keyring.parse(TEST_KEYS)
    assert all(len(bytes(r["code_hash"])) == 4 + 32 for r in stored)
    assert all(len(bytes(r["code_ciphertext"])) == 4 + 12 + 10 + 16 for r in stored)
    opened = [
        keyring.decrypt(bytes(r["code_ciphertext"]), purpose=BACKUP_CODE, user_id="ivan").decode()
        for r in stored
    ]
    assert sorted(opened) == sorted(c.replace("-", "") for c in second)
    for row, code in zip(stored, opened, strict=True):
        assert keyring.matches(bytes(row["code_hash"]), f"ivan\0{code}".encode(), purpose=BACKUP_CODE)
        assert not Keyring.parse(Keyring.new_key_spec(1)).matches(
            bytes(row["code_hash"]), f"ivan\0{code}".encode(), purpose=BACKUP_CODE
        )
    for code in first + second:
        canonical = code.replace("-", "")
        needles = {code, canonical}
        needles |= {hashlib.sha256(form.encode()).hexdigest() for form in (code, canonical)}
        for needle in needles:
            assert not any(needle.encode() in cell for cell in cells), f"{needle} is stored in clear"
        for form in (code, canonical):
            digest = hashlib.sha256(form.encode()).digest()
            assert not any(digest in cell for cell in cells), "a backup code is stored as a plain hash"


def test_showing_the_codes_is_audited(harness: Harness, clock: Clock) -> None:
    secret, _ = enroll_authenticator(harness, clock, "vera")
    shown = get_codes(harness, "vera", verified_token(harness, clock, "vera", secret))
    viewed = [
        (e.action, e.outcome, e.detail, e.actor)
        for e in harness.admin.ListAuditEvents(
            admin_pb.ListAuditEventsRequest(user_id="vera", actions=["backup_codes_viewed"]),
            metadata=harness.admin_metadata,
        ).events
    ]
    assert len(shown.codes) == 10
    assert viewed == [("backup_codes_viewed", "success", "10 codes", "backend")]


def test_showing_the_codes_waits_for_a_change_of_credentials_and_then_refuses_the_old_proof(
    start_server: ServerFactory, clock: Clock, backend: str
) -> None:
    """A regeneration (or reset) committing while GetBackupCodes runs must not show the new set
    to the proof it retired: the proof is checked under the user's row lock."""
    if backend != "postgres":
        return  # SQLite serializes writers (and this read) on the database lock
    h = start_server()
    secret, _ = enroll_authenticator(h, clock, "walt")
    token = verified_token(h, clock, "walt", secret)
    with psycopg.connect(h.settings.database_url, autocommit=True) as holder, ThreadPoolExecutor(1) as pool:
        holder.execute("BEGIN")
        holder.execute("UPDATE users SET credential_epoch = credential_epoch + 1 WHERE user_id = 'walt'")
        shown = pool.submit(get_codes, h, "walt", token)
        wait_until_waiting(holder, [shown], "GetBackupCodes")
        holder.execute("COMMIT")  # the regeneration commits; the call decides after it
        with pytest.raises(grpc.RpcError) as refused:
            shown.result(timeout=30)
    assert error_info(refused.value).reason == "STEP_UP_REQUIRED"


def wait_until_waiting(
    holder: psycopg.Connection[tuple[object, ...]], calls: list[Future[Any]], what: str
) -> None:
    """Poll until each of `calls` waits for a lock in the test's database (behind `holder`, or
    queued behind a call that does: a row's second waiter waits for the first); none may end first."""
    deadline = time.monotonic() + 30
    while True:
        row = holder.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
        if row and row[0] >= len(calls):
            return
        assert not any(call.done() for call in calls), f"{what} went ahead of the user's row lock"
        assert time.monotonic() < deadline, f"{what} did not wait for the user's row"
        time.sleep(0.01)  # polling a condition


def test_backup_codes_need_an_enrolled_user(harness: Harness, clock: Clock) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="judy", email="judy@example.com"), metadata=harness.app_metadata
    )
    for call in (get_codes, regenerate):
        with pytest.raises(grpc.RpcError) as not_enrolled:
            call(harness, "judy", "")
        assert not_enrolled.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(not_enrolled.value).reason == "NOT_ENROLLED"
        with pytest.raises(grpc.RpcError) as unknown:
            call(harness, "nobody", "")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(unknown.value).reason == "USER_NOT_FOUND"


def test_one_proof_regenerates_the_codes_once_when_two_calls_race(
    start_server: ServerFactory, clock: Clock, backend: str
) -> None:
    """Two RegenerateBackupCodes with one proof, let go at the same moment: one new set. Had both
    read the credential epoch before either moved it, both would answer a set, and the first
    caller's codes, shown to the user, would already be void."""
    if backend != "postgres":
        return  # SQLite serializes writers on the database lock
    h = start_server()
    secret, _ = enroll_authenticator(h, clock, "vic")
    token = verified_token(h, clock, "vic", secret)
    with psycopg.connect(h.settings.database_url, autocommit=True) as holder, ThreadPoolExecutor(2) as pool:
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM users WHERE user_id = 'vic' FOR UPDATE")
        calls = [pool.submit(regenerate, h, "vic", token) for _ in range(2)]
        wait_until_waiting(holder, calls, "a RegenerateBackupCodes")
        holder.execute("COMMIT")
        outcomes = []
        for call in calls:
            try:
                outcomes.append(("ok", tuple(call.result(timeout=30).codes)))
            except grpc.RpcError as error:
                outcomes.append((error_info(error).reason, ()))
    assert sorted(kind for kind, _ in outcomes) == ["STEP_UP_REQUIRED", "ok"]
    (shown,) = [codes for kind, codes in outcomes if kind == "ok"]
    assert accepted_backup(verify(h, "vic", shown[0]))  # the set shown is the one in force
