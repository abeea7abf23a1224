"""The SMS pumping guard: allowed countries at SetContact and at send, hourly caps per country and
in all that concurrent sends can't pass, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import REGISTRY
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory, started_harness
from tests.server.helpers import EMAIL, SMS, error_info, retry_info
from tests.server.stored_rows import query
from twofactor_server.domain.errors import Unavailable
from twofactor_server.domain.sms_countries import UNKNOWN, phone_country
from twofactor_server.settings import Settings, SettingsError

FR = "+3361234{:04d}"  # French mobile numbers
US = "+1415555{:04d}"
NO_USER_LIMITS = {"sends_per_user_per_hour": 1000, "sends_per_destination_per_hour": 1000}


class RecordingDispatcher:
    """Queues nothing: these tests are about whether a text may be sent, not its delivery."""

    def __init__(self) -> None:
        self.challenge_ids: list[str] = []
        self._lock = threading.Lock()

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        with self._lock:
            self.challenge_ids.append(challenge_id)


def set_phone(h: Harness, user: str, phone: str) -> pb.SetContactResponse:
    return h.twofactor.SetContact(pb.SetContactRequest(user_id=user, phone=phone), metadata=h.app_metadata)


def text_a_code(h: Harness, user: str, phone: str) -> pb.StartEnrollmentResponse:
    """A new user (no method yet: no step-up needed) registers `phone` and is sent an SMS code."""
    set_phone(h, user, phone)
    return h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user, method=SMS), metadata=h.app_metadata
    )


def test_phone_countries() -> None:
    assert phone_country("+14155550123") == "US"
    assert phone_country("+15145550123") == "CA"
    assert phone_country("+18765550123") == "JM"  # +1 is shared: the area code decides
    assert phone_country("+33612345678") == "FR"
    assert phone_country("+447700900123") == "GB"  # a reserved UK number: its calling code's country
    assert phone_country("+999123456") == UNKNOWN


def test_settings() -> None:
    policy = Settings.from_env(
        {
            "TWOFACTOR_SMS_ALLOWED_COUNTRIES": "us, ca,US",
            "TWOFACTOR_SMS_PER_COUNTRY_PER_HOUR": "50",
            "TWOFACTOR_SMS_PER_HOUR": "200",
        }
    ).policy
    assert (policy.sms_allowed_countries, policy.sms_per_country_per_hour, policy.sms_per_hour) == (
        ("US", "CA"),
        50,
        200,
    )
    defaults = Settings.from_env({}).policy
    assert (defaults.sms_allowed_countries, defaults.sms_per_country_per_hour, defaults.sms_per_hour) == (
        (),
        0,
        0,
    )
    with pytest.raises(SettingsError, match=r"TWOFACTOR_SMS_ALLOWED_COUNTRIES must list ISO 3166.*UK"):
        Settings.from_env({"TWOFACTOR_SMS_ALLOWED_COUNTRIES": "US,UK"})


def test_set_contact_refuses_a_number_from_a_country_not_allowed(start_server: ServerFactory) -> None:
    h = start_server(policy={"sms_allowed_countries": ("US", "CA")})
    assert set_phone(h, "ana", US.format(1)).masked_phone
    with pytest.raises(grpc.RpcError) as raised:
        set_phone(h, "ana", FR.format(1))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info.reason == "SMS_COUNTRY_NOT_ALLOWED" and info.metadata["country"] == "FR"
    assert "US, CA" in raised.value.details()
    status = h.twofactor.GetStatus(pb.GetStatusRequest(user_id="ana"), metadata=h.app_metadata)
    assert status.phone_registered  # the US number stays
    set_phone(h, "ana", "")  # removing the number is always allowed
    # With no list, every country is allowed.
    open_h = start_server()
    assert set_phone(open_h, "ben", FR.format(2)).masked_phone


def test_a_number_registered_before_the_list_is_refused_at_send(start_server: ServerFactory) -> None:
    h = start_server(dispatcher=RecordingDispatcher())
    set_phone(h, "cat", FR.format(3))
    h.server.stop(grace=None)
    narrowed = start_server(dispatcher=RecordingDispatcher(), policy={"sms_allowed_countries": ("US",)})
    with pytest.raises(grpc.RpcError) as raised:
        narrowed.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="cat", method=SMS), metadata=narrowed.app_metadata
        )
    assert error_info(raised.value).reason == "SMS_COUNTRY_NOT_ALLOWED"


def refusals_counted(reason: str) -> float:
    """twofactor_send_refusals_total{reason} of this process, where the test's server runs."""
    return REGISTRY.get_sample_value("twofactor_send_refusals_total", {"reason": reason}) or 0.0


