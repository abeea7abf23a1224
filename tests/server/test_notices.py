"""Users hear about changes to their second factor (issue 12): every sensitive change is mailed
to the registered address through the outbox, on SQLite and PostgreSQL, in-process delivery to
a real SMTP sink."""

from __future__ import annotations

import threading
import time
import uuid
from email.message import EmailMessage

import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    enroll_authenticator,
    totp_now,
    verified_token,
    verify,
    wait_until,
)
from tests.server.stored_rows import query
from tests.smtp_sink import SmtpSink, code_in
from twofactor_server.domain.keyring import Keyring
from twofactor_server.storage import keys, outbox
from twofactor_server.storage.database import Database
from twofactor_server.usecases.notices import NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR, Notices

# The subject of each notice, as the English templates word it (issuer "twofactor").
SUBJECTS = {
    "method_added": "A sign-in method was added to your twofactor account",
    "method_disabled": "A sign-in method was turned off for your twofactor account",
    "contact_changed": "The mobile number for your twofactor codes changed",
    "backup_codes_viewed": "Your twofactor backup codes were viewed",
    "backup_codes_regenerated": "New backup codes for your twofactor account",
    "admin_reset": "Your twofactor two-factor verification was reset",
    "locked_out": "Too many wrong codes for your twofactor account",
}


def start(start_server: ServerFactory, sink: SmtpSink, **policy: object) -> Harness:
    return start_server(
        email_provider="smtp",
        smtp=sink.settings(),
        policy={"notify_users": True, "lockout_threshold": 3, **policy},
    )


def body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def subjects_to(sink: SmtpSink, address: str) -> list[str]:
    return [str(m["Subject"]) for m in sink.messages if m["To"] == address]


def wait_until_all_sent(h: Harness) -> None:
    """Until every notice's delivery is recorded (the sink sees a message just before that)."""
    deadline = time.monotonic() + 30
    sql = "SELECT COUNT(*) AS n FROM challenges WHERE purpose = 'notice' AND delivery_status <> 'sent'"
    while query(h.settings, sql)[0]["n"]:
        assert time.monotonic() < deadline, "notices not all recorded as sent"
        time.sleep(0.05)


def test_every_sensitive_change_is_mailed_to_the_user(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    h = start(start_server, sink)
    app = h.app_metadata
    h.twofactor.SetContact(pb.SetContactRequest(user_id="ana", email="ana@example.com"), metadata=app)
    secret, _ = enroll_authenticator(h, clock, "ana")
    added = sink.message_to("ana@example.com", SUBJECTS["method_added"])
    assert "authenticator app" in body(added) and "If this was not you" in body(added)
    assert added.get_body(preferencelist=("html",)) is not None

    token = verified_token(h, clock, "ana", secret)
    shown = h.twofactor.GetBackupCodes(
        pb.GetBackupCodesRequest(user_id="ana", verification_token=token), metadata=app
    )
    viewed = sink.message_to("ana@example.com", SUBJECTS["backup_codes_viewed"])
    assert not any(code in body(viewed) for code in shown.codes)  # a notice never carries a code

    h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id="ana", verification_token=token), metadata=app
    )
    sink.message_to("ana@example.com", SUBJECTS["backup_codes_regenerated"])

    token = verified_token(h, clock, "ana", secret)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="ana", phone="+14155550123", verification_token=token), metadata=app
    )
    changed = sink.message_to("ana@example.com", SUBJECTS["contact_changed"])
    assert "+1******0123" in body(changed) and "+14155550123" not in body(changed)

    wrong = "000000" if totp_now(secret, clock) != "000000" else "111111"
    answers = [verify(h, "ana", wrong).result for _ in range(3)]
    assert answers == [pb.VERIFY_RESULT_REJECTED] * 2 + [pb.VERIFY_RESULT_LOCKED]
    locked = sink.message_to("ana@example.com", SUBJECTS["locked_out"])
    assert "minute" in body(locked)
    h.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id="ana"), metadata=h.admin_metadata)

    token = verified_token(h, clock, "ana", secret)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="ana", method=EMAIL, verification_token=token), metadata=app
    )
    code = code_in(sink.message_to("ana@example.com", "Confirm your email address"))
    h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="ana", method=EMAIL, code=code), metadata=app
    )
    token = verified_token(h, clock, "ana", secret)
    h.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id="ana", method=AUTHENTICATOR, verification_token=token), metadata=app
    )
    disabled = sink.message_to("ana@example.com", SUBJECTS["method_disabled"])
    assert "authenticator app" in body(disabled)

    h.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id="ana", reason="lost phone"), metadata=h.admin_metadata
    )
    sink.message_to("ana@example.com", SUBJECTS["admin_reset"])

    # Exactly one of each (two "method added": the app, then email), and nothing else but codes.
    received = subjects_to(sink, "ana@example.com")
    notices = [s for s in received if s in SUBJECTS.values()]
    assert sorted(notices) == sorted([*SUBJECTS.values(), SUBJECTS["method_added"]])
    assert all("verification code" in s or s.startswith("Confirm") for s in received if s not in notices)
    # Sent notices keep nothing but their kind: the sealed detail is wiped like a code.
    wait_until_all_sent(h)
    rows = query(
        h.settings, "SELECT notice, delivery_status, code_ciphertext FROM challenges WHERE purpose = 'notice'"
    )
    assert sorted(r["notice"] for r in rows) == sorted([*SUBJECTS, "method_added"])
    assert {r["delivery_status"] for r in rows} == {"sent"} and all(
        r["code_ciphertext"] is None for r in rows
    )
    # Nor do they hold a key version in use: retiring a key never waits for a notice sent.
    with h.server.db.statements() as q:
        usage = keys.key_usage(q, int(clock() * 1000))
    assert [u for u in usage if u.kind.startswith("challenge_")] == []


