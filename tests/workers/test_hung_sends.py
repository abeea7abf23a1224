"""A send that never returns (an operator's gateway that hangs) holds a worker's pool process only
until its claim's lease is over: Celery's hard time limit replaces the process, and the codes
behind it are delivered. A real `twofactor worker` with one pool process, Redis, PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness, ServerFactory
from tests.server.helpers import SMS
from tests.smtp_sink import SmtpSink
from tests.workers.celery_harness import Workers, celery_server, start_email_enrollment, wait_for_status


def test_a_hung_text_does_not_stop_the_emails_behind_it(
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    tmp_path: Path,
    workers_for: Callable[[Harness], Workers],
) -> None:
    h = celery_server(start_server, sink, queue, delivery_lease_seconds=2.0)
    texts = tmp_path / "texts.jsonl"
    texts.touch()
    workers = workers_for(h)
    workers.text_through("HangingSmsSender", texts)
    worker = workers.start(concurrency=1)
    h.twofactor.SetContact(pb.SetContactRequest(user_id="hal", phone="+14155550100"), metadata=h.app_metadata)
    h.twofactor.StartEnrollment(pb.StartEnrollmentRequest(user_id="hal", method=SMS), metadata=h.app_metadata)
    deadline = time.monotonic() + 60
    while not texts.read_text():  # the only pool process is now inside the hanging send
        assert worker.poll() is None and time.monotonic() < deadline, workers.logs()
        time.sleep(0.05)
    assert [json.loads(line)["to"] for line in texts.read_text().splitlines()] == ["+14155550100"]

    email = start_email_enrollment(h, "eve")
    sent = wait_for_status(h, "eve", email.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert sent.delivery_attempts == 1
    assert "Hard time limit (12.0s) exceeded" in workers.logs()
    assert worker.poll() is None  # the worker lives on; only its pool process was replaced
