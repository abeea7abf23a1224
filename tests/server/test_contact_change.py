"""A new address for an enabled email or SMS method is confirmed before it is used: the old one
stays in force until the code sent to the new one comes back through ConfirmContact (issue 12).
In-process delivery to a real SMTP sink and an operator's SMS class, on SQLite and PostgreSQL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client import REGISTRY
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import (
    AUTHENTICATOR,
    EMAIL,
    SMS,
    enroll_authenticator,
    error_info,
    totp_now,
    verified_token,
    verify,
    wait_until,
)
from tests.server.stored_rows import query
from tests.server.test_challenges import SharedRecordingSms, SwitchableQueue, stored_code
from tests.server.test_lockout_concurrency import waiting_behind
from tests.smtp_sink import SmtpSink, code_in
from twofactor_server.storage.store import WITHDRAWN_REASON


@pytest.fixture
def h(sink: SmtpSink, start_server: ServerFactory) -> Harness:
    return start_with_email_and_sms(start_server, sink, resend_cooldown_seconds=0, notify_users=True)


def start_with_email_and_sms(start_server: ServerFactory, sink: SmtpSink, **policy: Any) -> Harness:
    """A server that emails through `sink` and texts through SharedRecordingSms, with `policy`."""
    # The recorded texts are shared by every test of the process, and the [sqlite] and [postgres]
    # runs of a test text the same numbers: without this, wait_for_text could return the other
    # run's text (with its code) before this run's is delivered.
    SharedRecordingSms.outbox.clear()
    return start_server(
        email_provider="smtp",
        smtp=sink.settings(),
        sms_provider="tests.server.test_challenges:SharedRecordingSms",
        policy=policy,
    )


def email_enrollment_code(h: Harness, sink: SmtpSink, user: str, address: str) -> str:
    """Set the address (at once: email is not on yet), start an email enrollment, and return the
    code mailed there."""
    h.twofactor.SetContact(pb.SetContactRequest(user_id=user, email=address), metadata=h.app_metadata)
    before = len(sink.messages)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=EMAIL), metadata=h.app_metadata
    )
    return code_in(sink.message_to(address, "Confirm", after=before))


def enroll_email(h: Harness, sink: SmtpSink, user: str, address: str) -> None:
    code = email_enrollment_code(h, sink, user, address)
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed


def login_code_by_email(h: Harness, sink: SmtpSink, user: str) -> tuple[str, str]:
    """SendCode by email; return the address it reached and the code."""
    before = len(sink.messages)
    h.twofactor.SendCode(pb.SendCodeRequest(user_id=user, method=EMAIL), metadata=h.app_metadata)
    message = sink.message_to(None, "verification code", after=before)
    return str(message["To"]), code_in(message)


def email_token(h: Harness, sink: SmtpSink, user: str) -> str:
    _, code = login_code_by_email(h, sink, user)
    answer = verify(h, user, code)
    assert answer.result == pb.VERIFY_RESULT_ACCEPTED
    return answer.verification_token


def new_email_code(h: Harness, sink: SmtpSink, user: str, address: str, token: str) -> str:
    """SetContact with a new address for a user whose email is on; the code mailed to it."""
    before = len(sink.messages)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user, email=address, verification_token=token), metadata=h.app_metadata
    )
    return code_in(sink.message_to(address, "Confirm", after=before))


def confirm_contact(h: Harness, user: str, method: int, code: str) -> pb.ConfirmContactResponse:
    return h.twofactor.ConfirmContact(
        pb.ConfirmContactRequest(user_id=user, method=method, code=code), metadata=h.app_metadata
    )


def pending_changes(h: Harness, user: str) -> list[pb.Challenge]:
    """GetStatus's contact changes waiting for their code."""
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id=user), metadata=h.app_metadata)
    return list(status.pending_contact_changes)


