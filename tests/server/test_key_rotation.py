"""Key rotation on both stores while servers serve traffic: add key 2, rotate, retire key 1,
and nobody is rejected; a value under a key the server lacks is an error, never a wrong code."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import grpc
import psycopg
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import AUTHENTICATOR, EMAIL, SMS, enroll_authenticator, error_info, totp_now, verify
from tests.server.restores import other_environment, restore
from tests.smtp_sink import CODE, SmtpSink, code_in
from twofactor_server.app import create_server
from twofactor_server.delivery.providers import SmsMessage
from twofactor_server.domain import totp
from twofactor_server.domain.keyring import TOTP_SECRET, Keyring
from twofactor_server.settings import Settings, SettingsError
from twofactor_server.storage import store
from twofactor_server.storage.database import open_database
from twofactor_server.usecases.key_rotation import (
    CHALLENGE_KINDS,
    KeyRotation,
    RotationProgress,
    RotationReport,
)

KEY_2 = Keyring.new_key_spec(2)
ACCEPTED = pb.VERIFY_RESULT_ACCEPTED
# Each logs in and regenerates its backup codes every round; "reset-0" is reset by an operator
# and enrolls again instead of regenerating.
LOAD_USERS = ("load-0", "load-1", "load-2", "reset-0")


class RecordingSms:
    """An operator's SMS class (loaded by dotted path) that keeps what it sends for the test."""

    outbox: ClassVar[list[SmsMessage]] = []
    changed: ClassVar[threading.Condition] = threading.Condition()

    def send_sms(self, message: SmsMessage) -> str:
        with self.changed:
            self.outbox.append(message)
            self.changed.notify_all()
        return f"recorded-{len(self.outbox)}"

    @classmethod
    def wait_for(cls, count: int) -> SmsMessage:
        with cls.changed:
            assert cls.changed.wait_for(lambda: len(cls.outbox) >= count, 60), "no SMS within 60s"
            return cls.outbox[-1]


@pytest.fixture
def serve(sink: SmtpSink, start_server: ServerFactory) -> ServerFactory:
    """Servers with email over a real SMTP sink and SMS through RecordingSms."""

    def start(**overrides: object) -> Harness:
        return start_server(
            email_provider="smtp",
            smtp=sink.settings(),
            sms_provider=f"{__name__}:RecordingSms",
            **overrides,
        )

    return start


def enroll_by_message(h: Harness, sink: SmtpSink, clock: Clock, user_id: str, method: int) -> list[str]:
    contact = {"email": f"{user_id}@example.com"} if method == EMAIL else {"phone": "+14155550123"}
    h.twofactor.SetContact(pb.SetContactRequest(user_id=user_id, **contact), metadata=h.app_metadata)
    before = len(sink.messages) if method == EMAIL else len(RecordingSms.outbox)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=method), metadata=h.app_metadata
    )
    if method == EMAIL:
        code = code_in(sink.wait_for_messages(before + 1)[-1])
    else:
        found = CODE.search(RecordingSms.wait_for(before + 1).text)
        assert found is not None
        code = found.group(1)
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user_id, method=method, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed
    return list(confirm.backup_codes)


@dataclass
class LoadLoop:
    """Threads that each, every round, log a user in with a fresh authenticator code and a backup
    code, then regenerate the user's backup codes (or reset the user and enroll again); the clock
    moves 30 s between rounds."""

    h: Harness
    clock: Clock
    users: dict[str, tuple[str, list[str]]]
    failures: list[str] = field(default_factory=list)
    rounds: int = 0
    finish: bool = False
    stop_requested: threading.Event = field(default_factory=threading.Event)
    round_done: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.barrier = threading.Barrier(len(self.users), action=self._between_rounds, timeout=120)
        self.threads = [threading.Thread(target=self._run, args=(u,)) for u in self.users]

    def _between_rounds(self) -> None:
        self.clock.advance(30)
        with self.round_done:
            self.rounds += 1
            self.finish = self.stop_requested.is_set()
            self.round_done.notify_all()

    def _run(self, user_id: str) -> None:
        secret, codes = self.users[user_id]
        while True:
            try:
                if (r := verify(self.h, user_id, totp_now(secret, self.clock))).result != ACCEPTED:
                    self.failures.append(f"{user_id}: authenticator code answered {r.result}")
                if (r := verify(self.h, user_id, codes.pop())).result != ACCEPTED:
                    self.failures.append(f"{user_id}: backup code answered {r.result}")
                if user_id.startswith("reset-"):
                    secret, codes = self._reset_and_enroll_again(user_id)
                else:
                    request = pb.RegenerateBackupCodesRequest(
                        user_id=user_id, verification_token=r.verification_token
                    )
                    codes = list(
                        self.h.twofactor.RegenerateBackupCodes(request, metadata=self.h.app_metadata).codes
                    )
            except grpc.RpcError as error:
                self.failures.append(f"{user_id}: {error.code()} {error.details()}")  # type: ignore[attr-defined]
            except Exception as error:  # reported as a failure; the barrier must not break
                self.failures.append(f"{user_id}: {error!r}")
            self.users[user_id] = (secret, codes)
            self.barrier.wait()
            if self.finish:
                return

    def _reset_and_enroll_again(self, user_id: str) -> tuple[str, list[str]]:
        """An operator's reset and a new enrollment: a rotation that read the old secret or codes
        must not write them back over the new ones."""
        self.h.admin.ResetUser(
            admin_pb.ResetUserRequest(user_id=user_id, reason="lost phone"), metadata=self.h.admin_metadata
        )
        secret = self.h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR), metadata=self.h.app_metadata
        ).authenticator.secret
        confirm = self.h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(
                user_id=user_id, method=AUTHENTICATOR, code=totp_now(secret, self.clock)
            ),
            metadata=self.h.app_metadata,
        )
        assert confirm.confirmed
        return secret, list(confirm.backup_codes)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def wait_for_round(self, after: int) -> None:
        with self.round_done:
            assert self.round_done.wait_for(lambda: self.rounds > after or self.failures, 120), (
                "load loop stalled"
            )

    def stop(self) -> None:
        self.stop_requested.set()
        for thread in self.threads:
            thread.join(180)
            assert not thread.is_alive()


