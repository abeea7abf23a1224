"""The number of unused backup codes the database keeps per user (verify_state, migration
0008): an accepted authenticator Verify returns it with one primary-key probe instead of counting
backup_codes. Triggers keep it, so it is right after every writer of backup_codes, on both
stores: this release's use cases, a statement of the previous release (which knows nothing of
the table and still serves during a rollout), key rotation, and concurrent uses."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import AUTHENTICATOR, enroll_authenticator, totp_now, verified_token, verify
from tests.server.stored_rows import query
from twofactor_server.domain.keyring import Keyring
from twofactor_server.settings import Settings
from twofactor_server.storage.database import Database
from twofactor_server.usecases.key_rotation import KeyRotation

ACCEPTED = pb.VERIFY_RESULT_ACCEPTED


def unused(settings: Settings, user_id: str) -> int:
    """The kept count, checked against a count of the codes themselves."""
    kept = query(
        settings,
        "SELECT backup_codes_unused AS unused FROM verify_state WHERE user_id = %(u)s",
        {"u": user_id},
    )
    counted = query(
        settings,
        "SELECT COUNT(*) AS n FROM backup_codes WHERE user_id = %(u)s AND used_at IS NULL",
        {"u": user_id},
    )
    assert (kept[0]["unused"] if kept else 0) == counted[0]["n"], (kept, counted)
    return int(counted[0]["n"])


def fast_verify(h: Harness, clock: Clock, user_id: str, secret: str) -> pb.VerifyResponse:
    """An accepted authenticator code in the next step: the one-statement path once the user's
    secret is cached (the first call of each step below caches it, if not yet)."""
    clock.advance(30)
    answer = verify(h, user_id, totp_now(secret, clock))
    assert answer.result == ACCEPTED
    return answer


def test_the_count_is_right_after_every_writer_of_backup_codes(
    start_server: ServerFactory, settings: Settings, other_connection: Database, clock: Clock
) -> None:
    h = start_server()
    secret, codes = enroll_authenticator(h, clock, "ana")  # the first method: 10 codes
    assert unused(settings, "ana") == 10
    fast_verify(h, clock, "ana", secret)  # caches the secret
    assert fast_verify(h, clock, "ana", secret).backup_codes_remaining == 10

    used = verify(h, "ana", codes[0])  # a backup code used through Verify
    assert used.matched == pb.CODE_KIND_BACKUP_CODE and used.backup_codes_remaining == 9
    assert unused(settings, "ana") == 9
    assert fast_verify(h, clock, "ana", secret).backup_codes_remaining == 9

    # The statement a server of the previous release sends for a used code (it keeps no count).
    with other_connection.transaction() as tx:
        tx.execute(
            "UPDATE backup_codes SET used_at = %(now)s WHERE user_id = %(u)s AND position = 1 "
            "AND used_at IS NULL",
            {"u": "ana", "now": int(clock.now * 1000)},
        )
    assert unused(settings, "ana") == 8
    assert fast_verify(h, clock, "ana", secret).backup_codes_remaining == 8

    clock.advance(30)
    token = verified_token(h, clock, "ana", secret)
    h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id="ana", verification_token=token), metadata=h.app_metadata
    )
    assert unused(settings, "ana") == 10
    assert fast_verify(h, clock, "ana", secret).backup_codes_remaining == 10

    clock.advance(30)
    token = verified_token(h, clock, "ana", secret)
    h.twofactor.DisableMethod(  # the last method: its backup codes go with it
        pb.DisableMethodRequest(user_id="ana", method=AUTHENTICATOR, verification_token=token),
        metadata=h.app_metadata,
    )
    assert unused(settings, "ana") == 0

    clock.advance(30)
    again, _ = enroll_authenticator(h, clock, "ana")  # a first method again: a new set
    assert unused(settings, "ana") == 10
    assert fast_verify(h, clock, "ana", again).backup_codes_remaining == 10
    # Key rotation rewrites every code's hash and ciphertext: the count stays. (The server has
    # key 1 only: no Verify after this.)
    both = Keyring.parse(f"{TEST_KEYS},{Keyring.new_key_spec(2)}")
    assert KeyRotation(other_connection, both, clock, batch_size=3).rotate().remaining == ()
    assert unused(settings, "ana") == 10
    h.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id="ana", reason="lost phone"), metadata=h.admin_metadata
    )
    assert unused(settings, "ana") == 0


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_two_codes_used_at_once_are_both_counted(settings: Settings, other_connection: Database) -> None:
    """Two transactions use a code each at once, without the user's row lock (as a statement of
    any release could): the second waits on the count's row and applies its change to the
    count the first committed. A recount in the trigger would still see its own older snapshot
    and leave 9."""
    url = settings.database_url
    with other_connection.transaction() as tx:
        tx.execute("INSERT INTO users (user_id, created_at) VALUES ('cy', 0)")
        for position in range(10):
            tx.execute(
                "INSERT INTO backup_codes (user_id, position, code_hash, code_ciphertext) "
                "VALUES ('cy', %(p)s, %(h)s, %(c)s)",
                {"p": position, "h": bytes([position]) * 32, "c": bytes([position]) * 40},
            )
    assert unused(settings, "cy") == 10
    use = "UPDATE backup_codes SET used_at = 1 WHERE user_id = 'cy' AND position = %s AND used_at IS NULL"
    with psycopg.connect(url) as first, psycopg.connect(url) as second:
        second_pid = second.info.backend_pid
        first.execute(use, (0,))  # open: holds the count's row
        done = threading.Event()

        def use_second() -> None:
            second.execute(use, (1,))
            second.commit()
            done.set()

        thread = threading.Thread(target=use_second)
        thread.start()
        deadline = time.monotonic() + 30
        while not waiting_on_a_lock(url, second_pid):
            assert time.monotonic() < deadline, "the second use never waited for the first"
            time.sleep(0.01)  # polling pg_stat_activity, bounded by the deadline
        first.commit()
        assert done.wait(30)
        thread.join(30)
    assert unused(settings, "cy") == 8


def waiting_on_a_lock(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_backup_codes_used_through_verify_from_two_threads_are_all_counted(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    h = start_server()
    _, codes = enroll_authenticator(h, clock, "dee")
    start = threading.Barrier(2)
    answers: list[pb.VerifyResponse] = []

    def use(code: str) -> None:
        start.wait(30)
        answers.append(verify(h, "dee", code))

    threads = [threading.Thread(target=use, args=(code,)) for code in codes[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [a.matched for a in answers] == [pb.CODE_KIND_BACKUP_CODE] * 2
    assert sorted(a.backup_codes_remaining for a in answers) == [8, 9]
    assert unused(settings, "dee") == 8


def test_an_accepted_code_reads_and_writes_only_its_own_users_rows(harness: Harness, clock: Clock) -> None:
    """The accepting statement reads the count from the user's own verify_state row and updates
    the user's own users row. Every user enrolled once is at the same secret version and
    credential epoch, so a row matched on those alone could be anyone's: here the one user
    enrolled first, with fewer codes left and two wrong codes counted."""
    early_secret, backup = enroll_authenticator(harness, clock, "early")
    for code in backup[:3]:
        assert verify(harness, "early", code).result == ACCEPTED
    near = {totp_now(early_secret, clock, offset_steps=k) for k in range(-2, 3)}
    wrong = next(c for c in ("987654", "876543", "765432") if c not in near)
    assert [verify(harness, "early", wrong).attempts_left for _ in range(2)] == [4, 3]
    secret, _ = enroll_authenticator(harness, clock, "late")
    versions = query(harness.settings, "SELECT secret_version FROM verify_state")
    assert len({row["secret_version"] for row in versions}) == 1, versions
    for _ in range(2):  # the first read the secret; the second runs on the cached one
        accepted = verify(harness, "late", totp_now(secret, clock))
        assert accepted.result == ACCEPTED and accepted.backup_codes_remaining == 10
        clock.advance(30)
    early = harness.admin.GetUser(admin_pb.GetUserRequest(user_id="early"), metadata=harness.admin_metadata)
    assert early.user.failed_attempts == 2 and early.user.backup_codes_remaining == 7
