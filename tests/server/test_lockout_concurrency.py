"""Concurrent guesses can't widen the lockout: every guess is counted before anything is decided
on it, so with a threshold of 1 only one guess is tried per lock window, whatever arrives at once.

The queue-order test holds a PostgreSQL row lock; the statistical test runs on both stores."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import enroll_authenticator, totp_now, verified_token, verify, wait_until
from tests.server.stored_rows import query
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.lockout import Reservation
from twofactor_server.domain.models import Caller, VerifyResult
from twofactor_server.storage import attempts
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.verification import Verification

THRESHOLD_1 = {"lockout_threshold": 1, "lockout_base_seconds": 60}
WAIT_LIMIT = 30.0  # seconds; every wait below is for a condition, bounded by this


def wrong_codes(secret: str, clock: Clock, n: int) -> list[str]:
    near = {totp_now(secret, clock, offset_steps=k) for k in range(-2, 3)}
    candidates = [f"{i:06d}" for i in (987654, 876543, 765432, 654321, 543210, 432109, 321098)]
    return [c for c in candidates if c not in near][:n]


@pytest.fixture
def held_row(start_server: ServerFactory) -> Iterator[tuple[Harness, psycopg.Connection[tuple[object, ...]]]]:
    """A server with threshold 1, and a connection of the test's own to hold a user's row lock."""
    h = start_server(policy=THRESHOLD_1)
    with psycopg.connect(h.settings.database_url) as conn:
        yield h, conn


def waiting_behind(conn: psycopg.Connection[tuple[object, ...]], holder: int) -> int:
    """How many sessions wait, directly or through others, on the session `holder`."""
    rows = conn.execute(
        "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchall()
    blocked: set[int] = set()
    grew = True
    while grew:
        grew = False
        for pid, blockers in rows:
            if pid not in blocked and ({holder} | blocked) & set(blockers):  # type: ignore[arg-type]
                blocked.add(pid)  # type: ignore[arg-type]
                grew = True
    return len(blocked)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("right_at", [0, 1, 2, 3])
def test_guesses_queued_on_the_row_are_tried_one_per_lock_window(
    held_row: tuple[Harness, psycopg.Connection[tuple[object, ...]]], clock: Clock, right_at: int
) -> None:
    """Four guesses reach the user's row in a known order (the test holds the row lock and lets
    each one queue behind it before sending the next). Only the first is tried: the right code is
    accepted only in first place; in any later place it meets the lock the first count set."""
    h, conn = held_row
    secret, _ = enroll_authenticator(h, clock, "zoe")
    guesses = wrong_codes(secret, clock, 3)
    guesses.insert(right_at, totp_now(secret, clock))
    holder = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    monitor = psycopg.connect(h.settings.database_url, autocommit=True)
    futures: list[Future[pb.VerifyResponse]] = []
    with monitor, ThreadPoolExecutor(max_workers=4) as pool:
        conn.execute("SELECT 1 FROM users WHERE user_id = 'zoe' FOR UPDATE")  # psycopg opens a transaction
        for i, code in enumerate(guesses):
            futures.append(pool.submit(verify, h, "zoe", code))
            wait_until(
                lambda n=i + 1: waiting_behind(monitor, holder) >= n,
                f"{i + 1} guesses queue on the row",
                bound=WAIT_LIMIT,
            )
        conn.rollback()  # let them through, in the order they queued
        responses = [f.result(timeout=WAIT_LIMIT) for f in futures]

    results = [r.result for r in responses]
    if right_at == 0:
        assert results[0] == pb.VERIFY_RESULT_ACCEPTED, results
    expected_locked = [i for i in range(4) if i != 0 or right_at != 0]
    assert [results[i] for i in expected_locked] == [pb.VERIFY_RESULT_LOCKED] * len(expected_locked), results
    user = h.admin.GetUser(admin_pb.GetUserRequest(user_id="zoe"), metadata=h.admin_metadata).user
    assert user.failed_attempts <= 1, "more than one guess was counted in one lock window"


def test_four_concurrent_guesses_get_the_right_one_in_about_a_quarter_of_trials(
    start_server: ServerFactory, clock: Clock
) -> None:
    """Threshold 1, four guesses at once, one of them right (in random position): strictly
    serialized checking accepts it only when it comes first, 25 % of the time. Before guesses
    were counted first, the fast path accepted it in 40-43 % of trials (issue 12)."""
    h = start_server(policy=THRESHOLD_1)
    secret, _ = enroll_authenticator(h, clock, "yan")
    rng = random.Random(12)
    trials, accepted = 100, 0
    for _ in range(trials):
        clock.advance(30)  # a fresh time step: the right code is new each trial
        h.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id="yan"), metadata=h.admin_metadata)
        guesses = wrong_codes(secret, clock, 3)
        guesses.insert(rng.randrange(4), totp_now(secret, clock))
        # Sent back to back without waiting: the four are in the server at once.
        calls = [
            h.twofactor.Verify.future(pb.VerifyRequest(user_id="yan", code=code), metadata=h.app_metadata)
            for code in guesses
        ]
        responses = [call.result(timeout=WAIT_LIMIT) for call in calls]
        wins = sum(r.result == pb.VERIFY_RESULT_ACCEPTED for r in responses)
        assert wins <= 1
        accepted += wins
    # Binomial(100, 0.25): mean 25, sd 4.3; 38 is three sd above. The fast path that checked before
    # counting let the right code overtake (40-43 % in issue 12; 31-39 here on PostgreSQL).
    assert 8 <= accepted <= 38, f"the right guess won {accepted} of {trials} trials"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_right_code_cant_overtake_a_wrong_one_still_being_counted(
    held_row: tuple[Harness, psycopg.Connection[tuple[object, ...]]], clock: Clock
) -> None:
    """A wrong guess W arrives first and is held before its count is settled; then the right code
    R arrives. With threshold 1, R must not be tried in W's lock window.

    The test holds the row FOR KEY SHARE: that blocks the row lock (FOR UPDATE) of the locking
    path but not a plain UPDATE of the counters. So a guess is held at the locking path with
    whatever it wrote before. Had W been checked before being counted (the old fast path), R
    would be accepted meanwhile by its one conditional UPDATE. Counted first, W's count is
    already on the row when R reads it: R meets the lock."""
    h, conn = held_row
    secret, _ = enroll_authenticator(h, clock, "xia")
    [wrong] = wrong_codes(secret, clock, 1)
    holder = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    monitor = psycopg.connect(h.settings.database_url, autocommit=True)
    with monitor, ThreadPoolExecutor(max_workers=2) as pool:
        conn.execute("SELECT 1 FROM users WHERE user_id = 'xia' FOR KEY SHARE")
        first = pool.submit(verify, h, "xia", wrong)
        wait_until(
            lambda: waiting_behind(monitor, holder) >= 1,
            "the wrong guess waits at the row lock",
            bound=WAIT_LIMIT,
        )
        second = pool.submit(verify, h, "xia", totp_now(secret, clock))
        wait_until(
            lambda: second.done() or waiting_behind(monitor, holder) >= 2,
            "the right code is answered or waits too",
            bound=WAIT_LIMIT,
        )
        conn.rollback()
        w, r = first.result(timeout=WAIT_LIMIT), second.result(timeout=WAIT_LIMIT)
    assert w.result == pb.VERIFY_RESULT_LOCKED
    assert r.result == pb.VERIFY_RESULT_LOCKED, "the right code was tried in the wrong guess's lock window"
    user = h.admin.GetUser(admin_pb.GetUserRequest(user_id="xia"), metadata=h.admin_metadata).user
    assert user.failed_attempts == 1 and user.HasField("locked_until")


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        """The notices this test's own Verification writes stay in the outbox, where it reads them."""