def counts_by_version(rotation: KeyRotation) -> dict[tuple[str, int], int]:
    return {(u.kind, u.version): u.count for u in rotation.status()}


def test_full_rotation_cycle_under_load(
    serve: ServerFactory, settings: Settings, sink: SmtpSink, clock: Clock
) -> None:
    # Key 1 only: enroll users in every method, one pending enrollment, one waiting login code.
    first = serve()
    users: dict[str, tuple[str | None, list[str]]] = {}
    for i in range(3):
        users[f"app-{i}"] = enroll_authenticator(first, clock, f"app-{i}")
    users["mail-0"] = (None, enroll_by_message(first, sink, clock, "mail-0", EMAIL))
    clock.advance(31)  # past the resend cooldown
    users["text-0"] = (None, enroll_by_message(first, sink, clock, "text-0", SMS))
    step_up = verify(first, "mail-0", users["mail-0"][1].pop()).verification_token
    pending = first.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="mail-0", method=AUTHENTICATOR, verification_token=step_up),
        metadata=first.app_metadata,
    ).authenticator.secret
    load_users = {u: enroll_authenticator(first, clock, u) for u in LOAD_USERS}
    clock.advance(31)
    waiting = len(sink.messages) + 1
    first.twofactor.SendCode(pb.SendCodeRequest(user_id="mail-0", method=EMAIL), metadata=first.app_metadata)
    sink.wait_for_messages(waiting)
    first.server.stop(grace=None)

    # Key 2 added (active); the load loop runs against it through the whole rotation.
    both = f"{TEST_KEYS},{KEY_2}"
    second = serve(keys=both)
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=60)  # as `keys rotate`
    # At most 10 batches (8 secrets, 90 backup codes), each with a 30 s load round: the waiting
    # login code (10 minutes) outlives the rotation.
    rotation = KeyRotation(db, Keyring.parse(both), clock, batch_size=10)
    # Counted before the load starts: its first round may already reset and re-enroll reset-0.
    before = counts_by_version(rotation)
    assert before[("totp_secret", 1)] == 3 + len(LOAD_USERS)
    assert before[("pending_totp_secret", 1)] == 1
    assert before[("challenge_code_hash", 1)] == 1
    load = LoadLoop(second, clock, load_users)
    load.start()

    seen_rounds = 0

    def interleave(_progress: RotationProgress) -> None:
        nonlocal seen_rounds  # a load round between every two batches: rotation and traffic overlap
        load.wait_for_round(seen_rounds)
        seen_rounds = load.rounds

    try:
        report = rotation.rotate(on_batch=interleave)
        load.wait_for_round(load.rounds)  # and once more after the last batch
    finally:
        load.stop()
    assert load.failures == []
    assert not report.interrupted and report.remaining == () and report.progress.unreadable == 0
    after = counts_by_version(rotation)
    assert {k: n for k, n in after.items() if k[1] == 1 and k[0] not in CHALLENGE_KINDS} == {}
    # The waiting login code is left to expire; until then key 1 can't be removed.
    assert after[("challenge_code_hash", 1)] == 1
    assert "challenge_code_hash" in [u.kind for u in report.waiting_challenges]
    with pytest.raises(SettingsError, match=r"key version 1 \(.*1 waiting challenge code hashes\)"):
        create_server(replace(settings, keys=KEY_2), clock=clock)
    clock.advance(601)
    assert {k: n for k, n in counts_by_version(rotation).items() if k[1] == 1} == {}
    db.close()
    second.server.stop(grace=None)

    # Key 1 removed: everyone still logs in, with a fresh authenticator code and an old backup code.
    last = serve(keys=KEY_2)
    for user_id, (secret, codes) in {**users, **load_users}.items():
        if secret is not None:
            assert verify(last, user_id, totp_now(secret, clock)).result == ACCEPTED, user_id
        assert verify(last, user_id, codes[0]).result == ACCEPTED, user_id
    confirmed = last.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="mail-0", method=AUTHENTICATOR, code=totp_now(pending, clock)),
        metadata=last.app_metadata,
    )
    assert confirmed.confirmed