def failed(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value


def test_a_new_email_is_confirmed_first_and_the_old_one_works_until_then(h: Harness, sink: SmtpSink) -> None:
    enroll_email(h, sink, "ana", "ana@example.com")
    token = email_token(h, sink, "ana")
    assert pending_changes(h, "ana") == []

    before = len(sink.messages)
    change = h.twofactor.SetContact(
        pb.SetContactRequest(user_id="ana", email="nina@example.com", verification_token=token),
        metadata=h.app_metadata,
    )
    # A login site coming back to the user later sees the change waiting, as SetContact told it.
    [waiting] = pending_changes(h, "ana")
    assert (waiting.challenge_id, waiting.method, waiting.masked_destination, waiting.expires_at) == (
        change.email_confirmation.challenge_id,
        EMAIL,
        "n***@example.com",
        change.email_confirmation.expires_at,
    )
    # Still the old address in force; a code went to the new one.
    assert change.masked_email == "a***@example.com"
    assert change.HasField("email_confirmation") and not change.HasField("phone_confirmation")
    assert change.email_confirmation.masked_destination == "n***@example.com"  # where the code went
    assert change.email_confirmation.method == EMAIL
    confirmation_code = code_in(sink.message_to("nina@example.com", "Confirm your new address", after=before))

    # Until it is confirmed, login codes go to the old address and work there.
    to, code = login_code_by_email(h, sink, "ana")
    assert to == "ana@example.com"
    assert verify(h, "ana", code).result == pb.VERIFY_RESULT_ACCEPTED

    wrong = confirm_contact(h, "ana", EMAIL, "000000" if confirmation_code != "000000" else "111111")
    assert wrong.result == pb.CONFIRM_RESULT_REJECTED and wrong.attempts_left == 4
    assert wrong.masked_email == "a***@example.com" and not wrong.verification_token

    confirmed = confirm_contact(h, "ana", EMAIL, confirmation_code)
    assert confirmed.result == pb.CONFIRM_RESULT_CONFIRMED
    assert confirmed.masked_email == "n***@example.com"
    assert confirmed.verification_token
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="ana"), metadata=h.app_metadata)
    assert status.email_registered and list(status.enabled_methods) == [EMAIL]
    assert list(status.pending_contact_changes) == []

    # Login codes now go to the new address; the code is spent.
    to, code = login_code_by_email(h, sink, "ana")
    assert to == "nina@example.com"
    assert verify(h, "ana", code).result == pb.VERIFY_RESULT_ACCEPTED
    error = failed(lambda: confirm_contact(h, "ana", EMAIL, confirmation_code))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "NO_PENDING_CONTACT_CHANGE"

    # The change moved the credential epoch on: the old proof is spent, the new one works.
    refused = failed(
        lambda: h.twofactor.GetBackupCodes(
            pb.GetBackupCodesRequest(user_id="ana", verification_token=token), metadata=h.app_metadata
        )
    )
    assert error_info(refused).reason == "STEP_UP_REQUIRED"
    shown = h.twofactor.GetBackupCodes(
        pb.GetBackupCodesRequest(user_id="ana", verification_token=confirmed.verification_token),
        metadata=h.app_metadata,
    )
    assert len(shown.codes) == 10

    # The old address was told, once the change was made.
    notice = sink.message_to("ana@example.com", "The email address for your", after=before)
    text = notice.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "n***@example.com" in text and confirmation_code not in text


def test_only_the_newest_pending_change_can_be_confirmed(h: Harness, sink: SmtpSink) -> None:
    enroll_email(h, sink, "bo", "bo@example.com")
    token = email_token(h, sink, "bo")
    codes = []
    for address in ("first@example.com", "second@example.com"):
        codes.append(new_email_code(h, sink, "bo", address, token))
    assert [c.masked_destination for c in pending_changes(h, "bo")] == ["s***@example.com"]  # the newest
    if codes[0] != codes[1]:
        assert confirm_contact(h, "bo", EMAIL, codes[0]).result == pb.CONFIRM_RESULT_REJECTED
    assert confirm_contact(h, "bo", EMAIL, codes[1]).result == pb.CONFIRM_RESULT_CONFIRMED
    to, _ = login_code_by_email(h, sink, "bo")
    assert to == "second@example.com"