def test_hourly_caps_per_country_and_in_all(start_server: ServerFactory, clock: Clock) -> None:
    clock.now = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 600  # ten minutes into a clock hour
    dispatcher = RecordingDispatcher()
    h = start_server(
        dispatcher=dispatcher, policy={**NO_USER_LIMITS, "sms_per_country_per_hour": 2, "sms_per_hour": 3}
    )
    refusals_before = {
        reason: refusals_counted(reason) for reason in ("SMS_COUNTRY_LIMIT", "SMS_GLOBAL_LIMIT")
    }
    text_a_code(h, "fr-0", FR.format(10))
    text_a_code(h, "fr-1", FR.format(11))
    with pytest.raises(grpc.RpcError) as country_cap:
        text_a_code(h, "fr-2", FR.format(12))
    assert country_cap.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(country_cap.value)
    assert info.reason == "SMS_COUNTRY_LIMIT" and info.metadata["country"] == "FR"
    retry = retry_info(country_cap.value)
    assert retry is not None and retry.retry_delay.seconds == 3000  # the hour ends in 50 minutes

    text_a_code(h, "us-0", US.format(10))  # another country still gets its texts, up to the total
    with pytest.raises(grpc.RpcError) as global_cap:
        text_a_code(h, "us-1", US.format(11))
    assert error_info(global_cap.value).reason == "SMS_GLOBAL_LIMIT"
    assert retry_info(global_cap.value) is not None
    assert len(dispatcher.challenge_ids) == 3  # a refused send queues nothing
    # Counted where an alert on SMS pumping looks (the server's own process: in-process here).
    assert {r: refusals_counted(r) - n for r, n in refusals_before.items()} == {
        "SMS_COUNTRY_LIMIT": 1,
        "SMS_GLOBAL_LIMIT": 1,
    }

    clock.advance(3000)  # the next clock hour
    text_a_code(h, "fr-2", FR.format(12))
    assert len(dispatcher.challenge_ids) == 4
    # The previous hour's counts stay (a server whose clock is behind still counts in it); those
    # of the hours before it are dropped on the way.
    rows = "SELECT hour - %(h)s AS hour, country, sends FROM sms_send_counts ORDER BY hour, country"
    this_hour = int(clock.now) // 3600
    assert query(h.settings, rows, {"h": this_hour}) == [
        {"hour": -1, "country": "*", "sends": 3},
        {"hour": -1, "country": "FR", "sends": 2},
        {"hour": -1, "country": "US", "sends": 1},
        {"hour": 0, "country": "*", "sends": 1},
        {"hour": 0, "country": "FR", "sends": 1},
    ]
    clock.advance(3600)
    text_a_code(h, "fr-3", FR.format(13))
    assert query(h.settings, rows, {"h": this_hour}) == [
        {"hour": 0, "country": "*", "sends": 1},
        {"hour": 0, "country": "FR", "sends": 1},
        {"hour": 1, "country": "*", "sends": 1},
        {"hour": 1, "country": "FR", "sends": 1},
    ]


class SwitchableQueue(RecordingDispatcher):
    """A queue that can be down: a send whose publish fails is voided, and its caller told UNAVAILABLE."""

    down = False

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        if self.down:
            raise Unavailable("BROKER_UNAVAILABLE", "the delivery queue can't be reached; retry later")
        super().dispatch(challenge_id)


def test_texts_voided_in_a_queue_outage_use_none_of_the_hours_caps(
    start_server: ServerFactory, clock: Clock
) -> None:
    """Clients told BROKER_UNAVAILABLE retry; their voided sends counted toward the hour's caps,
    and once the queue was back every text was refused until the next hour."""
    clock.now = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 600
    queue = SwitchableQueue()
    h = start_server(
        dispatcher=queue,
        policy={
            **NO_USER_LIMITS,
            "resend_cooldown_seconds": 0,
            "sms_per_country_per_hour": 2,
            "sms_per_hour": 3,
        },
    )
    text_a_code(h, "fr-0", FR.format(20))
    # A text to another country before the outage: what the voided sends give back is theirs only.
    text_a_code(h, "us-0", US.format(20))
    queue.down = True
    for n in range(5):
        with pytest.raises(grpc.RpcError) as refused:
            text_a_code(h, f"fr-{n + 1}", FR.format(21 + n))
        assert error_info(refused.value).reason == "BROKER_UNAVAILABLE"
    # An email voided in the outage gives back no text's count.
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="em-0", email="em@example.com"), metadata=h.app_metadata
    )
    with pytest.raises(grpc.RpcError) as refused:
        h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="em-0", method=EMAIL), metadata=h.app_metadata
        )
    assert error_info(refused.value).reason == "BROKER_UNAVAILABLE"
    queue.down = False
    text_a_code(h, "fr-1", FR.format(21))  # the country's second text of the hour, the third in all
    with pytest.raises(grpc.RpcError) as country_cap:
        text_a_code(h, "fr-2", FR.format(22))
    assert error_info(country_cap.value).reason == "SMS_COUNTRY_LIMIT"  # the cap still holds
    with pytest.raises(grpc.RpcError) as global_cap:
        text_a_code(h, "us-1", US.format(21))
    assert error_info(global_cap.value).reason == "SMS_GLOBAL_LIMIT"
    assert len(queue.challenge_ids) == 3
    counts = query(h.settings, "SELECT country, sends FROM sms_send_counts ORDER BY country", {})
    assert counts == [
        {"country": "*", "sends": 3},
        {"country": "FR", "sends": 2},
        {"country": "US", "sends": 1},
    ]


