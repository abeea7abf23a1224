"""Validating and masking the email addresses and mobile numbers codes go to."""

from __future__ import annotations

import re
import unicodedata

import phonenumbers

# One @, a dot-atom local part, a dotted ASCII domain. Full RFC 5322 accepts addresses no mail
# relay will take (quoted strings, comments); a typo is caught by the confirmation code.
# RFC 5322 atext, the characters of a dot-atom's atoms; RFC 6532 adds every non-ASCII character,
# of which only letters, combining marks and decimal digits are taken (_LOCAL_PART_CATEGORIES):
# a name in any script, not a full-width "@" or "<".
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LOCAL_PART_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd"})
# LDH labels in lower case (matched after normalized_email lowers the address).
_DOMAIN = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+", re.ASCII
)
# What a person writes around an international number: a plus, then digits grouped by
# spaces, dashes, dots or parentheses. The numbering plan itself is phonenumbers' to check.
_PHONE_CHARACTERS = re.compile(r"\+[0-9 ().-]{1,31}")
MAX_LOCAL_PART_BYTES = 64  # RFC 5321: octets, UTF-8 ones for an RFC 6531 address
MAX_EMAIL_BYTES = 254
# The number types a code may be texted to. A landline, toll-free, premium-rate, shared-cost,
# UAN, voicemail, pager or personal (forwarding) number either can't receive a text or costs
# someone per message: premium and shared-cost numbers are how SMS pumping fraud is paid.
# The US and Canada don't split mobile from fixed numbers: their plan says FIXED_LINE_OR_MOBILE.
_TEXTABLE = frozenset(
    {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}
)


def has_hidden_characters(text: str) -> bool:
    """Whether `text` holds a character of Unicode's "other" categories: controls (C0 with NUL,
    DEL, C1), format characters (bidi overrides like U+202E, zero-width joiners), surrogates,
    private use and unassigned code points. None of them belongs in a name, an address or a
    key a person typed, they hide or reorder what a reader sees, and PostgreSQL refuses NUL."""
    return any(unicodedata.category(character).startswith("C") for character in text)


def normalized_email(address: str) -> str | None:
    """The form an address is stored, sent to and counted under (the per-destination send limit
    compares stored strings): Unicode NFC, then lower case. None for anything but a plain
    local@domain address (is_valid_email).

    Lower case, the local part too: RFC 5321 lets a mailbox's local part be case-sensitive, but
    the providers people use ignore case, so Victim@Example.com and victim@example.com are one
    mailbox and must be one destination, or a case change gets a fresh send budget. Folding
    here, once, keeps the comparison a plain string equality on both stores (SQLite's lower()
    folds ASCII only, PostgreSQL's follows the database's locale). The domain is ASCII (LDH
    labels; an internationalized domain comes in its xn-- form), so lower() is exact there; for
    a non-ASCII local part lower() rather than casefold(): casefold rewrites letters (ß to ss)
    into another string, not another case of the same one.
    """
    if has_hidden_characters(address):
        return None
    # NFC: one string for the same letters, however typed (á precomposed or a + U+0301).
    normalized = unicodedata.normalize("NFC", unicodedata.normalize("NFC", address).lower())
    local, at, domain = normalized.rpartition("@")
    if not (
        at
        and len(normalized.encode()) <= MAX_EMAIL_BYTES
        and _is_dot_atom(local)
        and _DOMAIN.fullmatch(domain)
    ):
        return None
    return normalized


def is_valid_email(address: str) -> bool:
    return normalized_email(address) is not None


def _is_dot_atom(local: str) -> bool:
    """RFC 5322 dot-atom text: no quoted string (a quoted local part can hold "@", "<" or ","),
    no leading, trailing or double dot; and no "=?": the email package reads an atom that
    starts an RFC 2047 encoded word (=?utf-8?q?...?=) as one and decodes it, so the message
    would go to another address than the one stored and shown."""
    if not 0 < len(local.encode()) <= MAX_LOCAL_PART_BYTES or "=?" in local:
        return False
    return all(
        atom and all(character in _ATEXT or _is_non_ascii_letter(character) for character in atom)
        for atom in local.split(".")
    )


def _is_non_ascii_letter(character: str) -> bool:
    """A letter, combining mark (accents, vowel signs of Indic scripts) or decimal digit of any
    script beyond ASCII: RFC 6532 internationalized local parts (ána@, 東京@)."""
    return not character.isascii() and unicodedata.category(character) in _LOCAL_PART_CATEGORIES


def normalized_phone(number: str) -> str | None:
    """The E.164 form (+14155550123) of a mobile number valid in its country's numbering plan,
    written with its country code and optionally grouped (+1 415-555-0123); None for anything
    else, a number of another type (_TEXTABLE) included."""
    if has_hidden_characters(number) or _PHONE_CHARACTERS.fullmatch(number) is None:
        return None
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed) or phonenumbers.number_type(parsed) not in _TEXTABLE:
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def mask_email(address: str) -> str:
    """a***@example.com"""
    if not address:
        return ""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


def mask_phone(number: str) -> str:
    """+1******1234: the country code's first digit and the last four digits; of a short national
    number (a plan of 4 or 5 digits, as Tokelau's or the Falklands'), at most half of them."""
    if not number:
        return ""
    shown = 4
    try:
        national = phonenumbers.national_significant_number(phonenumbers.parse(number, None))
        shown = max(1, min(4, len(national) // 2))
    except phonenumbers.NumberParseException:
        pass
    return number[:2] + "*" * max(0, len(number) - 2 - shown) + number[-shown:]
