"""RFC 6238 time-based one-time passwords, as Google Authenticator reads them:
HMAC-SHA1, 6 digits, 30-second steps, a base32 secret without padding."""

from __future__ import annotations

import base64
import hmac
import secrets

import pyotp
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.hmac import HMAC

SECRET_BYTES = 20  # 160 bits, RFC 4226 §4's recommendation
STEP_SECONDS = 30
DIGITS = 6
ACCEPTED_DRIFT_STEPS = 1  # the current step, one before and one after
_SHA1 = SHA1()  # noqa: S303 - HOTP is HMAC-SHA1 (RFC 4226), what authenticator apps compute


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def to_base32(secret: bytes) -> str:
    return base64.b32encode(secret).decode().rstrip("=")


def time_step(unix_time: float) -> int:
    return int(unix_time // STEP_SECONDS)


def code_at_step(secret: bytes, step: int, digits: int = DIGITS) -> str:
    """RFC 4226 HOTP of the step: HMAC-SHA1, dynamic truncation, `digits` decimal digits."""
    return _code(_keyed(secret), step, digits)


def matching_step(secret: bytes, code: str, unix_time: float) -> int | None:
    """The time step whose code equals `code`, within the accepted drift, or None."""
    now = time_step(unix_time)
    keyed = _keyed(secret)  # the key's HMAC pads, computed once for every candidate step
    typed = code.encode()
    found = None
    # Compare every candidate in constant time; no early exit on the first match.
    for step in range(max(now - ACCEPTED_DRIFT_STEPS, 0), now + ACCEPTED_DRIFT_STEPS + 1):
        if hmac.compare_digest(_code(keyed, step, DIGITS).encode(), typed):
            found = step
    return found


def _keyed(secret: bytes) -> HMAC:
    _refuse_weak(secret)
    return HMAC(secret, _SHA1)


def _code(keyed: HMAC, step: int, digits: int) -> str:
    if step < 0:
        raise ValueError("time steps start at 0")
    # From a copy of the keyed state: the key's pads are hashed once per check, not per step.
    mac = keyed.copy()
    mac.update(step.to_bytes(8, "big"))
    digest = mac.finalize()
    offset = digest[-1] & 0x0F
    number = int.from_bytes(digest[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(number % 10**digits).zfill(digits)


def from_base32(text: str) -> bytes:
    """The secret an app was given as base32 text (spaces and case as people type them)."""
    cleaned = "".join(text.split()).upper()
    return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))


def provisioning_uri(secret: bytes, *, account_name: str, issuer: str) -> str:
    """otpauth://totp/Issuer:account?secret=...&issuer=Issuer (Key Uri Format)."""
    return pyotp.TOTP(to_base32(secret), digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account_name, issuer_name=issuer
    )


def _refuse_weak(secret: bytes) -> None:
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"TOTP secrets must be at least {SECRET_BYTES * 8} bits")
