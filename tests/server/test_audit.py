"""Audit events for verification outcomes (failures by default, everything with
TWOFACTOR_AUDIT_VERIFICATIONS=all), and ListAuditEvents filtered by action and time."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from google.protobuf import timestamp_pb2
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import EMAIL, CountingDatabase, enroll_authenticator, error_info, totp_now
from tests.server.stored_rows import query
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.domain.models import Caller, VerifyResult
from twofactor_server.settings import PolicySettings
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.verification import Verification

VERIFICATION_ACTIONS = (
    "verification_rejected",
    "verification_locked",
    "verification_accepted",
    "backup_code_used",
)


def events(h: Harness, **filters: object) -> list[admin_pb.AuditEvent]:
    return list(
        h.admin.ListAuditEvents(
            admin_pb.ListAuditEventsRequest(page_size=1000, **filters),  # type: ignore[arg-type]
            metadata=h.admin_metadata,
        ).events
    )


def verify_as(h: Harness, user_id: str, code: str, request_id: str) -> int:
    return int(
        h.twofactor.Verify(
            pb.VerifyRequest(user_id=user_id, code=code),
            metadata=(*h.app_metadata, ("x-request-id", request_id)),
        ).result
    )


def at_ms(seconds: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(seconds), nanos=int(seconds % 1 * 1e9))


def test_failures_are_audited_and_acceptances_are_not_by_default(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(policy={"lockout_threshold": 2, "max_consecutive_failures": 10})
    secret, backup = enroll_authenticator(h, clock, "ada")
    assert verify_as(h, "ada", totp_now(secret, clock), "ok-1") == pb.VERIFY_RESULT_ACCEPTED
    assert verify_as(h, "ada", backup[0], "backup-1") == pb.VERIFY_RESULT_ACCEPTED
    assert verify_as(h, "ada", "000000", "wrong-1") == pb.VERIFY_RESULT_REJECTED
    assert verify_as(h, "ada", "000001", "wrong-2") == pb.VERIFY_RESULT_LOCKED
    assert verify_as(h, "ada", "000002", "while-locked") == pb.VERIFY_RESULT_LOCKED

    found = [(e.action, e.request_id, e.outcome, e.actor) for e in events(h, actions=VERIFICATION_ACTIONS)]
    assert list(reversed(found)) == [
        ("backup_code_used", "backup-1", "success", "backend"),
        ("verification_rejected", "wrong-1", "failure", "backend"),
        ("verification_locked", "wrong-2", "failure", "backend"),
        ("verification_locked", "while-locked", "failure", "backend"),
    ]
    assert [e.request_id for e in events(h, actions=["user_locked"])] == ["wrong-2"]


def test_a_code_sent_again_after_its_acceptance_is_audited_without_counting(
    start_server: ServerFactory, clock: Clock
) -> None:
    """A double submit, or a captured code replayed: REJECTED (LOCKED while the user is locked)
    without a count, and an event each time. Replays left no trace before."""
    h = start_server(policy={"lockout_threshold": 2, "max_consecutive_failures": 10})
    secret, _ = enroll_authenticator(h, clock, "al")
    code = totp_now(secret, clock)
    assert verify_as(h, "al", code, "ok-1") == pb.VERIFY_RESULT_ACCEPTED
    assert verify_as(h, "al", code, "again-1") == pb.VERIFY_RESULT_REJECTED  # the secret is cached
    assert verify_as(h, "al", code, "again-2") == pb.VERIFY_RESULT_REJECTED
    assert verify_as(h, "al", "000000", "wrong-1") == pb.VERIFY_RESULT_REJECTED
    assert verify_as(h, "al", "000001", "wrong-2") == pb.VERIFY_RESULT_LOCKED
    assert verify_as(h, "al", code, "again-locked") == pb.VERIFY_RESULT_LOCKED  # the locking path

    found = [(e.action, e.request_id, e.outcome, e.detail) for e in events(h, actions=VERIFICATION_ACTIONS)]
    assert list(reversed(found)) == [
        ("verification_rejected", "again-1", "failure", "code already used"),
        ("verification_rejected", "again-2", "failure", "code already used"),
        ("verification_rejected", "wrong-1", "failure", "1 failures"),
        ("verification_locked", "wrong-2", "failure", "2 failures"),
        ("verification_locked", "again-locked", "failure", "code already used"),
    ]
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="al"), metadata=h.app_metadata)
    assert status.locked_until.seconds > 0
    assert [e.request_id for e in events(h, actions=["user_locked"])] == ["wrong-2"]  # 2 counted, not 5


def test_with_all_an_accepted_code_is_audited_in_the_same_statement(
    start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(policy={"audit_verifications": "all"})
    secret, _ = enroll_authenticator(h, clock, "bo")
    assert verify_as(h, "bo", totp_now(secret, clock), "fast-1") == pb.VERIFY_RESULT_ACCEPTED
    # A replay is refused: the fast path's conditional UPDATE wrote nothing, so no second event.
    assert verify_as(h, "bo", totp_now(secret, clock), "replay-1") == pb.VERIFY_RESULT_REJECTED
    found = [(e.action, e.request_id, e.detail) for e in events(h, actions=["verification_accepted"])]
    assert found == [("verification_accepted", "fast-1", "authenticator")]


class _Kept:
    """Queues nothing: the test reads each code from the database, as a worker would."""

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        pass


def _code_of(h: Harness, challenge_id: str) -> str:
    rows = query(
        h.settings, "SELECT code_ciphertext FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id}
    )
    sealed = bytes(rows[0]["code_ciphertext"])
    return Keyring.parse(TEST_KEYS).decrypt(sealed, purpose=CHALLENGE_CODE, user_id=challenge_id).decode()


@pytest.mark.parametrize("mode", ["failures", "all"])
def test_an_accepted_emailed_code_is_audited_with_all_only_and_a_backup_code_once(
    start_server: ServerFactory, clock: Clock, mode: str
) -> None:
    h = start_server(dispatcher=_Kept(), policy={"audit_verifications": mode})
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="em", email="em@example.com"), metadata=h.app_metadata
    )
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="em", method=EMAIL), metadata=h.app_metadata
    )
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id="em", method=EMAIL, code=_code_of(h, start.challenge.challenge_id)
        ),
        metadata=h.app_metadata,
    )
    assert confirmed.confirmed
    clock.advance(31)  # past the resend cooldown
    sent = h.twofactor.SendCode(pb.SendCodeRequest(user_id="em", method=EMAIL), metadata=h.app_metadata)
    assert (
        verify_as(h, "em", _code_of(h, sent.challenge.challenge_id), "email-1") == pb.VERIFY_RESULT_ACCEPTED
    )
    assert verify_as(h, "em", confirmed.backup_codes[0], "backup-1") == pb.VERIFY_RESULT_ACCEPTED

    found = [(e.action, e.request_id, e.detail) for e in events(h, actions=VERIFICATION_ACTIONS)]
    expected = [("backup_code_used", "backup-1", "")]
    if mode == "all":
        expected.append(("verification_accepted", "email-1", "email"))
    assert found == expected  # newest first


def test_list_audit_events_filters_by_time_range(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server()
    start = clock.now
    for n in range(3):
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id=f"t{n}", email=f"t{n}@example.com"), metadata=h.app_metadata
        )
        clock.advance(60)
    users = [e.user_id for e in events(h, since=at_ms(start + 60), until=at_ms(start + 120))]
    assert users == ["t1"]  # [since, until): t2 happened exactly at until
    assert [e.user_id for e in events(h, since=at_ms(start + 60))] == ["t2", "t1"]
    assert [e.user_id for e in events(h, until=at_ms(start + 60))] == ["t0"]


@pytest.mark.parametrize(
    "filters",
    [
        {"since": at_ms(100), "until": at_ms(100)},
        {"actions": ["x" * 65]},
        {"actions": [""]},
        {"actions": [f"a{n}" for n in range(51)]},
        # Beyond Timestamp's years 0001-9999: the milliseconds overflowed SQLite's integers (INTERNAL).
        {"since": timestamp_pb2.Timestamp(seconds=2**62)},
        {"until": timestamp_pb2.Timestamp(seconds=-(2**62))},
        {"since": timestamp_pb2.Timestamp(seconds=253_402_300_800)},
    ],
)
def test_a_bad_filter_is_invalid_audit_filter(
    start_server: ServerFactory, filters: dict[str, object]
) -> None:
    h = start_server()
    with pytest.raises(grpc.RpcError) as refused:
        events(h, **filters)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "INVALID_AUDIT_FILTER"


class _NeverDispatched:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        raise AssertionError("Verify sends nothing")


@pytest.mark.parametrize("mode", ["failures", "all"])
def test_the_fast_authenticator_path_keeps_its_statement_count_when_auditing_acceptances(
    start_server: ServerFactory, clock: Clock, backend: str, mode: str
) -> None:
    if backend != "postgres":
        return  # the statement count is a PostgreSQL round-trip budget; SQLite audits in a transaction
    h = start_server()
    secret, _ = enroll_authenticator(h, clock, "cy")
    policy = replace(PolicySettings(), audit_verifications=mode)
    db = CountingDatabase(h.server.db)
    keyring = Keyring.parse(TEST_KEYS)
    challenges = Challenges(db, keyring, policy, _NeverDispatched(), clock)  # type: ignore[arg-type]
    notices = Notices(db, keyring, policy, _NeverDispatched(), clock)  # type: ignore[arg-type]
    backup = BackupCodes(db, keyring, policy, notices, clock)  # type: ignore[arg-type]
    verification = Verification(db, keyring, policy, challenges, backup, notices, clock)  # type: ignore[arg-type]
    outcome = verification.verify(
        "cy", totp_now(secret, clock), caller=Caller(actor="t", request_id="count-1")
    )
    assert outcome.result == VerifyResult.ACCEPTED
    assert (db.statements_run, db.transactions) == (2, 0)  # read, accept (+ audit)
    clock.advance(30)  # the next login: the sealed secret is cached now
    outcome = verification.verify(
        "cy", totp_now(secret, clock), caller=Caller(actor="t", request_id="count-2")
    )
    assert outcome.result == VerifyResult.ACCEPTED
    assert (db.statements_run, db.transactions) == (3, 0)  # accept (+ audit): one statement
    accepted = [e.request_id for e in events(h, actions=["verification_accepted"])]
    assert sorted(accepted) == (["count-1", "count-2"] if mode == "all" else [])
