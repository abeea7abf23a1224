"""Delivery over a real Redis broker by real Celery worker processes (`twofactor worker`),
to a real SMTP server, with the faults the service must survive."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest
import redis
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import REDIS_URL, Harness, ServerFactory
from tests.server.helpers import EMAIL, error_info, verify
from tests.smtp_sink import SmtpSink, code_in, running_sink
from tests.workers.celery_harness import (
    Workers,
    celery_server,
    messages_left,
    private_redis,
    redis_contents,
    start_email_enrollment,
    wait_for_status,
)


def test_email_code_through_redis_and_a_celery_worker(
    sink: SmtpSink, start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    # The server runs on the real clock here: no resend cooldown, so the login code can follow at once.
    h = celery_server(start_server, sink, queue, policy={"resend_cooldown_seconds": 0})
    challenge = start_email_enrollment(h, "amy")
    assert challenge.delivery_status == common_pb2.DELIVERY_STATUS_QUEUED
    queued = redis_contents(REDIS_URL)
    assert (
        queue.encode() in queued and challenge.challenge_id.encode() in queued
    )  # the task is waiting in Redis

    workers = workers_for(h)
    workers.start()
    message = sink.wait_for_messages(1)[0]
    code = code_in(message)
    assert message["To"] == "amy@example.com"
    sent = wait_for_status(h, "amy", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert sent.provider_message_id == message["Message-ID"] and sent.delivery_attempts == 1
    # Redis never held the code: not in the queued task, not afterwards.
    assert code.encode() not in queued
    assert code.encode() not in redis_contents(REDIS_URL)

    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="amy", method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed
    # And a login code, verified once.
    sent_login = h.twofactor.SendCode(
        pb.SendCodeRequest(user_id="amy", method=EMAIL), metadata=h.app_metadata
    )
    login_code = code_in(sink.wait_for_messages(2)[-1])
    wait_for_status(h, "amy", sent_login.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert verify(h, "amy", login_code).result == pb.VERIFY_RESULT_ACCEPTED
    assert verify(h, "amy", login_code).result == pb.VERIFY_RESULT_REJECTED
    assert "Traceback" not in workers.logs()
    assert code not in workers.logs() and login_code not in workers.logs()


def test_broker_down_sends_are_void_they_count_nowhere_and_the_live_code_still_works(
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    tmp_path: Path,
    workers_for: Callable[[Harness], Workers],
) -> None:
    with private_redis(tmp_path) as broker:
        h = celery_server(
            start_server, sink, queue, broker_url=broker.url, policy={"resend_cooldown_seconds": 0}
        )
        workers = workers_for(h)
        workers.start()
        enrollment = start_email_enrollment(h, "bob")
        code = code_in(sink.wait_for_messages(1)[0])
        wait_for_status(h, "bob", enrollment.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        confirm = h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="bob", method=EMAIL, code=code), metadata=h.app_metadata
        )
        assert confirm.confirmed
        before = h.twofactor.SendCode(
            pb.SendCodeRequest(user_id="bob", method=EMAIL), metadata=h.app_metadata
        )
        live_code = code_in(sink.wait_for_messages(2)[-1])
        wait_for_status(h, "bob", before.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        workers.stop()
        broker.stop()

        # The README tells callers to retry UNAVAILABLE: 10 retries, with the limit at 10 per hour.
        for _ in range(10):
            with pytest.raises(grpc.RpcError) as raised:
                # The deadline is the requirement: UNAVAILABLE within 2 s, not DEADLINE_EXCEEDED.
                h.twofactor.SendCode(
                    pb.SendCodeRequest(user_id="bob", method=EMAIL), metadata=h.app_metadata, timeout=2
                )
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(raised.value).reason == "BROKER_UNAVAILABLE"
        with psycopg.connect(h.settings.database_url) as conn:
            rows = conn.execute(
                "SELECT delivery_status, code_ciphertext FROM challenges "
                "WHERE user_id = 'bob' AND purpose = 'login' AND challenge_id <> %s",
                (before.challenge.challenge_id,),
            ).fetchall()
        assert rows == [("void", None)] * 10  # nothing valid, nothing to send

        broker.start()  # back, empty
        workers.start()
        # The code received before the outage was not superseded by the void sends.
        assert verify(h, "bob", live_code).result == pb.VERIFY_RESULT_ACCEPTED
        # And the void sends counted toward no limit: 2 real sends so far, far below 10.
        after = h.twofactor.SendCode(pb.SendCodeRequest(user_id="bob", method=EMAIL), metadata=h.app_metadata)
        wait_for_status(h, "bob", after.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        assert len(sink.messages) == 3  # no void send was ever delivered
        assert verify(h, "bob", code_in(sink.messages[-1])).result == pb.VERIFY_RESULT_ACCEPTED


def test_at_least_once_worker_killed_before_the_relay_accepted_delivers_once_with_same_code(
    start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    """At-least-once delivery, in the case where it yields one message: the worker's pool
    process dies while the SMTP relay holds the transaction (before the relay accepted the
    message); its claim runs out and recovery publishes the delivery again: delivered once,
    with the challenge's code.

    A crash after the relay accepted the message sends it twice, with the same code and
    Message-ID: tests/workers/test_outbox_recovery.py covers that case."""
    with running_sink(SmtpSink(hold_first_recipient=True)) as sink:
        # The dead worker's claim runs out after 3 s; then recovery publishes the delivery again.
        h = celery_server(start_server, sink, queue, delivery_lease_seconds=3.0)
        workers = workers_for(h)
        first = workers.start(concurrency=1)
        challenge = start_email_enrollment(h, "cat")
        assert sink.recipient_held.wait(90), "the worker never reached the SMTP server"
        for pid in workers.children(first):
            os.kill(pid, signal.SIGKILL)  # the pool process dies mid-transaction
        workers.start(concurrency=1)  # another worker is there to take over
        sink.release.set()
        sent = wait_for_status(h, "cat", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        # The dead process's message may come back to the queue (late acknowledgement); it is of
        # an older publish generation. A worker that drains the queue sends nothing more.
        workers.stop()
        workers.start(concurrency=1)
        deadline = time.monotonic() + 90
        while messages_left(REDIS_URL, queue) > 0:
            assert time.monotonic() < deadline, "the queue was never drained"
            time.sleep(0.1)
        workers.stop()
        assert len(sink.messages) == 1
        assert sent.delivery_attempts == 2
        assert sent.provider_message_id == sink.messages[0]["Message-ID"]
        # Stable per challenge: a message sent twice (at-least-once) would carry the same id.
        assert sink.messages[0]["Message-ID"] == f"<{challenge.challenge_id}@example.com>"
        code = code_in(sink.messages[0])
        confirm = h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="cat", method=EMAIL, code=code), metadata=h.app_metadata
        )
        assert confirm.confirmed


def test_smtp_451_twice_then_delivered_once_with_retries_visible(
    start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    with running_sink(SmtpSink(data_replies=["451 4.3.0 Try again later"] * 2)) as sink:
        h = celery_server(start_server, sink, queue)
        workers = workers_for(h)
        workers.start()
        challenge = start_email_enrollment(h, "dee")
        sent = wait_for_status(h, "dee", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        assert sink.refused == 2 and len(sink.messages) == 1
        assert sent.delivery_attempts == 3
        assert sent.failure_reason == ""  # cleared once delivered


def test_permanent_smtp_failure_marks_the_delivery_failed(
    start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    with running_sink(SmtpSink(data_replies=["550 5.1.1 No such user"])) as sink:
        h = celery_server(start_server, sink, queue)
        workers_for(h).start()
        challenge = start_email_enrollment(h, "eli")
        failed = wait_for_status(h, "eli", challenge.challenge_id, common_pb2.DELIVERY_STATUS_FAILED)
        assert "550" in failed.failure_reason and failed.delivery_attempts == 1
        assert sink.messages == []


BROKER_TIMEOUT_SECONDS = 1.5


def test_a_frozen_broker_is_unavailable_within_one_broker_timeout(
    sink: SmtpSink, start_server: ServerFactory, queue: str, tmp_path: Path
) -> None:
    """A broker that takes connections and never answers (SIGSTOP: the kernel still accepts)
    costs a call that publishes a code one TWOFACTOR_BROKER_TIMEOUT_SECONDS, not two: the publish is not tried
    again on a new connection after a timeout, only after a dropped one."""
    with private_redis(tmp_path) as broker:
        h = celery_server(
            start_server,
            sink,
            queue,
            broker_url=broker.url,
            broker_timeout_seconds=BROKER_TIMEOUT_SECONDS,
            policy={"resend_cooldown_seconds": 0},
        )
        start_email_enrollment(h, "ivy")  # the handler thread's connection is made and kept
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                h.twofactor.StartEnrollment(  # a new code for the address, published as SendCode's
                    pb.StartEnrollmentRequest(user_id="ivy", method=EMAIL),
                    metadata=h.app_metadata,
                    timeout=30,
                )
            took = time.monotonic() - began
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(raised.value).reason == "BROKER_UNAVAILABLE"
    assert took < 1.8 * BROKER_TIMEOUT_SECONDS, f"{took:.1f} s: the publish waited out the timeout twice"


def test_a_broker_that_refuses_writes_is_one_line_with_redis_reply_and_what_to_do(
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis that answers PING but refuses writes (too few replicas, out of memory, a failed
    snapshot): PING answers, so the publish's WARNING is the first line the operator has. It
    says what Redis answered, where (no password) and what it means, not only an exception name."""
    with private_redis(tmp_path) as broker:
        url = broker.url.replace("redis://", "redis://:pw-in-url@")
        client = redis.Redis.from_url(broker.url)
        client.config_set("requirepass", "pw-in-url")
        client.close()
        h = celery_server(start_server, sink, queue, broker_url=url)
        admin = redis.Redis.from_url(url)
        admin.config_set("min-replicas-to-write", 1)  # no replica: every write is refused (NOREPLICAS)
        admin.close()
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="ned", email="ned@example.com"), metadata=h.app_metadata
        )
        with pytest.raises(grpc.RpcError) as raised:
            h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="ned", method=EMAIL), metadata=h.app_metadata
            )
    assert error_info(raised.value).reason == "BROKER_UNAVAILABLE"
    (said,) = [r.getMessage() for r in caplog.records if "could not queue" in r.getMessage()]
    assert "NOREPLICAS Not enough good replicas to write" in said, said
    assert f"redis://:****@127.0.0.1:{broker.port}/0" in said and "pw-in-url" not in said
    assert "BROKER_UNAVAILABLE" in said and "TWOFACTOR_BROKER_URL" in said
