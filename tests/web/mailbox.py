"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it is sent, for the site's email codes.

Its own small sink rather than tests/smtp_sink.py, which builds the server's
SMTP settings: the web tests reach the twofactor server only through its
command line and gRPC.
"""

from __future__ import annotations

import email
import email.policy
import re
import threading
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

CODE = re.compile(r"\b(\d{6,10})\b")


class Mailbox:
    def __init__(self, port: int) -> None:
        self.port = port
        self._messages: list[EmailMessage] = []
        self._changed = threading.Condition()
        self._controller = Controller(self, hostname="127.0.0.1", port=port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()
        return "250 2.0.0 accepted"

    def count(self) -> int:
        with self._changed:
            return len(self._messages)

    def code_sent_to(self, address: str, *, after: int, timeout: float = 30) -> str:
        """The code in the first message to `address` among those received after the first `after`."""

        def arrived() -> EmailMessage | None:
            # A code, not a notice of a change (those carry no code).
            return next((m for m in self._messages[after:] if address in str(m["To"]) and has_code(m)), None)

        with self._changed:
            message = self._changed.wait_for(arrived, timeout)
        if message is None:
            raise AssertionError(f"no message to {address} within {timeout}s")
        body = message.get_body(preferencelist=("plain",))
        assert body is not None
        found = CODE.search(body.get_content())
        assert found, f"no code in the message to {address}"
        return found.group(1)


def has_code(message: EmailMessage) -> bool:
    body = message.get_body(preferencelist=("plain",))
    return body is not None and CODE.search(body.get_content()) is not None
