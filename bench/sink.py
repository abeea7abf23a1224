"""A local SMTP sink for the bench (aiosmtpd): when each message arrived, to whom, with which code,
and how many connections were opened."""

from __future__ import annotations

import email
import email.policy
import re
import socket
import threading
import time
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

CODE = re.compile(r"^\s*(\d{6,10})\s*$", re.MULTILINE)  # the code stands on a line of its own


class BenchSink:
    def __init__(self) -> None:
        self.arrivals: list[float] = []  # time.time() of each accepted message
        self.connections = 0
        self.codes: dict[str, str] = {}  # recipient -> the last code sent to it
        self.changed = threading.Condition()
        self.port = 0
        self._controller: Controller | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        found = _code_in(envelope.content if isinstance(envelope.content, bytes) else b"")
        with self.changed:
            self.arrivals.append(time.time())
            for rcpt in envelope.rcpt_tos:
                if found:
                    self.codes[rcpt] = found
            self.changed.notify_all()
        return "250 2.0.0 accepted"

    def wait_for(self, count: int, timeout: float) -> bool:
        """Whether `count` messages in all have arrived within `timeout` seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.arrivals) >= count, timeout)

    def start(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        sink = self

        class CountingController(Controller):
            def factory(self) -> SMTP:
                smtp = _CountingSMTP(self.handler, **self.SMTP_kwargs)
                smtp.sink = sink
                return smtp

        self._controller = CountingController(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()


def _code_in(content: bytes) -> str | None:
    """The code in the message's plain-text part (whatever its transfer encoding)."""
    message = email.message_from_bytes(content, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    found = CODE.search(body.get_content()) if body is not None else None
    return found.group(1) if found else None


class _CountingSMTP(SMTP):
    sink: BenchSink

    def connection_made(self, transport: Any) -> None:
        with self.sink.changed:
            self.sink.connections += 1
        super().connection_made(transport)
