"""Redis killed under a worker that is busy: the worker rides it out (it reconnects, it does not
exit) and every code acknowledged before, during and after the outage is delivered, once.
The broker is a private redis-server: the shared one is never stopped."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness, ServerFactory
from tests.server.helpers import EMAIL
from tests.smtp_sink import SmtpSink, running_sink
from tests.workers.celery_harness import (
    Workers,
    celery_server,
    challenge_status,
    private_redis,
    register,
    start_email_enrollment,
    wait_for_status,
)

SENT = common_pb2.DELIVERY_STATUS_SENT


def _flood(
    h: Harness,
    prefix: str,
    stop: threading.Event,
    acknowledged: list[tuple[str, str]],
    unanswered: list[str] | None = None,
) -> None:
    """An email enrollment for one new user after another until `stop`: a code each, none replaced.
    A call the client gave up on (its 10 s deadline, on a loaded machine) may have committed a
    code the server then sends: its user goes to `unanswered`, whose codes may arrive, once."""
    for n in itertools.count():
        if stop.is_set():
            return
        user_id = f"{prefix}-{n}"
        try:
            register(h, user_id)
            challenge = h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id=user_id, method=EMAIL), metadata=h.app_metadata, timeout=10
            ).challenge
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and unanswered is not None:
                unanswered.append(user_id)
                continue
            assert code == grpc.StatusCode.UNAVAILABLE, error  # BROKER_UNAVAILABLE
        else:
            acknowledged.append((user_id, challenge.challenge_id))


def test_redis_killed_during_a_flood_leaves_the_worker_running_and_loses_no_code(
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    tmp_path: Path,
    workers_for: Callable[[Harness], Workers],
) -> None:
    with private_redis(tmp_path) as broker:
        h = celery_server(start_server, sink, queue, broker_url=broker.url)
        workers = workers_for(h)
        worker = workers.start(2)
        acknowledged: list[tuple[str, str]] = []
        unanswered: list[str] = []
        stop = threading.Event()
        floods = [
            threading.Thread(target=_flood, args=(h, f"t{n}", stop, acknowledged, unanswered))
            for n in range(6)
        ]
        for flood in floods:
            flood.start()
        try:
            sink.wait_for_messages(20, timeout=60)  # the worker is busy delivering
            broker.stop()
            deadline = time.monotonic() + 30
            while "Connection to broker lost" not in workers.logs():
                assert time.monotonic() < deadline, workers.logs()[-3000:]
                time.sleep(0.05)
            broker.start()
            count = len(sink.messages)
            deadline = time.monotonic() + 60
            while len(sink.messages) < count + 10:  # delivering again after the outage
                assert worker.poll() is None, f"the worker exited:\n{workers.logs()[-3000:]}"
                assert time.monotonic() < deadline, workers.logs()[-3000:]
                time.sleep(0.05)
        finally:
            stop.set()
            for flood in floods:
                flood.join(timeout=30)
        assert worker.poll() is None
        assert "Unrecoverable error" not in workers.logs()
        # Nor Celery's ten-line warning of a default that changes in Celery 6 (kept on purpose).
        assert "CPendingDeprecationWarning" not in workers.logs()

        deadline = time.monotonic() + 90
        for user, challenge_id in acknowledged:
            while (status := challenge_status(h, user, challenge_id).delivery_status) != SENT:
                assert time.monotonic() < deadline, (challenge_id, common_pb2.DeliveryStatus.Name(status))
                time.sleep(0.1)
        sent = [str(m["Message-ID"]).strip("<>").split("@")[0] for m in sink.messages]
        assert len(sent) == len(set(sent))  # none twice
        codes = {challenge_id for _, challenge_id in acknowledged}
        assert codes <= set(sent)
        # Any other message is the code of a call the client gave up on; never a refused one's.
        others = {
            str(m["To"])
            for m, challenge_id in zip(sink.messages, sent, strict=True)
            if challenge_id not in codes
        }
        assert others <= {f"{user}@example.com" for user in unanswered}, others


def test_a_retry_redis_cant_take_is_one_line_and_recovery_delivers_it(
    start_server: ServerFactory, queue: str, tmp_path: Path, workers_for: Callable[[Harness], Workers]
) -> None:
    """A delivery whose attempt failed (the relay's 451) while Redis was down: its retry can't be
    queued. The worker says so in one line, with what recovers it, not Celery's page of
    traceback; outbox recovery publishes it again once Redis is back, and it is delivered."""
    with (
        private_redis(tmp_path) as broker,
        running_sink(SmtpSink(hold_first_recipient=True)) as sink,
    ):
        h = celery_server(start_server, sink, queue, broker_url=broker.url)
        workers = workers_for(h)
        worker = workers.start()
        challenge = start_email_enrollment(h, "ann")
        assert sink.recipient_held.wait(60)  # the worker is in the middle of sending
        broker.stop()
        sink.release.set()  # the relay answers 451: a retry, which Redis can't take
        deadline = time.monotonic() + 60
        while "its retry could not be queued" not in workers.logs():
            assert time.monotonic() < deadline, workers.logs()[-5000:]
            time.sleep(0.05)
        broker.start()
        sent = wait_for_status(h, "ann", challenge.challenge_id, SENT)
        assert sent.delivery_attempts == 2
        assert worker.poll() is None
    assert len(sink.messages) == 1
    lines = [line for line in workers.logs().splitlines() if "its retry could not be queued" in line]
    assert len(lines) == 1 and "outbox recovery" in lines[0], lines
    assert "Traceback" not in workers.logs()