def test_no_address_or_notices_off_means_no_mail(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    quiet = start(start_server, sink, notify_users=False)
    quiet.twofactor.SetContact(
        pb.SetContactRequest(user_id="bo", email="bo@example.com"), metadata=quiet.app_metadata
    )
    enroll_authenticator(quiet, clock, "bo")
    enroll_authenticator(quiet, clock, "cy")  # no email registered
    assert query(quiet.settings, "SELECT COUNT(*) AS n FROM challenges WHERE purpose = 'notice'")[0]["n"] == 0

    loud = start(start_server, sink)
    enroll_authenticator(loud, clock, "di")  # no email registered: nothing to send to
    assert (
        query(
            loud.settings, "SELECT COUNT(*) AS n FROM challenges WHERE purpose = 'notice' AND user_id = 'di'"
        )[0]["n"]
        == 0
    )


def test_notices_count_toward_no_send_limit_and_replace_no_code(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    h = start(start_server, sink, sends_per_user_per_hour=3, sends_per_destination_per_hour=3)
    app = h.app_metadata
    h.twofactor.SetContact(pb.SetContactRequest(user_id="ed", email="ed@example.com"), metadata=app)
    secret, _ = enroll_authenticator(h, clock, "ed")
    before = len(sink.messages)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(
            user_id="ed", method=EMAIL, verification_token=verified_token(h, clock, "ed", secret)
        ),
        metadata=app,
    )
    code = code_in(sink.message_to("ed@example.com", "Confirm", after=before))
    h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="ed", method=EMAIL, code=code), metadata=app
    )
    clock.advance(31)
    # A login code, then notices (backup codes viewed, twice) while it waits: it still works.
    # And with the enrollment code and two login codes at a limit of 3, four notices by then
    # would have exhausted it, were they counted.
    before = len(sink.messages)
    h.twofactor.SendCode(pb.SendCodeRequest(user_id="ed", method=EMAIL), metadata=app)
    login_code = code_in(sink.message_to("ed@example.com", "verification code", after=before))
    for _ in range(2):
        token = verified_token(h, clock, "ed", secret)
        h.twofactor.GetBackupCodes(
            pb.GetBackupCodesRequest(user_id="ed", verification_token=token), metadata=app
        )
    assert verify(h, "ed", login_code).result == pb.VERIFY_RESULT_ACCEPTED
    clock.advance(31)
    h.twofactor.SendCode(pb.SendCodeRequest(user_id="ed", method=EMAIL), metadata=app)  # not USER_SEND_LIMIT


