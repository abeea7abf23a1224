"""A real SMTP server (aiosmtpd) that records what it accepts, with scripted failures."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from twofactor_server.settings import SmtpSettings

CODE = re.compile(r"\b(\d{6,10})\b")


class SmtpSink:
    def __init__(self, *, data_replies: list[str] | None = None, hold_first_recipient: bool = False) -> None:
        self.messages: list[EmailMessage] = []
        self.data_replies = list(data_replies or [])  # answered to DATA, in order, before accepting
        self.refused = 0
        self.hold_first_recipient = hold_first_recipient
        self.recipient_held = threading.Event()  # set when the first RCPT is being held
        self.release = threading.Event()
        self._changed = threading.Condition()
        self.port = 0
        self.connections = 0  # SMTP connections accepted so far

    def connection_opened(self) -> None:
        with self._changed:
            self.connections += 1

    # aiosmtpd handler hooks
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self.hold_first_recipient and not self.recipient_held.is_set():
            self.recipient_held.set()
            # Hold the transaction open (bounded) while the test kills the sending worker.
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
            return "451 4.3.0 held transaction abandoned"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._changed:
            if self.data_replies:
                self.refused += 1
                self._changed.notify_all()
                return self.data_replies.pop(0)
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            self.messages.append(message)
            self._changed.notify_all()
        return "250 2.0.0 accepted"

    def wait_for_messages(self, count: int, timeout: float = 60) -> list[EmailMessage]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(
                    f"expected {count} message(s) within {timeout}s, got {len(self.messages)}"
                )
            return list(self.messages)

    def message_to(
        self, address: str, subject: str = "", *, after: int = 0, timeout: float = 60
    ) -> EmailMessage:
        """The first message from index `after` on to `address` whose subject contains `subject`."""

        def found() -> EmailMessage | None:
            return next(
                (
                    m
                    for m in self.messages[after:]
                    if address in (None, m["To"]) and subject in str(m["Subject"])
                ),
                None,
            )

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None, timeout):
                seen = [(m["To"], m["Subject"]) for m in self.messages[after:]]
                raise AssertionError(
                    f"no message to {address} about {subject!r} within {timeout}s; got {seen}"
                )
            message = found()
            assert message is not None
            return message

    def settings(self) -> SmtpSettings:
        return SmtpSettings(
            host="127.0.0.1",
            port=self.port,
            security="none",
            from_address="twofactor@example.com",
            timeout_seconds=30,
        )


def code_in(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    found = CODE.search(body.get_content())
    assert found, "no code in the message"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CountingController(Controller):
    """An aiosmtpd controller whose handler hears of every new connection (`connection_opened`)."""

    def factory(self) -> SMTP:
        return _CountingSMTP(self.handler, **self.SMTP_kwargs)


class _CountingSMTP(SMTP):
    def connection_made(self, transport: Any) -> None:
        self.event_handler.connection_opened()
        super().connection_made(transport)


@contextmanager
def running_sink(sink: SmtpSink) -> Iterator[SmtpSink]:
    sink.port = free_port()
    controller = CountingController(sink, hostname="127.0.0.1", port=sink.port)
    controller.start()
    with sink._changed:
        sink.connections = 0  # start() connected once itself, to see the server answer
    try:
        yield sink
    finally:
        sink.release.set()
        controller.stop()
