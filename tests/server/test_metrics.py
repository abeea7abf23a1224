"""/metrics over HTTP, parsed with prometheus_client's own parser: the counters move as calls are made,
with go-grpc-prometheus's names and labels."""

from __future__ import annotations

import queue
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, Harness, ServerFactory
from tests.server.helpers import EMAIL, enroll_authenticator, totp_now, verify, wait_until
from tests.server.stored_rows import query
from tests.server.test_retry_generation import Published
from tests.smtp_sink import SmtpSink, free_port
from tests.workers.celery_harness import start_email_enrollment
from twofactor_server.app import load_keyring
from twofactor_server.delivery.deliverer import Deliverer
from twofactor_server.delivery.providers import EmailMessage, PermanentDeliveryError, SmsMessage
from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.settings import Settings
from twofactor_server.storage.database import open_database

SERVICE = "twofactor.v1.TwoFactorService"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def backend() -> str:
    return "sqlite"  # metrics don't depend on the store; one backend keeps the test quick


def scrape(h: Harness) -> Samples:
    port = h.server.metrics_port
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def grpc_labels(method: str, **more: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method, **more}


def test_grpc_and_domain_metrics_move_as_calls_are_made(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock
) -> None:
    h = start_server(
        metrics_listen="127.0.0.1:0",
        email_provider="smtp",
        smtp=sink.settings(),
        policy={"lockout_threshold": 2, "max_consecutive_failures": 10},
    )
    before = scrape(h)
    secret, _ = enroll_authenticator(h, clock, "mia")
    assert verify(h, "mia", totp_now(secret, clock)).result == pb.VERIFY_RESULT_ACCEPTED
    assert verify(h, "mia", "000000").result == pb.VERIFY_RESULT_REJECTED
    assert verify(h, "mia", "000001").result == pb.VERIFY_RESULT_LOCKED
    with pytest.raises(grpc.RpcError) as refused:
        h.twofactor.Verify(pb.VerifyRequest(user_id="mia", code="x"), metadata=h.app_metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unauthenticated:
        h.twofactor.GetStatus(pb.GetStatusRequest(user_id="mia"))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED

    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="eva", email="eva@example.com"), metadata=h.app_metadata
    )
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="eva", method=EMAIL), metadata=h.app_metadata
    )
    sink.wait_for_messages(1)
    with pytest.raises(grpc.RpcError) as too_soon:
        h.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="eva", method=EMAIL), metadata=h.app_metadata
        )
    assert too_soon.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The delivery is counted just after the provider accepted it: wait for that (bounded).
    deadline = time.monotonic() + 60
    after = scrape(h)
    while value(after, "twofactor_delivery_seconds_count") == value(
        before, "twofactor_delivery_seconds_count"
    ):
        assert time.monotonic() < deadline, "the delivery was never counted"
        time.sleep(0.05)
        after = scrape(h)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("grpc_server_started_total", **grpc_labels("Verify")) == 4
    assert moved("grpc_server_handled_total", **grpc_labels("Verify", grpc_code="OK")) == 3
    assert moved("grpc_server_handled_total", **grpc_labels("Verify", grpc_code="InvalidArgument")) == 1
    assert moved("grpc_server_handled_total", **grpc_labels("GetStatus", grpc_code="Unauthenticated")) == 1
    assert (
        moved("grpc_server_handled_total", **grpc_labels("StartEnrollment", grpc_code="ResourceExhausted"))
        == 1
    )
    assert moved("grpc_server_handling_seconds_count", **grpc_labels("Verify")) == 4
    assert moved("grpc_server_handling_seconds_bucket", **grpc_labels("Verify", le="+Inf")) == 4
    assert moved("twofactor_verifications_total", result="accepted", kind="authenticator") == 1
    assert moved("twofactor_verifications_total", result="rejected", kind="none") == 1
    assert moved("twofactor_verifications_total", result="locked", kind="none") == 1
    assert moved("twofactor_lockouts_total") == 1
    assert moved("twofactor_codes_sent_total", method="email", outcome="queued") == 1
    assert moved("twofactor_send_refusals_total", reason="RESEND_TOO_SOON") == 1
    # The enrollment code's delivery is recorded once the provider accepted it.
    assert moved("twofactor_deliveries_total", method="email", provider="smtp", outcome="sent") == 1
    assert moved("twofactor_delivery_seconds_count") == 1
    # Defined for outbox recovery and the broker check, present from the start.
    assert ("twofactor_outbox_oldest_queued_seconds", frozenset()) in after
    assert ("twofactor_outbox_republished_total", frozenset()) in after