def test_concurrent_sends_cant_pass_the_caps(start_server: ServerFactory) -> None:
    dispatcher = RecordingDispatcher()
    h = start_server(dispatcher=dispatcher, policy={**NO_USER_LIMITS, "sms_per_country_per_hour": 5})
    users = [(f"u{i}", FR.format(100 + i)) for i in range(20)]
    for user, phone in users:
        set_phone(h, user, phone)
    start = threading.Barrier(len(users), timeout=30)

    def send(user: str) -> str:
        start.wait()
        try:
            h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id=user, method=SMS), metadata=h.app_metadata
            )
        except grpc.RpcError as error:
            return error_info(error).reason
        return "sent"

    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        outcomes = list(pool.map(send, [u for u, _ in users]))
    assert outcomes.count("sent") == 5, outcomes
    assert outcomes.count("SMS_COUNTRY_LIMIT") == 15, outcomes
    assert len(dispatcher.challenge_ids) == 5
    counted = query(h.settings, "SELECT country, sends FROM sms_send_counts")
    assert [(r["country"], r["sends"]) for r in counted] == [("FR", 5)]


def test_a_number_stored_before_mobile_numbers_only_is_not_texted(start_server: ServerFactory) -> None:
    """SetContact takes mobile numbers only; a premium-rate number stored before that is refused
    at send too (it would be paid for every text), with a reason that says what to do."""
    dispatcher = RecordingDispatcher()
    h = start_server(dispatcher=dispatcher)
    set_phone(h, "pam", US.format(77))
    with h.server.db.transaction() as tx:  # as the previous release let it be stored
        tx.execute("UPDATE users SET phone = '+19005550123' WHERE user_id = 'pam'")
    with pytest.raises(grpc.RpcError) as refused:
        h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="pam", method=SMS), metadata=h.app_metadata
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(refused.value)
    assert info.reason == "PHONE_NOT_MOBILE" and info.metadata["contact"] == "phone"
    assert dispatcher.challenge_ids == []


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_server_whose_clock_is_ahead_does_not_reset_the_hour_of_one_behind(
    start_server: ServerFactory, settings: Settings, clock: Clock
) -> None:
    """Two servers on one database, one clock a minute ahead of the other: near the end of a clock
    hour the one ahead counts its texts in the next hour already. Dropping every earlier hour on
    the way threw away the count the other server was still filling, which then started again
    from 0: each text of the server ahead gave the one behind another full cap."""
    hour_start = 1_800_000_000.0 - 1_800_000_000.0 % 3600
    clock.now = hour_start + 3600 - 30  # half a minute before the next clock hour
    ahead = Clock(clock.now + 60)  # another machine's clock, a minute ahead: in the next hour
    dispatcher = RecordingDispatcher()
    policy = {**NO_USER_LIMITS, "sms_per_country_per_hour": 2}
    behind = start_server(dispatcher=dispatcher, policy=policy)
    other = started_harness(behind.settings, ahead, dispatcher=RecordingDispatcher())
    try:
        text_a_code(behind, "fr-0", FR.format(30))
        text_a_code(behind, "fr-1", FR.format(31))
        text_a_code(other, "fr-next", FR.format(39))  # counted in the next hour, by its clock
        with pytest.raises(grpc.RpcError) as country_cap:
            text_a_code(behind, "fr-2", FR.format(32))  # the third of this hour: over the cap
        assert error_info(country_cap.value).reason == "SMS_COUNTRY_LIMIT"
    finally:
        other.channel.close()
        other.server.stop(grace=None)


class QueueDownWhileTheNumberChanges(RecordingDispatcher):
    """A queue that is down, and a user who changes their number while the publish fails: the
    code to the old number is withdrawn (EXPIRED) before the send is voided."""

    harness: Harness | None = None

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        assert self.harness is not None
        set_phone(self.harness, "fr-moved", FR.format(41))  # the method is off: applies at once
        raise Unavailable("BROKER_UNAVAILABLE", "the delivery queue can't be reached; retry later")


def test_a_text_withdrawn_while_its_publish_fails_is_still_voided(start_server: ServerFactory) -> None:
    """A send whose publish failed is void and counted nowhere, its caller told UNAVAILABLE,
    even when its code was withdrawn (a change of number) while the publish was under way."""
    queue = QueueDownWhileTheNumberChanges()
    h = start_server(dispatcher=queue, policy=NO_USER_LIMITS)
    queue.harness = h
    with pytest.raises(grpc.RpcError) as refused:
        text_a_code(h, "fr-moved", FR.format(40))
    assert error_info(refused.value).reason == "BROKER_UNAVAILABLE"
    assert query(h.settings, "SELECT country, sends FROM sms_send_counts WHERE sends > 0", {}) == []
    stored = query(h.settings, "SELECT delivery_status FROM challenges WHERE user_id = 'fr-moved'", {})
    assert stored == [{"delivery_status": "void"}]
