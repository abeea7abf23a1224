"""Telling a wrong code from a wrong key, for codes checked by their keyed hash.

A hash under a key version the keyring has, that doesn't match, is a wrong code, unless the
keyring's key of that version is not the one the stored values were sealed with (another
environment's, or a mistyped one, under the same version, on a server started before anything
was sealed: its start-up check had nothing to try the key on). Then every right code would be
counted as wrong, and lock its user out, with nothing in any log.
"""

from __future__ import annotations

from twofactor_server.domain.keyring import KeyMismatch, Keyring, version_of
from twofactor_server.storage import keys
from twofactor_server.storage.database import Transaction


def require_proven_key(q: Transaction, keyring: Keyring, stored_hash: bytes) -> None:
    """KeyMismatch when values are stored under the hash's version and none of a few opens with
    this keyring's key of it. Looked at until that key has opened a stored value, then never."""
    version = version_of(stored_hash)
    if keyring.proven(version) or version not in keyring.versions:
        return
    found = keys.sealed_samples(q, version)
    if found and not any(
        keyring.opens(sealed, purpose=purpose, user_id=owner) for _, purpose, owner, sealed in found
    ):
        raise KeyMismatch(version)