def test_an_unlock_between_a_wrong_codes_count_and_its_settling_leaves_no_lock_behind(
    start_server: ServerFactory, clock: Clock
) -> None:
    """A wrong authenticator code is counted first (the fast path's own statement), then settled
    under the row lock. An operator's UnlockUser committed in between is what the settling finds:
    the answer is REJECTED, and neither a `user_locked` event after the operator's `user_unlocked`
    nor a "locked out" email says otherwise. (This test's own Verification, on the server's
    database, runs the UnlockUser RPC between the two steps.)"""
    h = start_server(policy=THRESHOLD_1)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="ivy", email="ivy@example.com"), metadata=h.app_metadata
    )
    secret, _ = enroll_authenticator(h, clock, "ivy")
    policy, keyring, db = h.settings.policy, Keyring.parse(TEST_KEYS), h.server.db
    notices = Notices(db, keyring, policy, NoDispatch(), clock)
    challenges = Challenges(db, keyring, policy, NoDispatch(), clock)
    verification = Verification(
        db, keyring, policy, challenges, BackupCodes(db, keyring, policy, notices, clock), notices, clock
    )
    count_first = verification._accept_authenticator_code_fast

    def counted_then_unlocked(*args: Any, **kwargs: Any) -> Any:
        reserved = count_first(*args, **kwargs)
        assert isinstance(reserved, Reservation) and reserved.locks  # this count started a lock
        h.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id="ivy"), metadata=h.admin_metadata)
        return reserved

    verification._accept_authenticator_code_fast = counted_then_unlocked  # type: ignore[method-assign]
    [wrong] = wrong_codes(secret, clock, 1)
    outcome = verification.verify("ivy", wrong, caller=Caller(actor="backend", request_id="race-1"))

    assert outcome.result == VerifyResult.REJECTED
    user = h.admin.GetUser(admin_pb.GetUserRequest(user_id="ivy"), metadata=h.admin_metadata).user
    assert not user.HasField("locked_until") and user.failed_attempts == 0
    events = h.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(user_id="ivy", actions=["user_locked", "user_unlocked"]),
        metadata=h.admin_metadata,
    ).events
    assert [e.action for e in events] == ["user_unlocked"]
    assert query(h.settings, "SELECT 1 FROM challenges WHERE user_id = 'ivy' AND notice = 'locked_out'") == []


