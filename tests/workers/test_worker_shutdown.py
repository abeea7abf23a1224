"""SIGTERM to `twofactor worker` finishes the delivery in flight (Celery's warm shutdown), then exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

from aiosmtpd.smtp import SMTP, Envelope, Session
from twofactor.v1 import common_pb2

from tests.conftest import Harness, ServerFactory
from tests.smtp_sink import SmtpSink, running_sink
from tests.workers.celery_harness import (
    Workers,
    celery_server,
    start_email_enrollment,
    wait_for_status,
)


class SlowSink(SmtpSink):
    """Holds the first recipient until released, then accepts it: a slow relay, not a failing one."""

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if not self.recipient_held.is_set():
            self.recipient_held.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_sigterm_finishes_the_delivery_in_flight(
    start_server: ServerFactory,
    queue: str,
    workers_for: Callable[[Harness], Workers],
) -> None:
    with running_sink(SlowSink()) as sink:
        h = celery_server(start_server, sink, queue)
        workers = workers_for(h)
        worker = workers.start(concurrency=1)
        challenge = start_email_enrollment(h, "eve")
        assert sink.recipient_held.wait(90), "the worker never reached the SMTP server"
        worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "Warm shutdown" not in workers.logs():  # the worker has taken the signal
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.05)
        assert worker.poll() is None  # still running: the delivery is in flight
        sink.release.set()
        assert worker.wait(60) == 0
        sent = wait_for_status(h, "eve", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        assert sent.delivery_attempts == 1 and len(sink.messages) == 1
