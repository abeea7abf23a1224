"""The start-up check that each configured key is the one the database knows under its version,
by fingerprint (domain/keyring.py key_fingerprint), on a database with nothing sealed yet too.

The check of stored values (key_rotation.require_keys_for_stored_values) can only try a key on
values sealed under its version: on a fresh database two processes with different keys under
one version both started, both sealed, and users enrolled through one had their right codes
counted as wrong by the other. The first process to start with a version records its key's
fingerprint; every later start compares its own, and another key is refused before it serves.
"""

from __future__ import annotations

import logging

from twofactor_server.domain.clock import Clock, now_ms, system_clock
from twofactor_server.domain.keyring import Keyring
from twofactor_server.settings import SettingsError
from twofactor_server.storage.database import Database
from twofactor_server.storage.key_fingerprints import record_fingerprints, recorded_fingerprints

log = logging.getLogger(__name__)


def require_recorded_keys(
    db: Database, keyring: Keyring, clock: Clock = system_clock, *, record: bool = True
) -> None:
    """Refuse (SettingsError) a configured key whose version the database recorded with another
    key. With `record`, first record the fingerprint of each version that has none (one
    transaction: of processes starting together with different keys, exactly one is recorded,
    and the others are refused); without (`keys status`, which changes nothing), only compare."""
    fingerprints = {version: keyring.fingerprint(version) for version in keyring.versions}
    with db.transaction() as tx:
        recorded_now = record_fingerprints(tx, fingerprints, now_ms(clock)) if record else []
        recorded = recorded_fingerprints(tx, keyring.versions)
    for version in recorded_now:
        log.info("recorded key version %s's fingerprint: only this key starts with that version now", version)
    for version in keyring.versions:
        if version in recorded and not keyring.has_fingerprint(version, recorded[version]):
            raise SettingsError(
                f"TWOFACTOR_KEYS' key version {version} is not the key this database recorded for "
                f"version {version} (another environment's, or mistyped?): configure version "
                f"{version}'s original key; a new key never reuses a version number "
                "(`twofactor keygen --version N` with a number not used before)"
            )
