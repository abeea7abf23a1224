"""RFC 6238 time-based one-time passwords, as Google Authenticator reads them:
HMAC-SHA1, 6 digits, 30-second steps, a base32 secret without padding."""

from __future__ import annotations

import base64
import hmac
import secrets
import struct
from typing import TYPE_CHECKING

import pyotp

try:
    # CPython's own SHA-1, which hashlib falls back to. Copying and finishing its state costs
    # a third of what OpenSSL 3's does: its EVP layer allocates and cleans a context per copy.
    # SHA-1 runs in time independent of its input either way.
    from _sha1 import sha1 as _sha1  # type: ignore[import-not-found]  # no stub: CPython's own module
except ImportError:  # an interpreter built without it
    from hashlib import sha1 as _sha1

if TYPE_CHECKING:
    from hashlib import _Hash

SECRET_BYTES = 20  # 160 bits, RFC 4226 §4's recommendation
STEP_SECONDS = 30
DIGITS = 6
ACCEPTED_DRIFT_STEPS = 1  # the current step, one before and one after
_BLOCK_BYTES = 64  # SHA-1's block, the length of HMAC's pads (RFC 2104)
# ipad and opad as integers: the key is XORed with them as one integer, not byte by byte
# through a lookup table (bytes.translate), whose cache lines would depend on the secret.
_INNER_PAD = int.from_bytes(b"\x36" * _BLOCK_BYTES, "big")
_OUTER_PAD = int.from_bytes(b"\x5c" * _BLOCK_BYTES, "big")
_STEP = struct.Struct(">Q")
_TRUNCATED = struct.Struct(">I")
_MODULUS = 10**DIGITS
_CODE_FORMAT = b"%%0%dd" % DIGITS  # b"%06d": the code's digits, zero-padded


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def to_base32(secret: bytes) -> str:
    return base64.b32encode(secret).decode().rstrip("=")


def time_step(unix_time: float) -> int:
    return int(unix_time // STEP_SECONDS)


def code_at_step(secret: bytes, step: int, digits: int = DIGITS) -> str:
    """RFC 4226 HOTP of the step: HMAC-SHA1, dynamic truncation, `digits` decimal digits."""
    if step < 0:
        raise ValueError("time steps start at 0")
    inner, outer = _keyed(secret)
    return str(_truncated(inner, outer, step) % 10**digits).zfill(digits)


def matching_step(secret: bytes, code: str, unix_time: float) -> int | None:
    """The time step whose code equals `code`, within the accepted drift, or None."""
    now = time_step(unix_time)
    inner, outer = _keyed(secret)  # the key's HMAC pads, hashed once for every candidate step
    typed = code.encode()
    found = None
    # Compare every candidate in constant time; no early exit on the first match: a locked
    # user's guesses must not take less time when right.
    for step in range(max(now - ACCEPTED_DRIFT_STEPS, 0), now + ACCEPTED_DRIFT_STEPS + 1):
        if hmac.compare_digest(_CODE_FORMAT % (_truncated(inner, outer, step) % _MODULUS), typed):
            found = step
    return found


def _keyed(secret: bytes) -> tuple[_Hash, _Hash]:
    """HMAC-SHA1's inner and outer states with the key's pads hashed (RFC 2104)."""
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"TOTP secrets must be at least {SECRET_BYTES * 8} bits")
    key = secret if len(secret) <= _BLOCK_BYTES else _sha1(secret).digest()  # noqa: S324 - see _sha1
    padded = int.from_bytes(key.ljust(_BLOCK_BYTES, b"\0"), "big")
    inner = (padded ^ _INNER_PAD).to_bytes(_BLOCK_BYTES, "big")
    outer = (padded ^ _OUTER_PAD).to_bytes(_BLOCK_BYTES, "big")
    return _sha1(inner), _sha1(outer)  # noqa: S324


def _truncated(inner: _Hash, outer: _Hash, step: int) -> int:
    """RFC 4226's dynamic truncation of the step's HMAC: 31 bits, before the decimal digits.
    From copies of the keyed states, so the key's pads are hashed once per check, not per step."""
    inner = inner.copy()
    inner.update(_STEP.pack(step))
    outer = outer.copy()
    outer.update(inner.digest())
    digest = outer.digest()
    number: int = _TRUNCATED.unpack_from(digest, digest[-1] & 0x0F)[0]
    return number & 0x7FFFFFFF


def from_base32(text: str) -> bytes:
    """The secret an app was given as base32 text (spaces and case as people type them)."""
    cleaned = "".join(text.split()).upper()
    return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))


def provisioning_uri(secret: bytes, *, account_name: str, issuer: str) -> str:
    """otpauth://totp/Issuer:account?secret=...&issuer=Issuer (Key Uri Format)."""
    return pyotp.TOTP(to_base32(secret), digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account_name, issuer_name=issuer
    )
