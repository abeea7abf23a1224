"""The worker stops taking delivery tasks while its storage is down and takes them again when it
answers (a private PostgreSQL cluster, stopped and started; the shared one is never touched)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from twofactor.v1 import common_pb2

from tests.conftest import REDIS_URL, ServerFactory
from tests.private_postgres import PrivatePostgres
from tests.server.helpers import wait_until
from tests.smtp_sink import SmtpSink, code_in
from tests.workers.celery_harness import (
    Workers,
    celery_server,
    messages_left,
    start_email_enrollment,
    wait_for_status,
)
from tests.workers.test_outbox_recovery import private_database, wait_for_log
from twofactor_server.delivery.dispatch import CeleryDispatcher

__all__ = ["private_database"]  # a fixture, used by name below

PAUSED = r"storage unavailable: not taking delivery tasks from \S+ until it answers"
RESUMED = r"storage answers again: taking delivery tasks from \S+"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # the private cluster, not a shared schema
def test_the_worker_takes_no_task_while_its_storage_is_down(
    private_database: PrivatePostgres,
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    workers_for: Callable[..., Workers],
) -> None:
    database = private_database
    h = celery_server(start_server, sink, queue, database_url=database.url)
    workers = workers_for(h)
    workers.env.update({"TWOFACTOR_STORAGE_PROBE_SECONDS": "0.2", "TWOFACTOR_STORAGE_TIMEOUT_SECONDS": "1"})
    workers.start()
    challenge = start_email_enrollment(h, "ivy")
    assert code_in(sink.wait_for_messages(1, timeout=90)[0])  # it takes tasks while storage answers
    # Recorded and acknowledged before the outage: the queue then holds only what comes during it
    # (a send recorded in the outage's first instant keeps its message unacknowledged meanwhile).
    wait_for_status(h, "ivy", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    wait_until(
        lambda: messages_left(REDIS_URL, queue) == 0,
        "the delivered task was never acknowledged",
        bound=90,
        interval=0.1,
    )

    database.stop()
    wait_for_log(workers, PAUSED)
    publisher = CeleryDispatcher(h.settings)
    try:
        publisher.dispatch("0" * 32, 0)  # a task arrives during the outage
    finally:
        publisher.close()
    wait_until(
        lambda: messages_left(REDIS_URL, queue) == 1,
        lambda: (
            f"the message never reached the queue ({messages_left(REDIS_URL, queue)} messages); "
            f"worker logs:\n{workers.logs()[-4000:]}"
        ),
        bound=90,
        interval=0.1,
    )
    # Several probe periods later it is still waiting in the broker, not taken and retried.
    watched_until = time.monotonic() + 3
    while time.monotonic() < watched_until:
        assert messages_left(REDIS_URL, queue) == 1, "a worker took a task while its storage was down"
        time.sleep(0.1)

    database.start()
    wait_for_log(workers, RESUMED)
    wait_until(
        lambda: messages_left(REDIS_URL, queue) == 0,
        "the waiting task was never taken",
        bound=90,
        interval=0.1,
    )
    assert "Traceback" not in workers.logs()
