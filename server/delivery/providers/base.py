"""The delivery interface: messages, sender protocols and the errors a task acts on.

A sender either returns the provider's message id or raises a DeliveryError
subclass; the delivery task retries only TransientDeliveryError. Whatever a
sender returns as its id goes through provider_message_id_text before it is
stored: an operator's class may hand back its SDK's UUID, bytes or dict.
"""

from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class DeliveryError(Exception):
    """Delivery failed. `reason` is short, human-readable and never contains the code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientDeliveryError(DeliveryError):
    """Worth retrying: the relay or provider is busy, unreachable or timed out."""


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help: the destination is refused or our credentials are wrong."""


class ProviderConfigError(Exception):
    """The provider configuration is unusable; the server and worker refuse to start."""


@dataclass(frozen=True)
class EmailMessage:
    to: str
    subject: str
    text: str
    html: str
    # Stable across retries and duplicates (the challenge id): the Message-ID is derived from it,
    # so a message sent twice (delivery is at-least-once) carries one Message-ID.
    message_key: str = ""
    # Who the reader sees it from (the issuer) when TWOFACTOR_SMTP_FROM names no display name.
    sender_name: str = ""


@dataclass(frozen=True)
class SmsMessage:
    to: str  # E.164, e.g. +14155550123
    text: str


@runtime_checkable
class EmailSender(Protocol):
    def send_email(self, message: EmailMessage) -> str:
        """Deliver the message; return the provider's message id."""
        ...


@runtime_checkable
class SmsSender(Protocol):
    def send_sms(self, message: SmsMessage) -> str:
        """Deliver the message; return the provider's message id."""
        ...


def shorten(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters, for error reasons built from server replies."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# challenges.provider_message_id is TEXT (no length limit) and GetChallenge returns it: real ids
# are tens of characters (SNS: 36), so a bound keeps a faulty sender's return value small.
PROVIDER_MESSAGE_ID_MAX_CHARS = 256
# Control (NUL: PostgreSQL refuses it in text), format (bidirectional overrides) and surrogate
# (not encodable as UTF-8) characters: none belongs in an id, a log line or a database row.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


def provider_message_id_text(returned: object) -> str:
    """The id a sender returned, as text every storage takes: "" for None or empty; bytes decoded
    as UTF-8 (invalid bytes replaced); anything else str(); unsafe characters removed, at most
    PROVIDER_MESSAGE_ID_MAX_CHARS. Never raises: the message has already gone out."""
    if returned is None:
        return ""
    try:
        if isinstance(returned, bytes | bytearray | memoryview):
            text = bytes(returned).decode("utf-8", errors="replace")
        else:
            text = str(returned)
        kept = (c for c in text if unicodedata.category(c) not in _UNSAFE_CATEGORIES)
        return "".join(itertools.islice(kept, PROVIDER_MESSAGE_ID_MAX_CHARS)).strip()
    except Exception:  # a __str__ that raises, or returns no str
        return ""
