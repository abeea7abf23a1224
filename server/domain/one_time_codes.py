"""Numeric one-time codes sent by email or SMS."""

from __future__ import annotations

import secrets

MIN_LENGTH = 6
MAX_LENGTH = 10


def new_code(length: int) -> str:
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"one-time codes have {MIN_LENGTH} to {MAX_LENGTH} digits")
    return "".join(secrets.choice("0123456789") for _ in range(length))


def normalize(typed: str) -> str | None:
    """The digits of a typed code (spaces ignored); None when it isn't 6 to 10 digits."""
    digits = typed.replace(" ", "")
    if not (MIN_LENGTH <= len(digits) <= MAX_LENGTH) or not digits.isascii() or not digits.isdigit():
        return None
    return digits