def test_no_metrics_endpoint_unless_configured(start_server: ServerFactory) -> None:
    assert start_server().server.metrics_port == 0


def test_a_metrics_address_in_use_is_a_configuration_error(start_server: ServerFactory) -> None:
    from twofactor_server.settings import SettingsError

    h = start_server(metrics_listen="127.0.0.1:0")
    port = h.server.metrics_port
    with pytest.raises(SettingsError, match=f"on 127.0.0.1:{port} \\(port {port} is already in use: each "):
        start_server(metrics_listen=f"127.0.0.1:{port}")


def test_a_reflection_stream_the_client_cancels_is_counted_cancelled_not_unknown(
    start_server: ServerFactory,
) -> None:
    """grpcui, evans and grpc-go's reflection client end the stream by cancelling it: that is
    the client leaving, not a bug, so not `Unknown`, which the README's alert on bugs counts."""
    h = start_server(metrics_listen="127.0.0.1:0")
    before = scrape(h)  # the metrics are the process's: other tests' calls are in them too
    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    more: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        while (item := more.get(timeout=30)) is not None:
            yield item

    call = stub.ServerReflectionInfo(requests(), metadata=h.admin_metadata)
    assert next(call).list_services_response.service
    call.cancel()
    # The requests end only after the check (finally): ended first, they are the client's
    # half-close, which can reach the server before the cancel and end the stream OK.
    labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
        "grpc_method": "ServerReflectionInfo",
    }

    def ended(code: str) -> float:
        return value(scrape(h), "grpc_server_handled_total", **labels, grpc_code=code) - value(
            before, "grpc_server_handled_total", **labels, grpc_code=code
        )

    def counted_so_far() -> str:  # on a timeout: what was counted instead, if anything
        moved = {
            dict(labelset)["grpc_code"]: count - before.get((name, labelset), 0.0)
            for (name, labelset), count in scrape(h).items()
            if name == "grpc_server_handled_total" and labels.items() <= dict(labelset).items()
        }
        return f"the stream's end is counted (this stream's grpc_server_handled_total moved by {moved})"

    try:
        wait_until(lambda: ended("Canceled") >= 1, counted_so_far)
        assert ended("Canceled") == 1 and ended("Unknown") == 0
    finally:
        more.put(None)


def test_a_notice_is_counted_when_its_change_commits_not_when_its_first_publish_succeeds(
    start_server: ServerFactory, clock: Clock
) -> None:
    """A notice whose first publish fails (the broker is down) is in the outbox all the same, and
    outbox recovery publishes it later, in a worker, which counts no notice: counted only after a
    publish that worked, it was never counted anywhere."""
    h = start_server(
        metrics_listen="127.0.0.1:0",
        broker_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        broker_timeout_seconds=0.5,
        policy={"notify_users": True},
    )
    before = scrape(h)
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="noa", email="noa@example.com"), metadata=h.app_metadata
    )
    enroll_authenticator(h, clock, "noa")  # a method_added notice, its publish refused
    rows = query(h.settings, "SELECT notice FROM challenges WHERE purpose = 'notice' AND user_id = 'noa'")
    assert [r["notice"] for r in rows] == ["method_added"]
    moved = value(scrape(h), "twofactor_notices_total", notice="method_added") - value(
        before, "twofactor_notices_total", notice="method_added"
    )
    assert moved == 1