@pytest.mark.parametrize("moved_by", ["another attempt", "a lock", "a credential change"])
def test_a_reservation_on_counters_that_moved_since_they_were_read_counts_nothing(
    harness: Harness, clock: Clock, moved_by: str
) -> None:
    """reserve_attempt is a compare-and-set on what the snapshot read: the failure count, the
    lock and the credential epoch. If any moved meanwhile, the stale reservation must write
    nothing (the guess is then decided under the row lock), or concurrent guesses that read
    the same counters would count as one and be tried past the threshold."""
    secret, _ = enroll_authenticator(harness, clock, "rae")
    token = verified_token(harness, clock, "rae", secret)  # for SetContact, before the read
    db = harness.server.db
    with db.statements() as q:
        seen = attempts.verify_snapshot(q, "rae")
    assert seen is not None and (seen.failed_attempts, seen.locked_until) == (0, None)
    if moved_by == "another attempt":
        [wrong] = wrong_codes(secret, clock, 1)
        assert verify(harness, "rae", wrong).attempts_left == 4
    elif moved_by == "a lock":  # as a writer that sets only the lock would leave the row
        with db.transaction() as tx:
            tx.execute("UPDATE users SET locked_until = 1 WHERE user_id = 'rae'")
    else:
        harness.twofactor.SetContact(
            pb.SetContactRequest(user_id="rae", email="rae@example.com", verification_token=token),
            metadata=harness.app_metadata,
        )
    row = "SELECT failed_attempts, locked_until, credential_epoch FROM users WHERE user_id = 'rae'"
    before = query(harness.settings, row)
    with db.transaction() as tx:
        reserved = attempts.reserve_attempt(tx, "rae", seen, failed_attempts=1, locked_until=None)
    assert not reserved
    assert query(harness.settings, row) == before


@pytest.mark.parametrize("audit_verifications", ["failures", "all"])
def test_the_locking_path_accepts_a_right_code_the_fast_path_left_undecided(
    start_server: ServerFactory, clock: Clock, audit_verifications: str
) -> None:
    """When the one-statement path decides nothing (a credential change or a concurrent guess
    between its read and its UPDATE), the code is decided under the row lock: a right one is
    accepted there once, with its audit event under `all`. (This test's own Verification skips
    the fast path, as such a race would leave it.)"""
    h = start_server(policy={"audit_verifications": audit_verifications})
    secret, _ = enroll_authenticator(h, clock, "lee")
    policy, keyring, db = h.settings.policy, Keyring.parse(TEST_KEYS), h.server.db
    notices = Notices(db, keyring, policy, NoDispatch(), clock)
    challenges = Challenges(db, keyring, policy, NoDispatch(), clock)
    verification = Verification(
        db, keyring, policy, challenges, BackupCodes(db, keyring, policy, notices, clock), notices, clock
    )
    verification._accept_authenticator_code_fast = lambda *args, **kwargs: None  # type: ignore[method-assign]
    code = totp_now(secret, clock)
    outcome = verification.verify("lee", code, caller=Caller(actor="backend", request_id="locked-1"))
    assert outcome.result == VerifyResult.ACCEPTED and outcome.backup_codes_remaining == 10
    again = verification.verify("lee", code, caller=Caller(actor="backend", request_id="locked-2"))
    assert again.result == VerifyResult.REJECTED
    events = h.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(user_id="lee", actions=["verification_accepted"]),
        metadata=h.admin_metadata,
    ).events
    assert [e.request_id for e in events] == (["locked-1"] if audit_verifications == "all" else [])
