"""Development delivery: print messages to a stream instead of sending them.

This is the embedded default so a developer sees codes without an SMTP relay or
an SMS account. It writes to a stream, never to `logging`: codes must not reach
log files or log shippers, and the banner makes the output unmistakable.
"""

from __future__ import annotations

import sys
import threading
import uuid
from typing import TextIO

from twofactor_server.delivery.providers.base import EmailMessage, SmsMessage

# One lock for every console sender: email and SMS share standard output.
_WRITE_LOCK = threading.Lock()
_BANNER = "=" * 20 + " twofactor: development-only delivery ({kind}), not sent " + "=" * 20


class _ConsoleWriter:
    def __init__(self, stream: TextIO | None) -> None:
        # None resolves sys.stdout at write time, so a redirected stdout is honoured.
        self._stream = stream

    def write(self, kind: str, fields: list[tuple[str, str]], body: str) -> str:
        message_id = f"console-{uuid.uuid4().hex}"
        banner = _BANNER.format(kind=kind)
        lines = [banner, f"Message-ID: {message_id}"]
        lines += [f"{name}: {value}" for name, value in fields]
        lines += ["", body.rstrip("\n"), "=" * len(banner), ""]
        stream = self._stream if self._stream is not None else sys.stdout
        with _WRITE_LOCK:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        return message_id


class ConsoleEmailSender:
    """Writes the plain-text part of each email to `stream` (default: standard output)."""

    provider_name = "console"  # the `provider` label of twofactor_deliveries_total

    def __init__(self, stream: TextIO | None = None) -> None:
        self._writer = _ConsoleWriter(stream)

    def send_email(self, message: EmailMessage) -> str:
        return self._writer.write("email", [("To", message.to), ("Subject", message.subject)], message.text)


class ConsoleSmsSender:
    """Writes each SMS to `stream` (default: standard output)."""

    provider_name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._writer = _ConsoleWriter(stream)

    def send_sms(self, message: SmsMessage) -> str:
        return self._writer.write("sms", [("To", message.to)], message.text)