def test_a_new_phone_for_enabled_sms_is_confirmed_by_a_text_to_it(h: Harness, clock: Clock) -> None:
    h.twofactor.SetContact(pb.SetContactRequest(user_id="cy", phone="+14155550101"), metadata=h.app_metadata)
    h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id="cy", method=SMS), metadata=h.app_metadata)
    enroll_text = wait_for_text("+14155550101")
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="cy", method=SMS, code=sms_code(enroll_text)),
        metadata=h.app_metadata,
    )
    assert confirm.confirmed

    change = h.twofactor.SetContact(
        pb.SetContactRequest(
            user_id="cy", phone="+1 415 555 0102", verification_token=confirm.verification_token
        ),
        metadata=h.app_metadata,
    )
    assert (
        change.masked_phone == "+1******0101"
        and change.phone_confirmation.masked_destination == "+1******0102"
    )
    code = sms_code(wait_for_text("+14155550102"))
    assert [(c.method, c.masked_destination) for c in pending_changes(h, "cy")] == [(SMS, "+1******0102")]
    # The old number still gets the login codes.
    h.twofactor.SendCode(pb.SendCodeRequest(user_id="cy", method=SMS), metadata=h.app_metadata)
    old_number_text = wait_for_text("+14155550101", after=enroll_text)
    assert old_number_text.startswith("Your twofactor verification code")
    confirmed = confirm_contact(h, "cy", SMS, code)
    assert confirmed.result == pb.CONFIRM_RESULT_CONFIRMED and confirmed.masked_phone == "+1******0102"
    # The login code texted to the old number, unused, stopped working with the change.
    assert verify(h, "cy", sms_code(old_number_text)).result == pb.VERIFY_RESULT_REJECTED


def test_codes_sent_to_the_old_address_stop_working_once_the_new_one_is_confirmed(
    h: Harness, sink: SmtpSink
) -> None:
    """Whoever holds the old mailbox (often why the address changes) can't finish a login with a
    code mailed there before the change; a code sent to the new address works."""
    enroll_email(h, sink, "eli", "eli@old.example")
    token = email_token(h, sink, "eli")
    to, old_code = login_code_by_email(h, sink, "eli")
    assert to == "eli@old.example"
    code = new_email_code(h, sink, "eli", "eli@new.example", token)
    assert confirm_contact(h, "eli", EMAIL, code).result == pb.CONFIRM_RESULT_CONFIRMED
    assert verify(h, "eli", old_code).result == pb.VERIFY_RESULT_REJECTED
    stored = query(
        h.settings,
        "SELECT destination, superseded_at IS NOT NULL AS withdrawn, code_ciphertext IS NULL AS wiped, "
        "delivery_status FROM challenges WHERE user_id = 'eli' AND purpose = 'login' ORDER BY created_at",
    )
    # Delivered before the change: it stays 'sent' (only a code still queued is closed out).
    assert stored[-1] == {
        "destination": "eli@old.example",
        "withdrawn": True,
        "wiped": True,
        "delivery_status": "sent",
    }
    to, new_code = login_code_by_email(h, sink, "eli")
    assert to == "eli@new.example"
    assert verify(h, "eli", new_code).result == pb.VERIFY_RESULT_ACCEPTED


