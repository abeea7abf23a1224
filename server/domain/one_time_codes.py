"""Numeric one-time codes sent by email or SMS."""

from __future__ import annotations

import secrets

MIN_LENGTH = 6
MAX_LENGTH = 10


def new_code(length: int) -> str:
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"one-time codes have {MIN_LENGTH} to {MAX_LENGTH} digits")
    # One draw for the whole code, zero-padded: uniform over the 10**length codes, as a digit
    # drawn at a time is, for one urandom read instead of one per digit.
    return str(secrets.randbelow(10**length)).zfill(length)


def normalize(typed: str) -> str | None:
    """The digits of a typed code (spaces ignored); None when it isn't 6 to 10 digits."""
    digits = typed.replace(" ", "")
    if not (MIN_LENGTH <= len(digits) <= MAX_LENGTH) or not digits.isascii() or not digits.isdigit():
        return None
    return digits
