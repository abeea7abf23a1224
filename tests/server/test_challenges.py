"""Codes by email and SMS with in-process delivery (the embedded default's path) to a real
SMTP server and a custom SMS class: expiry, attempt limit, cooldown, hourly limits, idempotency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import grpc
import psycopg
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import TEST_KEYS, Clock, Harness, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    SMS,
    enroll_authenticator,
    error_info,
    retry_info,
    verify,
)
from tests.server.stored_rows import query
from tests.smtp_sink import SmtpSink, code_in
from twofactor_server.delivery.providers import SmsMessage
from twofactor_server.domain.errors import Unavailable
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.settings import Settings
from twofactor_server.storage import keys, outbox_recovery
from twofactor_server.storage.database import open_database


# The sink is set up before the server so it is torn down after it: the server's
# delivery threads finish their SMTP sessions before the sink goes away.
@pytest.fixture
def email_server(sink: SmtpSink, start_server: ServerFactory) -> Harness:
    return start_server(email_provider="smtp", smtp=sink.settings())


def enroll_email(h: Harness, sink: SmtpSink, clock: Clock, user_id: str) -> list[str]:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com"), metadata=h.app_metadata
    )
    before = len(sink.messages)
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=EMAIL), metadata=h.app_metadata
    )
    assert start.WhichOneof("setup") == "challenge"
    assert start.challenge.masked_destination == f"{user_id[0]}***@example.com"
    code = code_in(sink.wait_for_messages(before + 1)[-1])
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user_id, method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed and list(confirm.enabled_methods) == [EMAIL]
    clock.advance(31)  # past the resend cooldown
    return list(confirm.backup_codes)


def send_and_read(h: Harness, sink: SmtpSink, user_id: str, **fields: str) -> tuple[pb.SendCodeResponse, str]:
    before = len(sink.messages)
    sent = h.twofactor.SendCode(
        pb.SendCodeRequest(user_id=user_id, method=EMAIL, **fields), metadata=h.app_metadata
    )
    return sent, code_in(sink.wait_for_messages(before + 1)[-1])


def wait_for_delivery(h: Harness, user_id: str, challenge_id: str, status: int) -> common_pb2.Challenge:
    """Poll the delivery status over RPC until it reaches `status` (bounded)."""
    import time

    deadline = time.monotonic() + 60
    while True:
        challenge = h.twofactor.GetChallenge(
            pb.GetChallengeRequest(user_id=user_id, challenge_id=challenge_id), metadata=h.app_metadata
        ).challenge
        if challenge.delivery_status == status:
            return challenge
        assert time.monotonic() < deadline, f"delivery stayed {challenge.delivery_status}"
        time.sleep(0.05)


def test_emailed_code_verifies_once(email_server: Harness, sink: SmtpSink, clock: Clock) -> None:
    enroll_email(email_server, sink, clock, "ana")
    sent, code = send_and_read(email_server, sink, "ana", locale="de")
    # The caller's locale is kept with the code: the worker renders the message in it.
    stored = query(
        email_server.settings,
        "SELECT locale FROM challenges WHERE challenge_id = %(c)s",
        {"c": sent.challenge.challenge_id},
    )
    assert stored == [{"locale": "de"}]
    message = sink.messages[-1]
    assert message["To"] == "ana@example.com" and code not in message["Subject"]
    delivered = wait_for_delivery(
        email_server, "ana", sent.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT
    )
    assert delivered.provider_message_id == message["Message-ID"]
    first = verify(email_server, "ana", code)
    assert first.result == pb.VERIFY_RESULT_ACCEPTED and first.matched == pb.CODE_KIND_EMAIL
    assert first.attempts_left == 5  # an accepted code clears the count: the whole budget again
    assert verify(email_server, "ana", code).result == pb.VERIFY_RESULT_REJECTED


def test_code_expires_after_ten_minutes(email_server: Harness, sink: SmtpSink, clock: Clock) -> None:
    enroll_email(email_server, sink, clock, "ben")
    sent, code = send_and_read(email_server, sink, "ben")
    assert sent.challenge.expires_at.seconds == int(clock.now) + 600
    # The sink has the message before the server records it sent: wait for that record.
    wait_for_delivery(email_server, "ben", sent.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    clock.advance(601)
    assert verify(email_server, "ben", code).result == pb.VERIFY_RESULT_REJECTED
    challenge = email_server.twofactor.GetChallenge(
        pb.GetChallengeRequest(user_id="ben", challenge_id=sent.challenge.challenge_id),
        metadata=email_server.app_metadata,
    ).challenge
    assert (
        challenge.delivery_status == common_pb2.DELIVERY_STATUS_SENT
    )  # it was delivered, then expired unused


def test_a_code_is_refused_from_the_millisecond_of_its_expiry(
    email_server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    # expires_at is the first moment the code is no longer good (GetChallenge calls an
    # undelivered code expired from then on); one millisecond before, it still is.
    enroll_email(email_server, sink, clock, "bo")
    enroll_email(email_server, sink, clock, "bea")
    sent, code = send_and_read(email_server, sink, "bo")
    control_sent, control_code = send_and_read(email_server, sink, "bea")
    for user, challenge in (("bo", sent.challenge), ("bea", control_sent.challenge)):
        wait_for_delivery(email_server, user, challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    expires_ms = sent.challenge.expires_at.seconds * 1000 + sent.challenge.expires_at.nanos // 1_000_000
    assert control_sent.challenge.expires_at == sent.challenge.expires_at  # sent in the same instant
    clock.now = (expires_ms - 1) / 1000
    assert verify(email_server, "bea", control_code).result == pb.VERIFY_RESULT_ACCEPTED
    clock.now = expires_ms / 1000
    assert verify(email_server, "bo", code).result == pb.VERIFY_RESULT_REJECTED


def test_five_wrong_attempts_kill_the_code(sink: SmtpSink, start_server: ServerFactory, clock: Clock) -> None:
    # A high lockout threshold isolates the per-code limit from the per-user lockout.
    h = start_server(email_provider="smtp", smtp=sink.settings(), policy={"lockout_threshold": 50})
    # "cal" is the control: the same steps as "cid", one wrong attempt fewer. Its code is still
    # accepted after four, so what kills cid's code below is the fifth wrong attempt.
    enroll_email(h, sink, clock, "cid")
    enroll_email(h, sink, clock, "cal")
    _, code = send_and_read(h, sink, "cid")
    _, control_code = send_and_read(h, sink, "cal")
    wrong = next(c for c in ("000000", "111111", "222222") if c not in (code, control_code))
    for _ in range(4):
        assert verify(h, "cid", wrong).result == pb.VERIFY_RESULT_REJECTED
        assert verify(h, "cal", wrong).result == pb.VERIFY_RESULT_REJECTED
    control = verify(h, "cal", control_code)
    assert control.result == pb.VERIFY_RESULT_ACCEPTED and control.matched == pb.CODE_KIND_EMAIL
    assert verify(h, "cid", wrong).result == pb.VERIFY_RESULT_REJECTED  # the fifth
    assert verify(h, "cid", code).result == pb.VERIFY_RESULT_REJECTED


def test_resend_cooldown_and_new_code_supersedes(email_server: Harness, sink: SmtpSink, clock: Clock) -> None:
    enroll_email(email_server, sink, clock, "dan")
    first, old_code = send_and_read(email_server, sink, "dan")
    assert first.challenge.resend_after.seconds == int(clock.now) + 30
    with pytest.raises(grpc.RpcError) as raised:
        email_server.twofactor.SendCode(
            pb.SendCodeRequest(user_id="dan", method=EMAIL), metadata=email_server.app_metadata
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(raised.value).reason == "RESEND_TOO_SOON"
    retry = retry_info(raised.value)
    assert retry is not None and retry.retry_delay.seconds == 30
    # Send again until the new code differs from the old one (random codes coincide one time in
    # a million), so the old code's refusal below is always checked.
    for _ in range(3):
        clock.advance(30)
        _, new_code = send_and_read(email_server, sink, "dan")
        if new_code != old_code:
            break
    assert new_code != old_code, "three new codes all equal to the old one"
    assert verify(email_server, "dan", old_code).result == pb.VERIFY_RESULT_REJECTED
    assert verify(email_server, "dan", new_code).result == pb.VERIFY_RESULT_ACCEPTED


def test_sending_never_resets_the_failure_budget(email_server: Harness, sink: SmtpSink, clock: Clock) -> None:
    enroll_email(email_server, sink, clock, "eve")
    _, code = send_and_read(email_server, sink, "eve")
    wrong = "000000" if code != "000000" else "111111"
    assert verify(email_server, "eve", wrong).attempts_left == 4
    clock.advance(31)
    send_and_read(email_server, sink, "eve")
    assert verify(email_server, "eve", wrong).attempts_left == 3


def test_hourly_limits_per_user_and_per_destination(
    sink: SmtpSink, start_server: ServerFactory, clock: Clock
) -> None:
    h = start_server(
        email_provider="smtp",
        smtp=sink.settings(),
        policy={"sends_per_user_per_hour": 3, "sends_per_destination_per_hour": 4},
    )
    enroll_email(h, sink, clock, "fay")  # the enrollment code was the first send
    for _ in range(2):
        send_and_read(h, sink, "fay")
        clock.advance(31)
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.SendCode(pb.SendCodeRequest(user_id="fay", method=EMAIL), metadata=h.app_metadata)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(raised.value).reason == "USER_SEND_LIMIT"

    # Another user with the same address: the destination's limit (4) is reached after one more send.
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="fay2", email="fay@example.com"), metadata=h.app_metadata
    )
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="fay2", method=EMAIL), metadata=h.app_metadata
    )
    clock.advance(31)
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="fay2", method=EMAIL), metadata=h.app_metadata
        )
    assert error_info(raised.value).reason == "DESTINATION_SEND_LIMIT"

    clock.advance(3600)
    send_and_read(h, sink, "fay")  # an hour later the window has moved on


def test_a_refused_send_leaves_no_row_behind(
    sink: SmtpSink, start_server: ServerFactory, clock: Clock
) -> None:
    """A refused send stores nothing (no challenge row, no audit event) and counts toward
    nothing: the limits are checked before anything is written."""
    h = start_server(email_provider="smtp", smtp=sink.settings(), policy={"sends_per_user_per_hour": 2})
    enroll_email(h, sink, clock, "gil")  # the enrollment code was the first send
    send_and_read(h, sink, "gil")

    def stored() -> tuple[int, int]:
        challenges = query(h.settings, "SELECT COUNT(*) AS n FROM challenges WHERE user_id = 'gil'")
        events = query(h.settings, "SELECT COUNT(*) AS n FROM audit_events WHERE user_id = 'gil'")
        return int(challenges[0]["n"]), int(events[0]["n"])

    before = stored()
    # The last refusal is not RESEND_TOO_SOON: the refused send before it left no send to wait for.
    for advance, reason in ((0, "RESEND_TOO_SOON"), (31, "USER_SEND_LIMIT"), (0, "USER_SEND_LIMIT")):
        clock.advance(advance)
        with pytest.raises(grpc.RpcError) as raised:
            h.twofactor.SendCode(pb.SendCodeRequest(user_id="gil", method=EMAIL), metadata=h.app_metadata)
        assert error_info(raised.value).reason == reason
    assert stored() == before
    clock.advance(3600)
    send_and_read(h, sink, "gil")  # the refusals counted toward nothing: the window moved on
    assert stored() == (before[0] + 1, before[1] + 1)


def test_idempotency_key_returns_the_same_challenge_and_sends_nothing(
    email_server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    enroll_email(email_server, sink, clock, "gus")
    first, _ = send_and_read(email_server, sink, "gus", idempotency_key="login-42")
    sent_before = len(sink.messages)
    again = email_server.twofactor.SendCode(
        pb.SendCodeRequest(user_id="gus", method=EMAIL, idempotency_key="login-42"),
        metadata=email_server.app_metadata,
    )
    assert again.challenge.challenge_id == first.challenge.challenge_id
    wait_for_delivery(email_server, "gus", first.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert len(sink.messages) == sent_before
    clock.advance(601)  # past the idempotency window: the same key sends a new code
    fresh, _ = send_and_read(email_server, sink, "gus", idempotency_key="login-42")
    assert fresh.challenge.challenge_id != first.challenge.challenge_id


def test_an_idempotency_key_holds_for_exactly_its_window(
    email_server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    enroll_email(email_server, sink, clock, "guy")
    first, _ = send_and_read(email_server, sink, "guy", idempotency_key="login-7")
    sent_at = clock.now
    window = email_server.settings.policy.idempotency_window_seconds

    def send() -> str:
        return email_server.twofactor.SendCode(
            pb.SendCodeRequest(user_id="guy", method=EMAIL, idempotency_key="login-7"),
            metadata=email_server.app_metadata,
        ).challenge.challenge_id

    clock.now = sent_at + window - 0.001  # the window's last millisecond: still the first send
    assert send() == first.challenge.challenge_id
    clock.now = sent_at + window  # from the window's end on: a new send
    assert send() != first.challenge.challenge_id


def test_fifty_concurrent_verifies_of_one_emailed_code_accept_one(
    email_server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    enroll_email(email_server, sink, clock, "hal")
    _, code = send_and_read(email_server, sink, "hal")
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: verify(email_server, "hal", code).result, range(50)))
    assert results.count(pb.VERIFY_RESULT_ACCEPTED) == 1


def test_sms_code_through_a_custom_class(start_server: ServerFactory, clock: Clock) -> None:
    h = start_server(sms_provider="tests.server.test_challenges:SharedRecordingSms")
    h.twofactor.SetContact(pb.SetContactRequest(user_id="ivy", phone="+14155550123"), metadata=h.app_metadata)
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="ivy", method=SMS), metadata=h.app_metadata
    )
    assert start.challenge.masked_destination == "+1******0123"
    sent = wait_for_delivery(h, "ivy", start.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    message = SharedRecordingSms.outbox[-1]
    assert message.to == "+14155550123" and sent.provider_message_id.startswith("recorded-")
    code = message.text.split(" is ")[1][:6]
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="ivy", method=SMS, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed


def test_contact_missing_names_what_is_missing(harness: Harness) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="jo", phone="+14155550100"), metadata=harness.app_metadata
    )
    with pytest.raises(grpc.RpcError) as raised:
        harness.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="jo", method=EMAIL), metadata=harness.app_metadata
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info.reason == "CONTACT_MISSING" and info.metadata["contact"] == "email"


def test_method_not_allowed_by_policy(start_server: ServerFactory) -> None:
    h = start_server(policy={"allowed_methods": ("authenticator",)})
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="kim", email="kim@example.com"), metadata=h.app_metadata
    )
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="kim", method=EMAIL), metadata=h.app_metadata
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "METHOD_NOT_ALLOWED"


def test_send_code_for_a_method_the_policy_forbids_is_method_not_allowed(start_server: ServerFactory) -> None:
    # METHOD_NOT_ALLOWED (the policy) before METHOD_NOT_ENABLED (the user's state).
    h = start_server(policy={"allowed_methods": ("authenticator",)})
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="kit", email="kit@example.com"), metadata=h.app_metadata
    )
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.SendCode(pb.SendCodeRequest(user_id="kit", method=EMAIL), metadata=h.app_metadata)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "METHOD_NOT_ALLOWED"


def test_a_challenge_is_shown_to_its_own_user_only(
    email_server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    enroll_email(email_server, sink, clock, "ola")
    enroll_email(email_server, sink, clock, "per")
    sent, _ = send_and_read(email_server, sink, "ola")
    with pytest.raises(grpc.RpcError) as raised:
        email_server.twofactor.GetChallenge(
            pb.GetChallengeRequest(user_id="per", challenge_id=sent.challenge.challenge_id),
            metadata=email_server.app_metadata,
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "CHALLENGE_NOT_FOUND"


def test_backup_codes_spend_none_of_an_emailed_codes_attempts(
    email_server: Harness, sink: SmtpSink, clock: Clock
) -> None:
    # A backup code is never checked against the emailed code: more backup codes than the
    # code's attempt limit (5) leave it good.
    backup = enroll_email(email_server, sink, clock, "quinn")
    _, code = send_and_read(email_server, sink, "quinn")
    for backup_code in backup[:6]:
        used = verify(email_server, "quinn", backup_code)
        assert used.result == pb.VERIFY_RESULT_ACCEPTED and used.matched == pb.CODE_KIND_BACKUP_CODE
    accepted = verify(email_server, "quinn", code)
    assert accepted.result == pb.VERIFY_RESULT_ACCEPTED and accepted.matched == pb.CODE_KIND_EMAIL


class SharedRecordingSms:
    """An operator's SMS class, loaded by dotted path; keeps what it sent where the test can read it."""

    outbox: ClassVar[list[SmsMessage]] = []

    def send_sms(self, message: SmsMessage) -> str:
        self.outbox.append(message)
        return f"recorded-{len(self.outbox)}"