def test_a_reset_that_finds_nothing_to_reset_mails_no_notice(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    """A ResetUser sent again (a retry) or of a user with nothing enrolled changes nothing: the
    user is not told that their second factor was reset (every reset is still audited)."""
    h = start(start_server, sink)
    for user in ("fay", "gus"):
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id=user, email=f"{user}@example.com"), metadata=h.app_metadata
        )
    enroll_authenticator(h, clock, "fay")  # gus enrolls nothing
    for user in ("fay", "fay", "gus"):
        h.admin.ResetUser(
            admin_pb.ResetUserRequest(user_id=user, reason="lost phone"), metadata=h.admin_metadata
        )
    sink.message_to("fay@example.com", SUBJECTS["admin_reset"])
    resets = "SELECT user_id, COUNT(*) AS n FROM challenges WHERE notice = 'admin_reset' GROUP BY user_id"
    assert {r["user_id"]: r["n"] for r in query(h.settings, resets)} == {"fay": 1}
    audited = "SELECT COUNT(*) AS n FROM audit_events WHERE action = 'user_reset'"
    assert query(h.settings, audited)[0]["n"] == 3


def test_notices_to_an_address_no_email_method_confirmed_are_capped_per_hour(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    """SetContact applies at once, with no step-up, for a user with no method on, and tells the old
    address: a caller that switches an account's address back and forth between someone else's and
    its own would mail that address without end (notices count toward no send limit). An address
    no email method confirmed gets at most NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR an hour; the
    changes still apply, and an address confirmed by a code still hears of every change."""
    h = start(start_server, sink)
    app = h.app_metadata
    rounds = NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR + 5
    for _ in range(rounds):
        for address in ("victim@example.com", "mallory@example.com"):
            changed = h.twofactor.SetContact(
                pb.SetContactRequest(user_id="mallory", email=address), metadata=app
            )
            assert changed.masked_email == f"{address[0]}***@example.com"
    sql = "SELECT COUNT(*) AS n FROM challenges WHERE purpose = 'notice' AND destination = %(d)s"
    assert (
        query(h.settings, sql, {"d": "victim@example.com"})[0]["n"]
        == NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR
    )

    clock.advance(3601)  # an hour later the address hears of a change again
    h.twofactor.SetContact(pb.SetContactRequest(user_id="mallory", email="victim@example.com"), metadata=app)
    h.twofactor.SetContact(pb.SetContactRequest(user_id="mallory", email="x@example.com"), metadata=app)
    assert (
        query(h.settings, sql, {"d": "victim@example.com"})[0]["n"]
        == NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR + 1
    )

    # An address its user confirmed (the email method is on) hears of every change, cap or not.
    h.twofactor.SetContact(pb.SetContactRequest(user_id="owner", email="owner@example.com"), metadata=app)
    before = len(sink.messages)
    h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id="owner", method=EMAIL), metadata=app)
    code = code_in(sink.message_to("owner@example.com", "Confirm", after=before))
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="owner", method=EMAIL, code=code), metadata=app
    )
    for _ in range(NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR + 2):
        h.twofactor.GetBackupCodes(
            pb.GetBackupCodesRequest(user_id="owner", verification_token=confirmed.verification_token),
            metadata=app,
        )
    viewed = sql + " AND user_id = 'owner' AND notice = 'backup_codes_viewed'"
    assert (
        query(h.settings, viewed, {"d": "owner@example.com"})[0]["n"]
        == NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR + 2
    )


