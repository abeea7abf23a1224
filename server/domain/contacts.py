"""Validating and masking the email addresses and mobile numbers codes go to."""

from __future__ import annotations

import re
import unicodedata

import phonenumbers

# Deliberately simple: one @, no spaces, a dotted domain. Full RFC 5322 accepts
# addresses no mail relay will take; a typo is caught by the confirmation code.
_EMAIL = re.compile(
    r"^[^@\s<>()\[\],;:\"]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
# What a person writes around an international number: a plus, then digits grouped by
# spaces, dashes, dots or parentheses. The numbering plan itself is phonenumbers' to check.
_PHONE_CHARACTERS = re.compile(r"\+[0-9 ().-]{1,31}")
MAX_EMAIL_BYTES = 254


def has_hidden_characters(text: str) -> bool:
    """Whether `text` holds a character of Unicode's "other" categories: controls (C0 with NUL,
    DEL, C1), format characters (bidi overrides like U+202E, zero-width joiners), surrogates,
    private use and unassigned code points. None of them belongs in a name, an address or a
    key a person typed, they hide or reorder what a reader sees, and PostgreSQL refuses NUL."""
    return any(unicodedata.category(character).startswith("C") for character in text)


def is_valid_email(address: str) -> bool:
    if has_hidden_characters(address):
        return False
    return len(address.encode()) <= MAX_EMAIL_BYTES and _EMAIL.fullmatch(address) is not None


def normalized_phone(number: str) -> str | None:
    """The E.164 form (+14155550123) of a number valid in its country's numbering plan, written
    with its country code and optionally grouped (+1 415-555-0123); None for anything else."""
    if has_hidden_characters(number) or _PHONE_CHARACTERS.fullmatch(number) is None:
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


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