class RelayFailingLate:
    """An email provider whose first send outlasts its claim's lease (`during` runs inside it:
    another attempt takes over and sends) and then fails for good; later sends go through."""

    def __init__(self) -> None:
        self.during: Callable[[], None] | None = None
        self.sent = 0

    def send_email(self, message: EmailMessage) -> str:
        if self.during is not None:
            during, self.during = self.during, None
            during()
            raise PermanentDeliveryError("SMTP 554 5.7.1 rejected, too late to matter")
        self.sent += 1
        return f"m-{self.sent}"


class NoSms:
    def send_sms(self, message: SmsMessage) -> str:
        raise AssertionError("no text in this test")


def test_an_outcome_recorded_by_no_one_is_not_counted(
    start_server: ServerFactory, clock: Clock, settings: Settings
) -> None:
    """A send that outlasts its lease and then fails: another attempt took the delivery over and
    sent it, and the late failure is not recorded (the row says SENT). Counted, it made one
    delivery both `sent` and `failed`, and the "Deliveries fail" alert fired for a code that
    arrived."""
    published = Published()
    h = start_server(dispatcher=published)
    challenge_id = start_email_enrollment(h, "lea").challenge_id
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=10)
    try:
        relay = RelayFailingLate()
        deliverer = Deliverer(db, load_keyring(h.settings), relay, NoSms(), issuer="Acme", clock=clock)
        recovery = OutboxRecovery(db, published.dispatch, recovery_seconds=10.0, clock=clock)
        taken_over: list[str] = []

        def lease_runs_out_and_another_attempt_sends() -> None:
            clock.advance(121)  # past the default 120 s lease
            assert recovery.run_once() == 1
            taken_over.append(deliverer.deliver(challenge_id, published.messages[-1][1]).status)

        relay.during = lease_runs_out_and_another_attempt_sends
        before = {o: deliveries(o) for o in ("sent", "failed")}
        assert deliverer.deliver(challenge_id).status == "failed"
        assert taken_over == ["sent"]
        [row] = query(
            settings, "SELECT delivery_status FROM challenges WHERE challenge_id = %(c)s", {"c": challenge_id}
        )
        assert row["delivery_status"] == "sent"
        assert {o: deliveries(o) - before[o] for o in before} == {"sent": 1, "failed": 0}
    finally:
        db.close()


def deliveries(outcome: str) -> float:
    labels = {"method": "email", "provider": "RelayFailingLate", "outcome": outcome}
    return REGISTRY.get_sample_value("twofactor_deliveries_total", labels) or 0.0


# Fails the transaction that wrote a chosen user's audit event when it commits (a deferred
# constraint trigger runs at COMMIT): PostgreSQL refuses the commit, as it would on a lost
# connection or a serialization failure there, and the server answers UNAVAILABLE.
FAIL_COMMITS_OF = """
CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the test refuses this commit' USING ERRCODE = 'serialization_failure';
END $$;
CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON audit_events DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.user_id = 'zoe') EXECUTE FUNCTION fail_commit();
"""


