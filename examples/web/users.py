"""The site's own user accounts: a handful of demo users with scrypt password hashes.

A real site keeps these in its database. The passwords are in README.md; only
their hashes are here, and a password is checked by hashing it again and
comparing in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

# scrypt parameters (RFC 7914): n=2**14, r=8, p=1 costs ~16 MiB and tens of milliseconds.
_N, _R, _P, _LENGTH = 2**14, 8, 1, 32


@dataclass(frozen=True)
class User:
    user_id: str  # also the user_id the site gives twofactor
    email: str  # the account label shown in the authenticator app
    password_hash: str
    is_admin: bool = False


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$n$r$p$salt$hash`, with a new random salt unless one is given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_LENGTH)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def _password_matches(password: str, stored: str) -> bool:
    _, n, r, p, salt, expected = stored.split("$")
    digest = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected) // 2
    )
    return hmac.compare_digest(digest.hex(), expected)


USERS = {
    user.user_id: user
    for user in (
        User(
            "alice",
            "alice@example.com",
            "scrypt$16384$8$1$53bb129198379273387c22266b70b03c$"
            "b692a7bccd0aaf90155b0a2637624a892f5a04622f5ef244309a92f340e4dc66",
        ),
        User(
            "bob",
            "bob@example.com",
            "scrypt$16384$8$1$32ea2592265da5112279637b5d77d867$"
            "67d99521393c0f93a5fe23d0edfb96a0f28991162d1d93eed4916198c3e90021",
        ),
        User(
            "dave",
            "dave@example.com",
            "scrypt$16384$8$1$cfe2a1dd6669e42fdd8988eac1658df9$"
            "476c519bfa5d344d2329ac429ed337dfb115c1511c79e95246f2d61cc23ae7ea",
        ),
        User(
            "carol",
            "carol@example.com",
            "scrypt$16384$8$1$8be5448f3bf5f90252d9872898fc494a$"
            "e18a30ee968029862f388dfd902d74c5c6fc705a3e4913842c5e09fd3461ee46",
            is_admin=True,
        ),
    )
}

# Checked when the user name is unknown, so that answering takes as long as for a known one.
_UNKNOWN_USER_HASH = (
    "scrypt$16384$8$1$9445b300b2ab5f91eddce4d2fcb95adb$"
    "6e4a31777e9aafc34014bd70113119917319eb986a5bc91778b831a146242f8f"
)


def check_password(user_id: str, password: str) -> User | None:
    """The user when the password is theirs, else None (unknown user or wrong password alike)."""
    user = USERS.get(user_id)
    matches = _password_matches(password, user.password_hash if user else _UNKNOWN_USER_HASH)
    return user if user and matches else None
