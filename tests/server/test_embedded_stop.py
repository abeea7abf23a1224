"""Stopping the embedded server (in-process delivery) takes one provider timeout, not the backlog.

With a relay that accepts connections and never answers, each attempt lasts the SMTP timeout.
A stop used to wait for every queued delivery in turn (the backlog divided by the delivery
threads, times the timeout): a supervisor then killed the children as hung. The deliveries
that had not started stay queued in the outbox, for recovery at the next start.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Clock, started_harness
from tests.server.helpers import EMAIL
from tests.server.stored_rows import query
from twofactor_server.settings import Settings, SmtpSettings

SMTP_TIMEOUT_SECONDS = 1.0
DELIVERY_THREADS = 4  # InProcessDispatcher's
BACKLOG = 10 * DELIVERY_THREADS  # ten timeouts in turn, had the stop waited for each


@contextmanager
def silent_relay() -> Iterator[int]:
    """A port that accepts SMTP connections and never says a word (a relay that hangs)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stopping.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stopping.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


def test_a_stop_with_a_backlog_for_a_hung_relay_takes_one_timeout_and_keeps_the_backlog(
    settings: Settings, clock: Clock
) -> None:
    with silent_relay() as port:
        relay = SmtpSettings(
            host="127.0.0.1", port=port, security="none", timeout_seconds=SMTP_TIMEOUT_SECONDS
        )
        h = started_harness(replace(settings, email_provider="smtp", smtp=relay), clock)
        try:
            for n in range(BACKLOG):
                user_id = f"u{n}"
                h.twofactor.SetContact(
                    pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com"),
                    metadata=h.app_metadata,
                )
                h.twofactor.StartEnrollment(
                    pb.StartEnrollmentRequest(user_id=user_id, method=EMAIL), metadata=h.app_metadata
                )
        finally:
            h.channel.close()
            began = time.monotonic()
            h.server.stop(grace=0.5)
            took = time.monotonic() - began
    # One timeout for the attempts under way (and the grace); ten had it waited for the backlog.
    assert took < 5 * SMTP_TIMEOUT_SECONDS, f"the stop took {took:.1f} s"
    rows = query(settings, "SELECT delivery_status FROM challenges")
    assert len(rows) == BACKLOG
    assert {row["delivery_status"] for row in rows} <= {"queued", "sending"}  # none lost, none failed
    assert sum(row["delivery_status"] == "queued" for row in rows) >= BACKLOG - 2 * DELIVERY_THREADS
