"""twofactor_outbox_oldest_queued_seconds on the server's own /metrics when delivery goes through a
broker: the server reports the backlog itself, so "deliveries are stuck" fires even when no worker
runs (the workers, which run recovery, were the only ones to set it: the server's gauge read 0)."""

from __future__ import annotations

import time
from collections.abc import Callable

from twofactor.v1 import common_pb2

from tests.conftest import Harness, ServerFactory
from tests.server.test_metrics import scrape, value
from tests.smtp_sink import SmtpSink
from tests.workers.celery_harness import Workers, celery_server, challenge_status, start_email_enrollment

GAUGE = "twofactor_outbox_oldest_queued_seconds"
WAIT_LIMIT = 30.0  # seconds; every wait below is for a condition, bounded by this


def wait_for_gauge(h: Harness, condition: Callable[[float], bool], what: str) -> float:
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        seconds = value(scrape(h), GAUGE)
        if condition(seconds):
            return seconds
        if time.monotonic() > deadline:
            raise AssertionError(f"{GAUGE} never {what}: {seconds}")
        time.sleep(0.05)  # polling a condition


def test_the_server_reports_a_backlog_no_worker_takes_and_its_end(
    start_server: ServerFactory,
    sink: SmtpSink,
    queue: str,
    workers_for: Callable[[Harness], Workers],
) -> None:
    h = celery_server(start_server, sink, queue, metrics_listen="127.0.0.1:0", outbox_recovery_seconds=0.4)
    sent = start_email_enrollment(h, "gia")  # in the queue; no worker runs
    waited = wait_for_gauge(h, lambda s: s >= 1.0, "showed the code waiting")
    assert waited < WAIT_LIMIT + 5

    workers_for(h).start()
    deadline = time.monotonic() + WAIT_LIMIT
    while challenge_status(h, "gia", sent.challenge_id).delivery_status != common_pb2.DELIVERY_STATUS_SENT:
        assert time.monotonic() < deadline, "the worker never delivered the code"
        time.sleep(0.05)  # polling a condition
    wait_for_gauge(h, lambda s: s == 0.0, "went back to 0 once nothing waited")
