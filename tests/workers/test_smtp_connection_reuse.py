"""A worker keeps its SMTP connection open between messages (issue 13: delivery at fleet speed)."""

from __future__ import annotations

from collections.abc import Callable

from twofactor.v1 import common_pb2

from tests.conftest import Harness, ServerFactory
from tests.smtp_sink import SmtpSink
from tests.workers.celery_harness import Workers, celery_server, start_email_enrollment, wait_for_status


def test_one_worker_sends_many_emails_over_one_connection(
    sink: SmtpSink, start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    h = celery_server(start_server, sink, queue)
    users = [f"user{i}" for i in range(8)]
    # Queued before the worker starts, so it takes them one after another.
    challenges = {user: start_email_enrollment(h, user) for user in users}

    workers = workers_for(h)
    workers.start(concurrency=1)
    messages = sink.wait_for_messages(len(users))

    assert sorted(str(m["To"]) for m in messages) == sorted(f"{u}@example.com" for u in users)
    for user, challenge in challenges.items():
        wait_for_status(h, user, challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    # One pool process, one kept session: one connection for all the messages, not one each.
    assert sink.connections == 1, f"{sink.connections} SMTP connections for {len(users)} messages"
    assert "Traceback" not in workers.logs()