@pytest.mark.parametrize("backend", ["postgres"])
def test_verify_answers_and_locks_are_counted_only_when_their_writes_commit(
    start_server: ServerFactory, clock: Clock
) -> None:
    """A Verify whose transaction fails at COMMIT answers UNAVAILABLE and changed nothing (the
    backup code is still unused, no failure counted): counted before the commit, its answer and
    its lock were in twofactor_verifications_total and twofactor_lockouts_total all the same, and
    the client's retry counted them a second time."""
    h = start_server(metrics_listen="127.0.0.1:0", policy={"lockout_threshold": 1})
    _, backup = enroll_authenticator(h, clock, "zoe")
    with psycopg.connect(h.settings.database_url, autocommit=True) as conn:
        conn.execute(FAIL_COMMITS_OF)
    before = scrape(h)
    for code in (backup[0], "aaaaa-aaaaa"):  # a backup code (accepted), then a wrong one (locks)
        with pytest.raises(grpc.RpcError) as refused:
            verify(h, "zoe", code)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert query(h.settings, "SELECT failed_attempts FROM users WHERE user_id = 'zoe'") == [
        {"failed_attempts": 0}
    ]
    after = scrape(h)
    for labels in ({"result": "accepted", "kind": "backup_code"}, {"result": "locked", "kind": "none"}):
        assert value(after, "twofactor_verifications_total", **labels) == value(
            before, "twofactor_verifications_total", **labels
        ), labels
    assert value(after, "twofactor_lockouts_total") == value(before, "twofactor_lockouts_total")

    with psycopg.connect(h.settings.database_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER fail_commit ON audit_events")
    assert verify(h, "zoe", backup[0]).result == pb.VERIFY_RESULT_ACCEPTED
    assert verify(h, "zoe", "aaaaa-aaaaa").result == pb.VERIFY_RESULT_LOCKED
    retried = scrape(h)
    for labels in ({"result": "accepted", "kind": "backup_code"}, {"result": "locked", "kind": "none"}):
        moved = value(retried, "twofactor_verifications_total", **labels) - value(
            before, "twofactor_verifications_total", **labels
        )
        assert moved == 1, labels
    assert value(retried, "twofactor_lockouts_total") - value(before, "twofactor_lockouts_total") == 1


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_lock_its_own_statement_committed_is_counted_though_the_answer_fails(
    start_server: ServerFactory, clock: Clock
) -> None:
    """A wrong authenticator code is counted by one statement that commits on its own (the
    reserved attempt), which locks the user; the transaction that then audits it and answers
    fails at COMMIT. The lock is in force all the same, so it is counted."""
    h = start_server(metrics_listen="127.0.0.1:0", policy={"lockout_threshold": 1})
    secret, _ = enroll_authenticator(h, clock, "zoe")
    shown = {totp_now(secret, clock, offset_steps=step) for step in (-1, 0, 1)}
    wrong = next(code for code in ("000000", "000001", "000002", "000003") if code not in shown)
    with psycopg.connect(h.settings.database_url, autocommit=True) as conn:
        conn.execute(FAIL_COMMITS_OF)
    before = scrape(h)
    with pytest.raises(grpc.RpcError) as refused:
        verify(h, "zoe", wrong)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert query(h.settings, "SELECT failed_attempts FROM users WHERE user_id = 'zoe'") == [
        {"failed_attempts": 1}
    ]
    assert value(scrape(h), "twofactor_lockouts_total") - value(before, "twofactor_lockouts_total") == 1


def test_a_code_that_expires_in_the_outbox_is_counted_once(
    start_server: ServerFactory, clock: Clock, settings: Settings
) -> None:
    """A code no worker delivered before it expired (every worker down, say): outbox recovery
    closes it as EXPIRED without any delivery attempt, which twofactor_deliveries_total never
    sees. twofactor_outbox_expired_total says how many users got no code; once per code,
    however many recovery rounds (or servers) come after, and not for a code a later one
    replaced (its user waited for the later one)."""
    published = Published()
    h = start_server(dispatcher=published)
    replaced = start_email_enrollment(h, "ivy").challenge_id
    clock.advance(h.settings.policy.resend_cooldown_seconds)
    challenge_id = start_email_enrollment(h, "ivy").challenge_id  # replaces the first (not counted)
    db = open_database(settings.database_url, data_dir=settings.data_dir, timeout=10)
    try:
        recovery = OutboxRecovery(db, published.dispatch, recovery_seconds=10.0, clock=clock)
        before = REGISTRY.get_sample_value("twofactor_outbox_expired_total", {"method": "email"}) or 0.0
        clock.advance(h.settings.policy.code_ttl_seconds + 1)
        recovery.run_once()
        recovery.run_once()
        rows = query(
            settings,
            "SELECT challenge_id, delivery_status FROM challenges WHERE user_id = 'ivy' "
            "AND purpose <> 'notice'",
        )
        assert {r["challenge_id"]: r["delivery_status"] for r in rows} == {
            replaced: "expired",
            challenge_id: "expired",
        }
        after = REGISTRY.get_sample_value("twofactor_outbox_expired_total", {"method": "email"})
        assert after == before + 1
    finally:
        db.close()
