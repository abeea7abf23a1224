"""Validating and masking the email addresses and mobile numbers codes go to."""

from __future__ import annotations

import re

# Deliberately simple: one @, no spaces, a dotted domain. Full RFC 5322 accepts
# addresses no mail relay will take; a typo is caught by the confirmation code.
_EMAIL = re.compile(
    r"^[^@\s<>()\[\],;:\"]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
# E.164: a plus, a country code not starting with 0, at most 15 digits in all.
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
MAX_EMAIL_BYTES = 254


def is_valid_email(address: str) -> bool:
    return len(address.encode()) <= MAX_EMAIL_BYTES and _EMAIL.match(address) is not None


def is_valid_phone(number: str) -> bool:
    return _E164.match(number) is not None


def mask_email(address: str) -> str:
    """a***@example.com"""
    if not address:
        return ""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def mask_phone(number: str) -> str:
    """+1******1234: the country code's first digit and the last four digits."""
    if not number:
        return ""
    return number[:2] + "*" * (len(number) - 6) + number[-4:]