def test_a_value_under_a_key_the_server_lacks_is_an_error_not_a_wrong_code(
    serve: ServerFactory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A key deployed to one server only (the mistake the staged rollout avoids): the other
    server answers KEY_VERSION_MISSING and counts no failure."""
    old_only = serve()
    new_active = serve(keys=f"{TEST_KEYS},{KEY_2}")
    secret, codes = enroll_authenticator(new_active, clock, "alice")
    for code in (totp_now(secret, clock), codes[0]):
        with pytest.raises(grpc.RpcError) as raised:
            verify(old_only, "alice", code)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        info = error_info(raised.value)
        assert info.reason == "KEY_VERSION_MISSING" and info.metadata["key_version"] == "2"
        assert "key version 2" in raised.value.details()  # type: ignore[attr-defined]
    said = [
        r for r in caplog.records if r.levelno == logging.ERROR and "KEY_VERSION_MISSING" in r.getMessage()
    ]
    assert len(said) == 2 and "add that key back" in said[0].getMessage()  # the operator sees it
    accepted = verify(new_active, "alice", totp_now(secret, clock))
    assert accepted.result == ACCEPTED
    assert accepted.attempts_left == new_active.settings.policy.lockout_threshold  # nothing was counted


def test_values_another_key_of_their_version_sealed_are_an_error_not_internal_nor_wrong_codes(
    serve: ServerFactory, settings: Settings, clock: Clock, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A database restored, under a running server, from another environment's backup: its values
    were sealed with that environment's key under the same version, which the server's start-up
    check never saw (a second server with that key on one database is refused at start, since
    migration 0012: test_a_server_with_another_key_of_a_version_never_counts_right_codes_as_wrong).
    The server has opened values of its own; still it answers FAILED_PRECONDITION (KEY_MISMATCH,
    naming the version) for a user's secret and backup code, and counts no failure, never
    INTERNAL with a traceback, nor a right backup code REJECTED and counted (a hash and seal are
    made together: the seal that doesn't open says the hash is another key's). Restarted, it
    refuses to start with its key."""
    here = serve()
    enroll_authenticator(here, clock, "own")  # sealed, and opened, by this server's key
    other_key = Keyring.new_key_spec(1)
    with other_environment(settings, tmp_path) as elsewhere:
        there = serve(keys=other_key, database_url=elsewhere.database_url, data_dir=elsewhere.data_dir)
        secret, backup = enroll_authenticator(there, clock, "alice")
        there.server.stop(grace=None)
        restore(elsewhere, here.settings)
    for code in (totp_now(secret, clock), totp_now(secret, clock), backup[0]):  # the second from the cache
        with pytest.raises(grpc.RpcError) as raised:
            verify(here, "alice", code)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        info = error_info(raised.value)
        assert info.reason == "KEY_MISMATCH" and info.metadata["key_version"] == "1"
        assert "key version 1" in raised.value.details()  # type: ignore[attr-defined]
    # The operator sees it too: one line a call, what failed and what to do, no traceback.
    said = [r for r in caplog.records if r.levelno == logging.ERROR and "KEY_MISMATCH" in r.getMessage()]
    assert len(said) == 3 and all(r.exc_info is None for r in said)
    assert "configure the original key" in said[0].getMessage()
    here.server.stop(grace=None)
    with pytest.raises(SettingsError, match="key version 1 opens none of the values stored under it"):
        create_server(here.settings, clock=clock)
    right_key = serve(keys=other_key)  # the restored database's own key
    accepted = verify(right_key, "alice", totp_now(secret, clock))
    assert accepted.result == ACCEPTED
    assert accepted.attempts_left == right_key.settings.policy.lockout_threshold  # nothing was counted
    assert verify(right_key, "alice", backup[0]).result == ACCEPTED


def test_a_server_with_another_key_of_a_version_never_counts_right_codes_as_wrong(
    serve: ServerFactory, settings: Settings, sink: SmtpSink, clock: Clock
) -> None:
    """Two servers with different keys under one version on a fresh database (nothing sealed yet
    for a start-up check to try a key on): a right emailed code or backup code through the one
    with the other key was REJECTED and counted, as a wrong one (right codes locking users out,
    and nothing in any log), then answered KEY_MISMATCH. Now the first to start records its key
    (migration 0012), the other refuses to start, in one line, and never answers a code."""
    first = serve()
    with pytest.raises(SettingsError) as refused:
        serve(keys=Keyring.new_key_spec(1))
    assert str(refused.value).startswith(
        "TWOFACTOR_KEYS' key version 1 is not the key this database recorded for version 1"
    )
    backup = enroll_by_message(first, sink, clock, "bea", EMAIL)
    clock.advance(first.settings.policy.resend_cooldown_seconds)
    first.twofactor.SendCode(pb.SendCodeRequest(user_id="bea", method=EMAIL), metadata=first.app_metadata)
    emailed = code_in(sink.wait_for_messages(2)[-1])
    accepted = verify(first, "bea", emailed)
    assert accepted.result == ACCEPTED
    assert accepted.attempts_left == first.settings.policy.lockout_threshold  # nothing was counted
    assert verify(first, "bea", backup[0]).result == ACCEPTED


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_rotation_never_writes_back_over_a_concurrent_change(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    """The rotation has read a pending secret and waits to write it re-encrypted; meanwhile the
    user starts the enrollment again. The compare-and-swap loses, and the new secret stays."""
    h = start_server()
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="bob", method=AUTHENTICATOR), metadata=h.app_metadata
    )
    both = Keyring.parse(f"{TEST_KEYS},{KEY_2}")
    # Units of work that wait on a row lock on purpose: longer than the 2 s storage timeout.
    rotating_db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=60)
    writer_db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=60)
    rotation = KeyRotation(rotating_db, both, clock, batch_size=1)
    reports: list[RotationReport] = []
    rotating = threading.Thread(target=lambda: reports.append(rotation.rotate()))
    new_secret = totp.new_secret()
    # Watched from a connection of its own in autocommit: inside the writer's transaction
    # pg_stat_activity is read once and kept, so a rotation connection opened after the first
    # look would never be seen waiting.
    with writer_db.transaction() as tx, psycopg.connect(settings.database_url, autocommit=True) as monitor:
        # The enrollment holds the row (as StartEnrollment's upsert does) until it commits.
        writer = tx.one("SELECT pg_backend_pid() AS pid FROM methods WHERE user_id = 'bob' FOR UPDATE")
        assert writer is not None
        rotating.start()
        deadline = time.monotonic() + 30
        while not monitor.execute(
            "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (writer["pid"],)
        ).fetchone():
            assert time.monotonic() < deadline and rotating.is_alive(), "the rotation never waited"
            time.sleep(0.01)
        sealed = both.encrypt(new_secret, purpose=TOTP_SECRET, user_id="bob")
        store.start_method_enrollment(
            tx, "bob", "authenticator", int(clock.now * 1000), with_proof=True, pending_secret=sealed
        )
    rotating.join(60)
    (report,) = reports
    assert (report.progress.rotated, report.progress.superseded, report.remaining) == (0, 1, ())
    rotating_db.close()
    writer_db.close()
    confirmed = start_server(keys=f"{TEST_KEYS},{KEY_2}").twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id="bob", method=AUTHENTICATOR, code=totp_now(totp.to_base32(new_secret), clock)
        ),
        metadata=h.app_metadata,
    )
    assert confirmed.confirmed


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_wrong_backup_code_is_counted_though_one_stored_seal_is_damaged(
    serve: ServerFactory, clock: Clock
) -> None:
    """A wrong key is told from a wrong code by the user's backup codes' seals: one damaged seal
    among the others that open is no wrong key, and the wrong code is counted (an answer that
    counts nothing would let guesses go on past the lockout)."""
    h = serve()
    _, backup = enroll_authenticator(h, clock, "dee")
    with psycopg.connect(h.settings.database_url, autocommit=True) as conn:
        conn.execute(  # the last code's seal, one byte past its version and nonce changed
            "UPDATE backup_codes SET code_ciphertext = overlay(code_ciphertext PLACING "
            "decode(CASE WHEN get_byte(code_ciphertext, 20) = 0 THEN '01' ELSE '00' END, 'hex') "
            "FROM 21 FOR 1) WHERE user_id = 'dee' AND position = "
            "(SELECT MAX(position) FROM backup_codes WHERE user_id = 'dee')"
        )
    wrong = next(c for c in ("aaaaa-aaaaa", "bbbbb-bbbbb") if c not in backup)
    answer = verify(h, "dee", wrong)
    assert answer.result == pb.VERIFY_RESULT_REJECTED
    assert answer.attempts_left == h.settings.policy.lockout_threshold - 1