def test_a_flood_of_another_accounts_notices_cant_silence_the_turning_off_or_reset_of_a_confirmed_address(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    """Turning the email method off, or an admin reset, is what its owner most needs to hear of,
    and the change removes the method that confirmed the address: the notice is judged by the
    address as it was, confirmed, however many notices another account sent it this hour."""
    h = start(start_server, sink)
    app = h.app_metadata
    tokens = {}
    for user in ("vic", "val"):
        h.twofactor.SetContact(pb.SetContactRequest(user_id=user, email=f"{user}@example.com"), metadata=app)
        before = len(sink.messages)
        h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id=user, method=EMAIL), metadata=app)
        code = code_in(sink.message_to(f"{user}@example.com", "Confirm", after=before))
        tokens[user] = h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id=user, method=EMAIL, code=code), metadata=app
        ).verification_token
        for _ in range(NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR + 1):  # another account's flood
            for address in (f"{user}@example.com", "mallory@example.com"):
                h.twofactor.SetContact(pb.SetContactRequest(user_id="mallory", email=address), metadata=app)

    h.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id="vic", method=EMAIL, verification_token=tokens["vic"]), metadata=app
    )
    h.admin.ResetUser(
        admin_pb.ResetUserRequest(user_id="val", reason="lost phone"), metadata=h.admin_metadata
    )
    sql = "SELECT notice FROM challenges WHERE purpose = 'notice' AND user_id = %(u)s"
    assert sorted(r["notice"] for r in query(h.settings, sql, {"u": "vic"})) == [
        "method_added",
        "method_disabled",
    ]
    assert sorted(r["notice"] for r in query(h.settings, sql, {"u": "val"})) == [
        "admin_reset",
        "method_added",
    ]


@pytest.mark.parametrize("backend", ["postgres"])
def test_two_accounts_noticing_one_unconfirmed_address_at_once_keep_to_the_cap(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock, other_connection: Database
) -> None:
    """The hour's count of an unconfirmed address and the notice written after it are one decision
    per address: two accounts' changes at once each counted the cap's last free place, and each
    wrote a notice (as many past the cap as ran at once). The address is locked first, as a
    sender's is (outbox.lock_destination), so the second counts the first's notice."""
    h = start(start_server, sink)
    victim = f"victim-{uuid.uuid4().hex[:12]}@example.com"  # its lock is this test's alone
    for user in ("amy", "ben"):  # both accounts give the same address, unconfirmed
        h.twofactor.SetContact(pb.SetContactRequest(user_id=user, email=victim), metadata=h.app_metadata)
    db = other_connection  # a unit of work may last 30 s: the first waits while the second starts
    notices = Notices(db, Keyring.parse(TEST_KEYS), h.settings.policy, NoDispatch(), clock)
    now = int(clock() * 1000)
    for _ in range(NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR - 1):
        with db.transaction() as tx:
            notices.add(tx, victim, "amy", "backup_codes_viewed", now)

    def waits_for_the_address() -> bool:
        sql = (
            "SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid::bigint = %(ns)s "
            "AND objid::bigint = (hashtext(%(d)s)::bigint + 4294967296) %% 4294967296"  # an oid: unsigned
        )
        return bool(query(h.settings, sql, {"ns": outbox._DESTINATION_LOCKS, "d": victim})[0]["n"])

    with db.transaction() as first:
        notices.add(first, victim, "amy", "backup_codes_viewed", now)  # the last place, not committed yet
        second = threading.Thread(target=lambda: _add_committed(db, notices, victim, "ben", now))
        second.start()
        wait_until(
            lambda: not second.is_alive() or waits_for_the_address(),
            "ben's notice is written, or waits for the address",
        )
    second.join(timeout=30)
    assert not second.is_alive()
    sql = "SELECT user_id FROM challenges WHERE purpose = 'notice' AND destination = %(d)s"
    written = [row["user_id"] for row in query(h.settings, sql, {"d": victim})]
    assert len(written) == NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR and "ben" not in written


class NoDispatch:
    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        """Notices written by the test's own Notices stay in the outbox: only their rows count here."""


def _add_committed(db: Database, notices: Notices, to: str, user_id: str, now: int) -> None:
    with db.transaction() as tx:
        notices.add(tx, to, user_id, "backup_codes_viewed", now)