def test_sms_code_through_sns(start_server: ServerFactory, aws_credentials: None, moto_endpoint: str) -> None:
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.sns.models import sns_backends

    from twofactor_server.settings import SnsSettings

    h = start_server(sms_provider="sns", sns=SnsSettings(region="us-east-2", endpoint_url=moto_endpoint))
    h.twofactor.SetContact(pb.SetContactRequest(user_id="lea", phone="+14155550199"), metadata=h.app_metadata)
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="lea", method=SMS), metadata=h.app_metadata
    )
    sent = wait_for_delivery(h, "lea", start.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    phone, text = sns_backends[DEFAULT_ACCOUNT_ID]["us-east-2"].sms_messages[sent.provider_message_id]
    assert phone == "+14155550199" and "twofactor" in text
    code = text.split(" is ")[1][:6]
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="lea", method=SMS, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed


class SwitchableQueue:
    """A delivery queue that can be down; when up it records ids (the test reads codes from the DB)."""

    def __init__(self) -> None:
        self.down = False
        self.published: list[str] = []

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        if self.down:
            raise Unavailable("BROKER_UNAVAILABLE", "the delivery queue can't be reached; retry later")
        self.published.append(challenge_id)


def stored_code(h: Harness, challenge_id: str) -> str:
    rows = query(
        h.settings, "SELECT code_ciphertext FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id}
    )
    sealed = bytes(rows[0]["code_ciphertext"])
    return Keyring.parse(TEST_KEYS).decrypt(sealed, purpose=CHALLENGE_CODE, user_id=challenge_id).decode()


def test_sends_refused_for_a_queue_outage_are_void(start_server: ServerFactory) -> None:
    queue = SwitchableQueue()
    h = start_server(dispatcher=queue, policy={"resend_cooldown_seconds": 0, "sends_per_user_per_hour": 3})
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="val", email="val@example.com"), metadata=h.app_metadata
    )
    started = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="val", method=EMAIL), metadata=h.app_metadata
    )
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(
            user_id="val", method=EMAIL, code=stored_code(h, started.challenge.challenge_id)
        ),
        metadata=h.app_metadata,
    )
    assert confirm.confirmed
    live = h.twofactor.SendCode(pb.SendCodeRequest(user_id="val", method=EMAIL), metadata=h.app_metadata)
    live_code = stored_code(h, live.challenge.challenge_id)

    queue.down = True
    for _ in range(10):
        with pytest.raises(grpc.RpcError) as raised:
            h.twofactor.SendCode(pb.SendCodeRequest(user_id="val", method=EMAIL), metadata=h.app_metadata)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(raised.value).reason == "BROKER_UNAVAILABLE"
    void = query(
        h.settings,
        "SELECT delivery_status, code_ciphertext, published_at FROM challenges "
        "WHERE user_id = 'val' AND challenge_id <> %(a)s AND challenge_id <> %(b)s",
        {"a": started.challenge.challenge_id, "b": live.challenge.challenge_id},
    )
    assert void == [{"delivery_status": "void", "code_ciphertext": None, "published_at": None}] * 10
    assert len(queue.published) == 2  # nothing of the void sends was ever queued

    queue.down = False
    # Not superseded by the void sends, and they counted toward no limit (3 per hour here).
    assert verify(h, "val", live_code).result == pb.VERIFY_RESULT_ACCEPTED
    h.twofactor.SendCode(pb.SendCodeRequest(user_id="val", method=EMAIL), metadata=h.app_metadata)


