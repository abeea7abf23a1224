"""Custom SMS provider classes loaded by dotted path in tests/workers/test_sms_loading.py."""

from __future__ import annotations

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
