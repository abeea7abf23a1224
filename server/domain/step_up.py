"""Step-up proofs: a short-lived verification_token that a user passed their second factor.

A token is `tfv1.` and the URL-safe base64 of: issue time (8 bytes, ms), a random nonce
(16 bytes), and a keyed hash from the keyring (its public keyed_hash/matches API, so any
server process with the same keys can check it and key rotation carries over) over the
user, the issue time, the nonce, the API token name that asked for it, and the user's
credential epoch. Nothing in it is readable or forgeable without the keys; it names no
user. It is only ever checked for the sensitive calls, never accepted as a login code.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct

from twofactor_server.domain.keyring import Keyring, KeyringError, KeyVersionMissing

STEP_UP = "step_up"  # the keyring purpose: a step-up MAC can't pass for any other keyed hash
PREFIX = "tfv1."
NONCE_BYTES = 16
MAX_TOKEN_CHARS = 256  # longer input is not a token of ours and is refused before any work
MAX_CLOCK_SKEW_MS = 30_000  # tokens from a server whose clock runs a little ahead still count
_ISSUED = struct.Struct(">Q")
_URL_SAFE = bytes.maketrans(b"+/", b"-_")


def issue_token(keyring: Keyring, *, user_id: str, actor: str, epoch: int, now_ms: int) -> str:
    """A new proof that `user_id` passed a second factor at `now_ms`, for the API token `actor`."""
    nonce = os.urandom(NONCE_BYTES)
    mac = keyring.keyed_hash(_mac_data(user_id, actor, epoch, now_ms, nonce), purpose=STEP_UP)
    raw = _ISSUED.pack(now_ms) + nonce + mac
    return PREFIX + _text(raw)


def _text(raw: bytes) -> str:
    """URL-safe base64 without padding: base64.urlsafe_b64encode's own steps, without its two
    Python calls (every login issues a token)."""
    return binascii.b2a_base64(raw, newline=False).translate(_URL_SAFE).rstrip(b"=").decode()


def token_is_valid(
    keyring: Keyring,
    token: str,
    *,
    user_id: str,
    actor: str,
    epoch: int,
    now_ms: int,
    lifetime_ms: int,
) -> bool:
    """Whether `token` was issued for this user, API token and credential epoch, less than
    `lifetime_ms` ago. The MAC is compared in constant time (Keyring.matches)."""
    if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_CHARS:
        return False
    body = token[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return False
    if _text(raw) != body:  # the decoder skips stray characters: only the issued text is a token
        return False
    head = _ISSUED.size + NONCE_BYTES
    if len(raw) <= head:
        return False
    (issued_ms,) = _ISSUED.unpack_from(raw)
    if not now_ms - lifetime_ms < issued_ms <= now_ms + MAX_CLOCK_SKEW_MS:
        return False
    nonce, mac = raw[_ISSUED.size : head], raw[head:]
    try:
        return keyring.matches(mac, _mac_data(user_id, actor, epoch, issued_ms, nonce), purpose=STEP_UP)
    except KeyringError:  # too short to carry a key version: not one of ours
        return False
    except KeyVersionMissing:  # made under a retired key (or forged): the caller verifies again
        return False


def _mac_data(user_id: str, actor: str, epoch: int, issued_ms: int, nonce: bytes) -> bytes:
    # user ids are printable text and token names carry no NUL, so the encoding is unambiguous.
    # The bytes of b"\0".join((user_id, actor, str(epoch), str(issued_ms), nonce)), in one step.
    return b"%s\0%s\0%d\0%d\0%s" % (user_id.encode(), actor.encode(), epoch, issued_ms, nonce)