def test_the_contact_of_an_enabled_method_cannot_be_removed(h: Harness, sink: SmtpSink) -> None:
    enroll_email(h, sink, "di", "di@example.com")
    token = email_token(h, sink, "di")
    error = failed(
        lambda: h.twofactor.SetContact(
            pb.SetContactRequest(user_id="di", email="", verification_token=token), metadata=h.app_metadata
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info.reason == "CONTACT_IN_USE" and info.metadata["contact"] == "email"
    assert "disable email first" in str(error.details())


def test_a_contact_no_enabled_method_uses_changes_at_once_and_the_old_email_hears_of_it(
    h: Harness, sink: SmtpSink, clock: Clock
) -> None:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="ed", email="ed@example.com"), metadata=h.app_metadata
    )
    secret, _ = enroll_authenticator(h, clock, "ed")
    token = verified_token(h, clock, "ed", secret)
    before = len(sink.messages)
    change = h.twofactor.SetContact(
        pb.SetContactRequest(user_id="ed", email="edward@example.com", verification_token=token),
        metadata=h.app_metadata,
    )
    assert change.masked_email == "e***@example.com" and not change.HasField("email_confirmation")
    notice = sink.message_to("ed@example.com", "The email address for your", after=before)
    assert "e***@example.com" in notice.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def test_confirm_contact_refuses_what_it_cannot_do(h: Harness, sink: SmtpSink) -> None:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="fa", email="fa@example.com"), metadata=h.app_metadata
    )
    for method, code, reason, status in (
        (EMAIL, "123456", "NO_PENDING_CONTACT_CHANGE", grpc.StatusCode.FAILED_PRECONDITION),
        (AUTHENTICATOR, "123456", "INVALID_METHOD", grpc.StatusCode.INVALID_ARGUMENT),
        (EMAIL, "12ab", "INVALID_CODE", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        error = failed(lambda m=method, c=code: confirm_contact(h, "fa", m, c))  # type: ignore[misc]
        assert (error.code(), error_info(error).reason) == (status, reason)
    error = failed(lambda: confirm_contact(h, "nobody", EMAIL, "123456"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_wrong_confirmation_codes_count_toward_the_lockout(h: Harness, sink: SmtpSink) -> None:
    enroll_email(h, sink, "gus", "gus@example.com")
    token = email_token(h, sink, "gus")
    right = new_email_code(h, sink, "gus", "gus2@example.com", token)
    wrong = "000000" if right != "000000" else "111111"
    answers = [confirm_contact(h, "gus", EMAIL, wrong) for _ in range(5)]
    assert [a.result for a in answers] == [pb.CONFIRM_RESULT_REJECTED] * 4 + [pb.CONFIRM_RESULT_LOCKED]
    error = failed(lambda: confirm_contact(h, "gus", EMAIL, right))
    assert error_info(error).reason == "USER_LOCKED"


def wait_for_text(number: str, *, after: str | None = None) -> str:
    """The newest text to `number` (other than `after`), waited for (bounded)."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        texts = [m.text for m in SharedRecordingSms.outbox if m.to == number and m.text != after]
        if texts:
            return texts[-1]
        time.sleep(0.02)
    raise AssertionError(f"no text to {number}")


def sms_code(text: str) -> str:
    return text.split(" is ")[1][:6]


@pytest.mark.parametrize("then", [1.0, 0.0, -0.002], ids=["later", "the same millisecond", "a clock behind"])
def test_an_enrollment_started_before_another_method_was_enabled_cannot_be_confirmed(
    start_server: ServerFactory, clock: Clock, sink: SmtpSink, then: float
) -> None:
    """An authenticator enrollment started while no method guarded the account needs no step-up
    proof; once the user enabled another method, finishing that older enrollment would step
    around the proof the account now asks for (and its confirmation returns a fresh token).
    It is refused: the enrollment starts again, with a proof. The start records that it had no
    proof: comparing timestamps let through an enabling in the same millisecond, or on a server
    whose clock ran behind the one that started the enrollment."""
    h = start_server(email_provider="smtp", smtp=sink.settings(), policy={"resend_cooldown_seconds": 0})
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="uma", email="uma@example.com"), metadata=h.app_metadata
    )
    early = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="uma", method=AUTHENTICATOR), metadata=h.app_metadata
    ).authenticator.secret
    clock.advance(then)
    enroll_email(h, sink, "uma", "uma@example.com")
    clock.advance(7 * 86400)
    with pytest.raises(grpc.RpcError) as refused:
        h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="uma", method=AUTHENTICATOR, code=totp_now(early, clock)),
            metadata=h.app_metadata,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert error_info(refused.value).reason == "NO_PENDING_ENROLLMENT"
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="uma"), metadata=h.app_metadata)
    assert list(status.enabled_methods) == [EMAIL]


def test_an_email_enrollment_is_confirmed_only_for_the_address_its_code_reached(
    start_server: ServerFactory, sink: SmtpSink
) -> None:
    """The address changes at once while email is not on yet; the code sent to the old one does
    not enable email for the new, unproven address."""
    h = start_server(email_provider="smtp", smtp=sink.settings(), policy={"resend_cooldown_seconds": 0})
    code = email_enrollment_code(h, sink, "vic", "old@example.com")
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="vic", email="typo@exampel.com"), metadata=h.app_metadata
    )
    with pytest.raises(grpc.RpcError) as refused:
        h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="vic", method=EMAIL, code=code), metadata=h.app_metadata
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert error_info(refused.value).reason == "NO_PENDING_ENROLLMENT"
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="vic"), metadata=h.app_metadata)
    assert list(status.enabled_methods) == []
    enroll_email(h, sink, "vic", "typo@exampel.com")  # started again: the new address gets its own code


def test_a_new_email_and_phone_in_one_call_send_both_codes_under_the_cooldown(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    """The second confirmation code of one SetContact was refused RESEND_TOO_SOON by the first
    (with the default 30 s cooldown) after the first code had gone: the pair could never change
    in one call, and every retry mailed another code."""
    SharedRecordingSms.outbox.clear()  # as in the `h` fixture
    h = start_server(
        email_provider="smtp",
        smtp=sink.settings(),
        sms_provider="tests.server.test_challenges:SharedRecordingSms",
        policy={"resend_cooldown_seconds": 30},
    )
    enroll_email(h, sink, "zo", "zo@example.com")
    clock.advance(31)
    token = email_token(h, sink, "zo")
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="zo", phone="+14155550111", verification_token=token),
        metadata=h.app_metadata,
    )
    clock.advance(31)
    token = email_token(h, sink, "zo")  # the new number moved the credential epoch on
    clock.advance(31)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="zo", method=SMS, verification_token=token), metadata=h.app_metadata
    )
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="zo", method=SMS, code=sms_code(wait_for_text("+14155550111"))),
        metadata=h.app_metadata,
    )
    assert confirmed.confirmed
    clock.advance(31)

    before = len(sink.messages)
    change = h.twofactor.SetContact(
        pb.SetContactRequest(
            user_id="zo",
            email="zo2@example.com",
            phone="+14155550112",
            verification_token=confirmed.verification_token,
        ),
        metadata=h.app_metadata,
    )
    assert change.email_confirmation.masked_destination == "z***@example.com"
    assert change.phone_confirmation.masked_destination == "+1******0112"
    email_code = code_in(sink.message_to("zo2@example.com", "Confirm", after=before))
    phone_code = sms_code(wait_for_text("+14155550112"))
    assert [(c.method, c.masked_destination) for c in pending_changes(h, "zo")] == [
        (EMAIL, "z***@example.com"),
        (SMS, "+1******0112"),
    ]
    assert confirm_contact(h, "zo", EMAIL, email_code).result == pb.CONFIRM_RESULT_CONFIRMED
    assert [c.method for c in pending_changes(h, "zo")] == [SMS]
    assert confirm_contact(h, "zo", SMS, phone_code).result == pb.CONFIRM_RESULT_CONFIRMED
    assert pending_changes(h, "zo") == []
    # The cooldown still holds for the next call.
    error = failed(
        lambda: h.twofactor.SendCode(pb.SendCodeRequest(user_id="zo", method=EMAIL), metadata=h.app_metadata)
    )
    assert error_info(error).reason == "RESEND_TOO_SOON"


def test_an_enrollment_started_while_the_first_method_is_being_confirmed_gets_no_second_factor_in(
    start_server: ServerFactory, clock: Clock, backend: str
) -> None:
    """A caller (a compromised login backend) starts an email enrollment to an address it set
    while the user has no method, racing the user's own first confirmation. The step-up rule was
    checked in a transaction of its own, without the row lock, and the code sent in another: the
    check saw no method, the pending enrollment was written after the confirmation, and the
    caller's address became a second factor with a fresh token. Now the rule is checked, and the
    start recorded as proven or not, under the row lock: whichever goes first, no email method."""
    if backend != "postgres":
        return  # SQLite runs one writer at a time: the race needs two transactions in flight
    h = start_server(dispatcher=SwitchableQueue())
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="vic", email="attacker@evil.example"), metadata=h.app_metadata
    )
    secret = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="vic", method=AUTHENTICATOR), metadata=h.app_metadata
    ).authenticator.secret
    victims_code = totp_now(secret, clock)
    with psycopg.connect(h.settings.database_url) as holder, ThreadPoolExecutor(2) as pool:
        holder.execute("SELECT 1 FROM users WHERE user_id = 'vic' FOR UPDATE")  # both calls queue
        holder_pid = holder.info.backend_pid
        victim = pool.submit(
            h.twofactor.ConfirmEnrollment,
            pb.ConfirmEnrollmentRequest(user_id="vic", method=AUTHENTICATOR, code=victims_code),
            metadata=h.app_metadata,
        )
        wait_until(lambda: waiting_behind(holder, holder_pid) >= 1, "the confirmation waits for the row")
        attacker = pool.submit(
            h.twofactor.StartEnrollment,
            pb.StartEnrollmentRequest(user_id="vic", method=EMAIL),
            metadata=h.app_metadata,
        )
        wait_until(lambda: waiting_behind(holder, holder_pid) >= 2, "the start waits for the row too")
        holder.commit()
        assert victim.result(timeout=30).confirmed
        try:
            started = attacker.result(timeout=30)
        except grpc.RpcError as refused:
            assert error_info(refused).reason == "STEP_UP_REQUIRED"
            started = None
    if started is not None:  # the start went first, without a proof: its enrollment can't finish
        with pytest.raises(grpc.RpcError) as refused_late:
            h.twofactor.ConfirmEnrollment(
                pb.ConfirmEnrollmentRequest(
                    user_id="vic", method=EMAIL, code=stored_code(h, started.challenge.challenge_id)
                ),
                metadata=h.app_metadata,
            )
        assert error_info(refused_late.value).reason == "NO_PENDING_ENROLLMENT"
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="vic"), metadata=h.app_metadata)
    assert list(status.enabled_methods) == [AUTHENTICATOR]


class GatewayBusyWhileTheNumberChanges:
    """An operator's SMS class whose gateway is busy (a retry is due) while the user changes the
    number the text was going to: its code is withdrawn during the attempt."""

    harness: Harness | None = None
    sends = 0

    def send_sms(self, message: object) -> str:
        from twofactor_server.delivery.providers import TransientDeliveryError

        h = GatewayBusyWhileTheNumberChanges.harness
        assert h is not None
        GatewayBusyWhileTheNumberChanges.sends += 1
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="mo", phone="+14155550199"), metadata=h.app_metadata
        )
        raise TransientDeliveryError("gateway busy")


def test_a_code_withdrawn_during_an_attempt_that_retries_reads_expired(start_server: ServerFactory) -> None:
    """No worker takes a withdrawn code's row again, so the retry its attempt asked for never
    runs: the row is closed out EXPIRED with the withdrawal's reason, not QUEUED until it expires."""
    GatewayBusyWhileTheNumberChanges.sends = 0
    h = start_server(
        sms_provider=f"{__name__}:GatewayBusyWhileTheNumberChanges", delivery_retry_base_seconds=0.1
    )
    GatewayBusyWhileTheNumberChanges.harness = h
    before = {outcome: sms_deliveries(outcome) for outcome in ("retry", "expired")}
    h.twofactor.SetContact(pb.SetContactRequest(user_id="mo", phone="+14155550123"), metadata=h.app_metadata)
    started = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="mo", method=SMS), metadata=h.app_metadata
    ).challenge
    sql = "SELECT delivery_status, failure_reason FROM challenges WHERE challenge_id = %(c)s"
    args = {"c": started.challenge_id}
    wait_until(
        lambda: (
            GatewayBusyWhileTheNumberChanges.sends == 1
            and query(h.settings, sql, args)[0]["delivery_status"] != "sending"
        ),
        "the attempt recorded its outcome",
    )
    assert query(h.settings, sql, args) == [
        {"delivery_status": "expired", "failure_reason": WITHDRAWN_REASON}
    ]
    # Counted as what was recorded: one delivery, one outcome.
    assert {outcome: sms_deliveries(outcome) - n for outcome, n in before.items()} == {
        "retry": 0,
        "expired": 1,
    }


def sms_deliveries(outcome: str) -> float:
    """twofactor_deliveries_total for texts with `outcome`, over every provider (in-process delivery)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "twofactor_deliveries"
        for sample in metric.samples
        if sample.name == "twofactor_deliveries_total"
        and sample.labels["method"] == "sms"
        and sample.labels["outcome"] == outcome
    )


def test_an_idempotency_key_sent_again_for_the_other_method_sends_that_methods_code(
    h: Harness, sink: SmtpSink
) -> None:
    """A login page that keys its sends by the login attempt ("email me a code", then "text me
    instead") must get the text: the same key for another method is another request, not a retry
    of the first, whose email challenge would come back and leave the user waiting for a text."""
    enroll_text = enroll_text_and_email(h, sink, "ivy")

    def send(method: int) -> pb.Challenge:
        request = pb.SendCodeRequest(user_id="ivy", method=method, idempotency_key="login-9")
        return h.twofactor.SendCode(request, metadata=h.app_metadata).challenge

    by_email = send(EMAIL)
    by_text = send(SMS)
    assert by_text.method == SMS and by_text.challenge_id != by_email.challenge_id
    text = wait_for_text("+14155550142", after=enroll_text)
    assert verify(h, "ivy", sms_code(text)).result == pb.VERIFY_RESULT_ACCEPTED
    assert send(SMS).challenge_id == by_text.challenge_id  # a retry of the text: the same challenge


def enroll_text_and_email(h: Harness, sink: SmtpSink, user: str) -> str:
    """Enroll `user` in codes by text (+14155550142), then by email; return the enrollment's text."""
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user, email=f"{user}@example.com", phone="+14155550142"),
        metadata=h.app_metadata,
    )
    h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id=user, method=SMS), metadata=h.app_metadata)
    enroll_text = wait_for_text("+14155550142")
    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=SMS, code=sms_code(enroll_text)),
        metadata=h.app_metadata,
    )
    before = len(sink.messages)
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=EMAIL, verification_token=confirm.verification_token),
        metadata=h.app_metadata,
    )
    code = code_in(sink.message_to(f"{user}@example.com", "Confirm", after=before))
    assert h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id=user, method=EMAIL, code=code), metadata=h.app_metadata
    ).confirmed
    return enroll_text


def test_of_two_codes_sent_in_one_millisecond_the_later_one_counts(
    h: Harness, sink: SmtpSink, clock: Clock
) -> None:
    """ "Email me", then at once "text me instead": the text's code is the one that counts, and the
    email's is superseded. Sent in the same millisecond (the test's clock stands still), the two
    were a tie, which the publish broke by the challenges' random ids and the Verify by the
    order the database happened to return them: the text's code was refused about half the time."""
    enroll_text_and_email(h, sink, "ivy")

    def texts() -> list[str]:
        return [m.text for m in SharedRecordingSms.outbox if m.to == "+14155550142"]

    for _ in range(40):  # a tie went the wrong way now and then
        clock.advance(3601)  # an hour on: the send limits start again
        sent = len(texts())
        for method in (EMAIL, SMS):
            h.twofactor.SendCode(pb.SendCodeRequest(user_id="ivy", method=method), metadata=h.app_metadata)
        wait_until(lambda: len(texts()) > sent, "the text is sent")  # noqa: B023 - called in this iteration
        assert verify(h, "ivy", sms_code(texts()[-1])).result == pb.VERIFY_RESULT_ACCEPTED
