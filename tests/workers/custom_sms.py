"""Custom SMS provider classes loaded by dotted path in tests/workers/test_sms_loading.py and
by the `twofactor worker` processes of tests/workers/test_provider_ids.py."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from twofactor_server.delivery.providers import SmsMessage


class RecordingSmsSender:
    """What an operator's own gateway class looks like: no-argument constructor, send_sms."""

    def __init__(self) -> None:
        self.sent: list[SmsMessage] = []

    def send_sms(self, message: SmsMessage) -> str:
        self.sent.append(message)
        return f"recorded-{len(self.sent)}"

    class Nested:
        def send_sms(self, message: SmsMessage) -> str:
            return "nested"


class NoSendMethod:
    def send(self, message: SmsMessage) -> str:
        return "wrong name"


class SendSmsNotCallable:
    send_sms = "not a method"


class BrokenConstructor:
    def __init__(self) -> None:
        raise RuntimeError("gateway token missing")

    def send_sms(self, message: SmsMessage) -> str:
        return "never"


NOT_A_CLASS = 42


class UuidIdSmsSender:
    """An operator's class that returns its gateway SDK's uuid.UUID as the message id, not a str.

    Each text is appended to the file named by TEST_SMS_LOG (one JSON line: to, id), so a test
    can count what a worker process sent."""

    def __init__(self) -> None:
        self.log = Path(os.environ["TEST_SMS_LOG"])

    def send_sms(self, message: SmsMessage) -> uuid.UUID:
        message_id = uuid.uuid4()
        with self.log.open("a") as log:
            log.write(json.dumps({"to": message.to, "id": str(message_id)}) + "\n")
        return message_id


class HangingSmsSender:
    """A gateway that never answers: each send notes its number in TEST_SMS_LOG, then waits
    (bounded, so a test that fails leaves no process behind for long)."""

    def __init__(self) -> None:
        self.log = Path(os.environ["TEST_SMS_LOG"])

    def send_sms(self, message: SmsMessage) -> str:
        with self.log.open("a") as log:
            log.write(json.dumps({"to": message.to}) + "\n")
        time.sleep(300)
        return "too late"