def add_a_later_releases_columns(settings: Settings) -> None:
    """What a later release's migration may do while this one still runs (a rolling deploy):
    a column more on every table this release reads rows of into records."""
    statements = [
        f"ALTER TABLE {table} ADD COLUMN later_release_column TEXT"
        for table in ("users", "methods", "challenges", "audit_events", "backup_codes")
    ]
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]  # fixed text, no input
        return
    db = open_database("", data_dir=settings.data_dir)
    try:
        with db.transaction() as tx:
            for statement in statements:
                tx.execute(statement)
    finally:
        db.close()


def test_a_column_a_later_release_adds_breaks_none_of_this_releases_reads(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock, settings: Settings
) -> None:
    # Every read names its columns (storage/records.py select_list): `SELECT *` into a record
    # would fail on the new column with TypeError, answered INTERNAL on every call.
    # Outbox recovery left to the test (below), not to the server's periodic run.
    h = start_server(email_provider="smtp", smtp=sink.settings(), outbox_recovery_seconds=3600)
    add_a_later_releases_columns(settings)
    backup = enroll_email(h, sink, clock, "lea")  # the enrollment's challenge, the methods, backup codes
    enroll_authenticator(h, clock, "max")  # a sealed secret, for the key rotation's read below
    first, code = send_and_read(h, sink, "lea", idempotency_key="login-7")
    again = h.twofactor.SendCode(
        pb.SendCodeRequest(user_id="lea", method=EMAIL, idempotency_key="login-7"), metadata=h.app_metadata
    )
    assert again.challenge.challenge_id == first.challenge.challenge_id  # read by its key
    assert wait_for_delivery(h, "lea", first.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert verify(h, "lea", code).result == pb.VERIFY_RESULT_ACCEPTED  # the live challenges
    assert verify(h, "lea", backup[0]).result == pb.VERIFY_RESULT_ACCEPTED
    users = h.admin.ListUsers(admin_pb.ListUsersRequest(), metadata=h.admin_metadata).users
    assert [(u.user_id, list(u.enabled_methods)) for u in users] == [
        ("lea", [EMAIL]),
        ("max", [AUTHENTICATOR]),
    ]
    events = h.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(user_id="lea"), metadata=h.admin_metadata
    ).events
    assert "backup_code_used" in {event.action for event in events}
    clock.advance(31)  # past the resend cooldown
    last, _ = send_and_read(h, sink, "lea")
    wait_for_delivery(h, "lea", last.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    db = open_database(settings.database_url, data_dir=settings.data_dir)
    try:  # outbox recovery's reads and the key rotation's (`twofactor keys rotate`), each with a row
        with db.transaction() as tx:  # as if the server died between a worker's claim and the publish
            tx.execute(  # a stand-in for the seal a delivered code no longer keeps
                "UPDATE challenges SET delivery_status = 'sending', published_at = NULL, "
                "lease_until = NULL, code_ciphertext = code_hash WHERE challenge_id = %(c)s",
                {"c": last.challenge.challenge_id},
            )
        with db.transaction() as tx:
            claimed = outbox_recovery.claimed_but_unpublished(tx, created_before=2**62, limit=10)
            now_ms = int(clock.now * 1000)
            taken = outbox_recovery.take_for_republish(
                tx, now_ms, stale_before=now_ms, interval_ms=3_600_000, limit=10
            )
            rotating = keys.methods_to_rotate(tx, 2, after=("", ""), limit=10)
        assert [c.challenge_id for c in claimed] == [last.challenge.challenge_id]
        assert [c.challenge_id for c in taken] == [last.challenge.challenge_id]
        assert [(m.user_id, m.method) for m in rotating] == [("max", "authenticator")]
    finally:
        db.close()


def test_a_locked_user_gets_no_code_sent(sink: SmtpSink, start_server: ServerFactory, clock: Clock) -> None:
    # Five wrong codes lock for 60 s; the eighth locks until an admin unlocks.
    h = start_server(email_provider="smtp", smtp=sink.settings(), policy={"max_consecutive_failures": 8})
    enroll_email(h, sink, clock, "lou")
    wrong = "000000"
    for _ in range(5):
        verify(h, "lou", wrong)
    before = len(sink.messages)
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.SendCode(pb.SendCodeRequest(user_id="lou", method=EMAIL), metadata=h.app_metadata)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(raised.value).reason == "USER_LOCKED"
    retry = retry_info(raised.value)
    assert retry is not None and retry.retry_delay.seconds == 60
    clock.advance(61)  # the lock is over: a code goes out again
    _, code = send_and_read(h, sink, "lou")
    assert len(sink.messages) == before + 1
    for _ in range(3):  # wrong codes 6, 7 and 8: locked for good
        clock.advance(3600)
        verify(h, "lou", wrong if code != wrong else "111111")
    clock.advance(86400)
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.SendCode(pb.SendCodeRequest(user_id="lou", method=EMAIL), metadata=h.app_metadata)
    assert error_info(raised.value).reason == "USER_LOCKED" and retry_info(raised.value) is None
    assert len(sink.messages) == before + 1  # nothing was sent while locked
    sent = "SELECT COUNT(*) AS n FROM challenges WHERE user_id = 'lou' AND purpose = 'login'"
    assert query(h.settings, sent) == [{"n": 1}]
