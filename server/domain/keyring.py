"""Versioned keys for encrypting secrets at rest and for keyed hashes of codes.

Ciphertexts and hashes start with the 4-byte key version that made them, so
keys can rotate: the newest key encrypts and hashes, every configured key
still decrypts and verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# Purposes bind each ciphertext and hash to what it is for (associated data / HMAC input).
TOTP_SECRET = "totp_secret"  # noqa: S105 - a purpose label, not a secret
BACKUP_CODE = "backup_code"
CHALLENGE_CODE = "challenge_code"

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce
_VERSION = struct.Struct(">I")


class KeyringError(ValueError):
    """Keys are missing, malformed, or a ciphertext does not authenticate."""


class Keyring:
    def __init__(self, keys: dict[int, bytes]) -> None:
        if not keys:
            raise KeyringError("the keyring needs at least one key")
        for version, key in keys.items():
            if not 0 < version < 2**32:
                raise KeyringError(f"key version {version} must be between 1 and 2**32-1")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key version {version} must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = {v: AESGCM(k) for v, k in keys.items()}
        # A separate key for hashing, so the encryption key is never used for two jobs.
        self._peppers = {v: _derive_pepper(k) for v, k in keys.items()}
        self.current_version = max(keys)

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse `version:base64key` entries separated by commas."""
        keys: dict[int, bytes] = {}
        for entry in spec.split(","):
            version, sep, encoded = entry.strip().partition(":")
            if not sep or not version.isdigit():
                raise KeyringError("each key must be written version:base64key")
            try:
                keys[int(version)] = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise KeyringError(f"key version {version} is not valid base64") from None
        return cls(keys)

    @staticmethod
    def new_key_spec(version: int = 1) -> str:
        return f"{version}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"

    def encrypt(self, plaintext: bytes, *, purpose: str, user_id: str) -> bytes:
        """AES-256-GCM under the newest key, bound to the user and purpose."""
        nonce = os.urandom(NONCE_BYTES)
        version = self.current_version
        sealed = self._aead[version].encrypt(nonce, plaintext, _associated_data(purpose, user_id, version))
        return _VERSION.pack(version) + nonce + sealed

    def decrypt(self, blob: bytes, *, purpose: str, user_id: str) -> bytes:
        version = _version_of(blob)
        aead = self._aead.get(version)
        if aead is None:
            raise KeyringError(f"no key version {version} in the keyring")
        nonce = blob[_VERSION.size : _VERSION.size + NONCE_BYTES]
        sealed = blob[_VERSION.size + NONCE_BYTES :]
        try:
            return aead.decrypt(nonce, sealed, _associated_data(purpose, user_id, version))
        except Exception:  # cryptography raises InvalidTag; never say more than "does not authenticate"
            raise KeyringError("ciphertext does not authenticate for this user and purpose") from None

    def keyed_hash(self, data: bytes, *, purpose: str) -> bytes:
        """HMAC-SHA256 with the newest pepper, prefixed with its version."""
        version = self.current_version
        return _VERSION.pack(version) + _mac(self._peppers[version], purpose, data)

    def matches(self, stored_hash: bytes, data: bytes, *, purpose: str) -> bool:
        """Whether `data` hashes to `stored_hash`, compared in constant time."""
        pepper = self._peppers.get(_version_of(stored_hash))
        if pepper is None:
            return False
        return hmac.compare_digest(stored_hash[_VERSION.size :], _mac(pepper, purpose, data))


def _derive_pepper(key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"twofactor pepper").derive(key)


def _mac(pepper: bytes, purpose: str, data: bytes) -> bytes:
    return hmac.new(pepper, purpose.encode() + b"\0" + data, hashlib.sha256).digest()


def _associated_data(purpose: str, user_id: str, version: int) -> bytes:
    # Purpose names never contain NUL, so the encoding is unambiguous.
    return b"twofactor.v1\0" + purpose.encode() + b"\0" + _VERSION.pack(version) + user_id.encode()


def _version_of(blob: bytes) -> int:
    if len(blob) < _VERSION.size:
        raise KeyringError("value too short to carry a key version")
    version: int = _VERSION.unpack_from(blob)[0]
    return version
