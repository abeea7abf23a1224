"""Versioned keys for encrypting secrets at rest and for keyed hashes of codes.

Ciphertexts and hashes start with the 4-byte big-endian key version that made
them, so keys can rotate: the active key encrypts and hashes (by default the
highest version), every configured key still decrypts and verifies. A fleet
deploys a new key decrypt-only first, then activates it, then re-encrypts
(`twofactor keys rotate`), then retires the old one.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from twofactor_server.domain.errors import FailedPrecondition

# Purposes bind each ciphertext and hash to what it is for (associated data / HMAC input).
TOTP_SECRET = "totp_secret"  # noqa: S105 - a purpose label, not a secret
BACKUP_CODE = "backup_code"
CHALLENGE_CODE = "challenge_code"

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce
MAX_VERSION = 2**32 - 1
_VERSION = struct.Struct(">I")
_MAX_KEYED_STATES = 64  # kept HMAC states: key versions x purposes


class KeyringError(ValueError):
    """Keys are missing or malformed, or a ciphertext does not authenticate."""


class KeyVersionMissing(FailedPrecondition):
    """A stored value was made under a key version this keyring lacks: a configuration problem,
    never a wrong code. The operator adds the key back to TWOFACTOR_KEYS."""

    def __init__(self, version: int) -> None:
        super().__init__(
            "KEY_VERSION_MISSING",
            f"a stored value is encrypted under key version {version}, which TWOFACTOR_KEYS lacks; "
            "the operator must add that key back",
            metadata={"key_version": str(version)},
        )
        self.version = version


class KeyMismatch(FailedPrecondition, KeyringError):
    """A stored value under a key version this keyring has does not open with that key: sealed with
    another key under the same version (a database restored from another environment under a
    running server, whose start-up check saw the database's recorded key then), or damaged.
    Answered as a configuration problem (never INTERNAL, never a wrong code); still a
    KeyringError to its callers."""

    def __init__(self, version: int) -> None:
        super().__init__(
            "KEY_MISMATCH",
            f"a stored value does not open with key version {version} of TWOFACTOR_KEYS: it was "
            "sealed with another key under that version; the operator must configure the original key",
            metadata={"key_version": str(version)},
        )
        self.version = version


class Keyring:
    def __init__(self, keys: dict[int, bytes], active_version: int | None = None) -> None:
        if not keys:
            raise KeyringError("the keyring needs at least one key")
        for version, key in keys.items():
            if not 0 < version <= MAX_VERSION:
                raise KeyringError(f"key version {version} must be between 1 and {MAX_VERSION}")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key version {version} must be {KEY_BYTES} bytes, got {len(key)}")
        active = max(keys) if active_version is None else active_version
        if active not in keys:
            raise KeyringError(
                f"the active key version {active} is not in the keyring (versions {_listed(keys)})"
            )
        self._aead = {v: AESGCM(k) for v, k in keys.items()}
        # A separate key for hashing, so the encryption key is never used for two jobs.
        self._peppers = {v: _derive_pepper(k) for v, k in keys.items()}
        # HMAC(pepper, purpose || 0 || data) with its key and prefix absorbed once: each hash
        # starts from a copy (keyed_hash runs on every login, send and backup code).
        self._keyed: dict[tuple[int, str], HMAC] = {}
        # What a database records of each version's key at first use (key_fingerprint).
        self._fingerprints = {v: key_fingerprint(k) for v, k in keys.items()}
        self.active_version = active
        self.versions = tuple(sorted(keys))

    @classmethod
    def parse(cls, spec: str, active_version: int | None = None) -> Keyring:
        """Parse `version:base64key` entries separated by commas.

        Refuses, naming the entry (never its key): an entry that is not version:base64key, an
        empty key, bad base64, a key that is not 32 bytes, and a version given twice (a later
        entry silently replacing an earlier one would make every stored value undecryptable).
        """
        keys: dict[int, bytes] = {}
        entries = spec.split(",")
        for position, raw in enumerate(entries, start=1):
            entry = raw.strip()
            where = f"entry {position} of {len(entries)}"
            version_text, sep, encoded = entry.partition(":")
            version_text = version_text.strip()
            if not entry:
                raise KeyringError(f"{where} is empty; write version:base64key entries separated by commas")
            if not sep or not (version_text.isascii() and version_text.isdigit()):
                raise KeyringError(f"{where} is not version:base64key (run `twofactor keygen` for one)")
            version = int(version_text)
            where = f"{where} (version {version})"
            if not 0 < version <= MAX_VERSION:
                raise KeyringError(f"{where}: the version must be between 1 and {MAX_VERSION}")
            if version in keys:
                raise KeyringError(
                    f"{where}: version {version} appears twice; every key needs its own version "
                    "(`twofactor keygen --version N`)"
                )
            if not encoded.strip():
                raise KeyringError(f"{where} has an empty key")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"{where}: the key is not valid base64") from None
            if len(key) != KEY_BYTES:
                raise KeyringError(
                    f"{where}: the key is {len(key)} bytes, it must be {KEY_BYTES} "
                    "(`twofactor keygen` makes one)"
                )
            keys[version] = key
        return cls(keys, active_version)

    @staticmethod
    def new_key_spec(version: int = 1) -> str:
        if not 0 < version <= MAX_VERSION:
            raise KeyringError(f"key version {version} must be between 1 and {MAX_VERSION}")
        return f"{version}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"

    def encrypt(self, plaintext: bytes, *, purpose: str, user_id: str) -> bytes:
        """AES-256-GCM under the active key, bound to the user and purpose."""
        nonce = os.urandom(NONCE_BYTES)
        version = self.active_version
        sealed = self._aead[version].encrypt(nonce, plaintext, _associated_data(purpose, user_id, version))
        return _VERSION.pack(version) + nonce + sealed

    def decrypt(self, blob: bytes, *, purpose: str, user_id: str) -> bytes:
        """The plaintext; KeyVersionMissing when the blob's key is not configured."""
        version = version_of(blob)
        aead = self._aead.get(version)
        if aead is None:
            raise KeyVersionMissing(version)
        nonce = blob[_VERSION.size : _VERSION.size + NONCE_BYTES]
        sealed = blob[_VERSION.size + NONCE_BYTES :]
        try:
            plaintext = aead.decrypt(nonce, sealed, _associated_data(purpose, user_id, version))
        except Exception:  # cryptography raises InvalidTag; never say more than "does not authenticate"
            raise KeyMismatch(version) from None
        return plaintext

    def opens(self, blob: bytes, *, purpose: str, user_id: str) -> bool:
        """Whether a stored value decrypts with this keyring (its plaintext dropped at once): the
        test of a key against values it should have sealed."""
        try:
            self.decrypt(blob, purpose=purpose, user_id=user_id)
        except KeyringError:
            return False
        return True

    def fingerprint(self, version: int) -> bytes:
        """The fingerprint of this keyring's key of `version` (key_fingerprint)."""
        return self._fingerprints[version]

    def has_fingerprint(self, version: int, recorded: bytes) -> bool:
        """Whether this keyring's key of `version` is the key `recorded` was made from, compared in
        constant time."""
        return hmac.compare_digest(self._fingerprints[version], recorded)

    def keyed_hash(self, data: bytes, *, purpose: str) -> bytes:
        """HMAC-SHA256 with the active pepper, prefixed with its version."""
        version = self.active_version
        return _VERSION.pack(version) + self._mac(version, purpose, data)

    def matches(self, stored_hash: bytes, data: bytes, *, purpose: str) -> bool:
        """Whether `data` hashes to `stored_hash`, compared in constant time.

        A hash under a version the keyring lacks raises KeyVersionMissing: it can't be
        checked, and answering False would count a right code as a wrong one.
        """
        version = version_of(stored_hash)
        if version not in self._peppers:
            raise KeyVersionMissing(version)
        return hmac.compare_digest(stored_hash[_VERSION.size :], self._mac(version, purpose, data))

    def _mac(self, version: int, purpose: str, data: bytes) -> bytes:
        keyed = self._keyed.get((version, purpose))
        if keyed is None:
            keyed = HMAC(self._peppers[version], hashes.SHA256())
            keyed.update(purpose.encode() + b"\0")
            if len(self._keyed) < _MAX_KEYED_STATES:  # purposes are a few constants; bounded anyway
                self._keyed[(version, purpose)] = keyed
        mac = keyed.copy()  # never updated once stored, so threads share it safely
        mac.update(data)
        return mac.finalize()

    def is_active(self, blob: bytes) -> bool:
        """Whether a stored value is already under the active key."""
        return version_of(blob) == self.active_version


def version_of(blob: bytes) -> int:
    """The key version a ciphertext or keyed hash was made under (its first 4 bytes, big-endian)."""
    if len(blob) < _VERSION.size:
        raise KeyringError("value too short to carry a key version")
    version: int = _VERSION.unpack_from(blob)[0]
    return version


def version_prefix(version: int) -> bytes:
    """The 4 bytes every value made under `version` starts with."""
    return _VERSION.pack(version)


def _listed(keys: dict[int, bytes]) -> str:
    return ", ".join(str(v) for v in sorted(keys))


def _derive_pepper(key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"twofactor pepper").derive(key)


def key_fingerprint(key: bytes) -> bytes:
    """A one-way value that tells one key from another, for a database to record which key it
    saw under each version: derived as the pepper is (HKDF-SHA256, its own label), so it is
    neither the key nor any key used for sealing or hashing, and tells nothing of them."""
    label = b"twofactor key fingerprint v1"
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


def _associated_data(purpose: str, user_id: str, version: int) -> bytes:
    # Purpose names never contain NUL, so the encoding is unambiguous.
    return b"twofactor.v1\0%s\0%s%s" % (purpose.encode(), _VERSION.pack(version), user_id.encode())
