"""Key rotation: which key versions stored values use, re-encrypting them under the active key,
and the start-up check that a keyring can read everything stored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twofactor_server.domain.clock import Clock, now_ms, system_clock
from twofactor_server.domain.keyring import (
    BACKUP_CODE,
    TOTP_SECRET,
    KeyMismatch,
    Keyring,
    KeyringError,
    KeyVersionMissing,
)
from twofactor_server.settings import SettingsError
from twofactor_server.storage import keys
from twofactor_server.storage.database import Database
from twofactor_server.storage.records import KeyUsageRecord, MethodRecord, StoredBackupCode
from twofactor_server.usecases.backup_codes import backup_code_data
from twofactor_server.usecases.key_fingerprints import require_recorded_keys

# A batch of backup codes is one UPDATE with six parameters a row: 5,000 rows stay under
# SQLite's 32,766 and PostgreSQL's 65,535 parameters a statement.
MAX_BATCH_SIZE = 5000

# What an operator reads, per kind of stored value.
KIND_NAMES = {
    "totp_secret": "TOTP secrets",
    "pending_totp_secret": "pending enrollment secrets",
    "backup_code_ciphertext": "backup-code ciphertexts",
    "backup_code_hash": "backup-code hashes",
    "challenge_code_ciphertext": "waiting challenge codes",
    "challenge_code_hash": "waiting challenge code hashes",
}
CHALLENGE_KINDS = keys.CHALLENGE_KINDS
_MAX_PASSES = 5


@dataclass
class RotationProgress:
    """Counts so far: values re-encrypted (a backup code counts once for its hash and ciphertext),
    values a concurrent change rewrote first, values that could not be read."""

    rotated: int = 0
    superseded: int = 0
    unreadable: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RotationReport:
    progress: RotationProgress
    interrupted: bool
    remaining: tuple[KeyUsageRecord, ...]  # secrets and backup codes still not under the active key
    waiting_challenges: tuple[KeyUsageRecord, ...]  # left to expire


class KeyRotation:
    def __init__(
        self, db: Database, keyring: Keyring, clock: Clock = system_clock, batch_size: int = 500
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._clock = clock
        if not 0 < batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH_SIZE}, not {batch_size}")
        self._batch = batch_size

    def status(self) -> list[KeyUsageRecord]:
        """Per kind and key version, how many stored values use it (waiting challenge codes:
        only those that can still be accepted or delivered)."""
        with self._db.statements() as q:
            return keys.key_usage(q, now_ms(self._clock))

    def rotate(
        self,
        *,
        on_batch: Callable[[RotationProgress], None] = lambda _p: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> RotationReport:
        """Re-encrypt every TOTP and pending secret, and every backup code (its ciphertext, and its
        hash recomputed from the decrypted code), under the active key.

        Invariants: each value is written with a compare-and-swap on the value read, so a
        concurrent Verify, enrollment, regeneration or reset never loses its update (the row is
        left as it wrote it); the plaintext behind every value is unchanged, so no user is
        rejected; each batch is one short transaction, so stopping (should_stop, checked between
        batches) or a kill loses at most an uncommitted batch, and running again resumes, since
        only values not under the active key are read. Waiting challenge codes are left to expire.
        """
        progress = RotationProgress()
        interrupted = False
        for _ in range(_MAX_PASSES):
            before = progress.rotated
            interrupted = self._rotate_methods(progress, on_batch, should_stop) or self._rotate_backup_codes(
                progress, on_batch, should_stop
            )
            remaining = self._remaining()
            if interrupted or not remaining or progress.rotated == before:
                break
        usage = self.status()
        return RotationReport(
            progress,
            interrupted,
            tuple(
                u
                for u in usage
                if u.kind not in CHALLENGE_KINDS and u.version != self._keyring.active_version
            ),
            tuple(
                u for u in usage if u.kind in CHALLENGE_KINDS and u.version != self._keyring.active_version
            ),
        )

    def _remaining(self) -> list[KeyUsageRecord]:
        return [
            u
            for u in self.status()
            if u.kind not in CHALLENGE_KINDS and u.version != self._keyring.active_version
        ]

    def _rotate_methods(
        self,
        progress: RotationProgress,
        on_batch: Callable[[RotationProgress], None],
        should_stop: Callable[[], bool],
    ) -> bool:
        after = ("", "")
        while not should_stop():
            with self._db.statements() as q:
                rows = keys.methods_to_rotate(q, self._keyring.active_version, after=after, limit=self._batch)
            if not rows:
                return False
            swaps = [s for row in rows for s in self._resealed_secrets(row, progress)]
            with self._db.transaction() as tx:
                for column in ("secret", "pending_secret"):
                    of_column = [(u, m, old, new) for u, m, c, old, new in swaps if c == column]
                    won = keys.swap_method_secrets(tx, column, of_column)
                    progress.rotated += won
                    progress.superseded += len(of_column) - won
            after = (rows[-1].user_id, rows[-1].method)
            on_batch(progress)
        return True

    def _resealed_secrets(
        self, row: MethodRecord, progress: RotationProgress
    ) -> list[tuple[str, str, str, bytes, bytes]]:
        swaps = []
        for column, old in (("secret", row.secret), ("pending_secret", row.pending_secret)):
            if old is None or self._keyring.is_active(old):
                continue
            try:
                plain = self._keyring.decrypt(old, purpose=TOTP_SECRET, user_id=row.user_id)
            except (KeyringError, KeyVersionMissing) as error:
                _unreadable(progress, f"{row.method} {column} of user {row.user_id!r}", error)
                continue
            new = self._keyring.encrypt(plain, purpose=TOTP_SECRET, user_id=row.user_id)
            swaps.append((row.user_id, row.method, column, old, new))
        return swaps

    def _rotate_backup_codes(
        self,
        progress: RotationProgress,
        on_batch: Callable[[RotationProgress], None],
        should_stop: Callable[[], bool],
    ) -> bool:
        after = ("", -1)
        while not should_stop():
            with self._db.statements() as q:
                rows = keys.backup_codes_to_rotate(
                    q, self._keyring.active_version, after=after, limit=self._batch
                )
            if not rows:
                return False
            swaps = [s for row in rows if (s := self._resealed_code(row, progress)) is not None]
            with self._db.transaction() as tx:
                won = keys.swap_backup_codes(tx, swaps)
            progress.rotated += won
            progress.superseded += len(swaps) - won
            after = (rows[-1].user_id, rows[-1].position)
            on_batch(progress)
        return True

    def _resealed_code(
        self, row: StoredBackupCode, progress: RotationProgress
    ) -> tuple[StoredBackupCode, bytes, bytes] | None:
        # The hash is an HMAC of the code: it can only be recomputed from the decrypted copy.
        try:
            code = self._keyring.decrypt(row.code_ciphertext, purpose=BACKUP_CODE, user_id=row.user_id)
        except (KeyringError, KeyVersionMissing) as error:
            _unreadable(progress, f"backup code {row.position} of user {row.user_id!r}", error)
            return None
        new_hash = self._keyring.keyed_hash(backup_code_data(row.user_id, code.decode()), purpose=BACKUP_CODE)
        return row, new_hash, self._keyring.encrypt(code, purpose=BACKUP_CODE, user_id=row.user_id)


def _unreadable(progress: RotationProgress, what: str, error: Exception) -> None:
    progress.unreadable += 1
    if len(progress.problems) < 10:
        said = str(error)
        if isinstance(error, KeyMismatch):  # the key opens the others (the start-up check): not this
            version = error.version
            said = f"does not open with key version {version}, which opens others: damaged, reset the user"
        progress.problems.append(f"{what}: {said}")


def require_keys_for_stored_values(db: Database, keyring: Keyring, clock: Clock = system_clock) -> None:
    """Refuse to start (SettingsError) when stored values use a key version the keyring lacks,
    or one whose configured key opens none of a few values stored under it, or a key that is not
    the one the database recorded under its version (key_fingerprints.py; recorded here at the
    version's first start). Values are looked at first: an upgraded database is judged by what
    it holds before its first fingerprints are recorded.

    Such a process would fail every call that reads those values, and a wrong key would count
    every right code as wrong and lock users out; it is a configuration mistake (a key removed
    too early, added on one process only, or another environment's key under the same
    version), caught at start.
    """
    with db.statements() as q:
        missing = keys.usage_outside(q, keyring.versions, now_ms(clock))
        samples = {version: keys.sealed_samples(q, version) for version in keyring.versions}
    for version, found in samples.items():
        if found and not any(
            keyring.opens(sealed, purpose=purpose, user_id=owner) for _, purpose, owner, sealed in found
        ):
            kinds = ", ".join(sorted({KIND_NAMES[kind] for kind, *_ in found}))
            # Refused for an older version too: a wrong key there counts every right backup code
            # still sealed under it as wrong, and locks its users out. Values no key opens (the
            # damaged ones `keys rotate` reported unreadable) leave with a reset of their users.
            raise SettingsError(
                f"TWOFACTOR_KEYS' key version {version} opens none of the values stored under it "
                f"({kinds}): it is not the key they were sealed with (another environment's, or "
                f"mistyped?); configure version {version}'s original key, or, if `twofactor keys "
                f"rotate` reported these values unreadable, reset their users"
            )
    if missing:
        _refuse_missing(missing)
    # Then each key against the one the database recorded under its version (a fresh database's
    # first start records it): a wrong key is refused before anything is sealed with it.
    require_recorded_keys(db, keyring, clock)


def _refuse_missing(missing: list[KeyUsageRecord]) -> None:
    by_version: dict[int, list[str]] = {}
    for usage in missing:
        by_version.setdefault(usage.version, []).append(f"{usage.count} {KIND_NAMES[usage.kind]}")
    described = "; ".join(f"key version {v} ({', '.join(kinds)})" for v, kinds in sorted(by_version.items()))
    raise SettingsError(
        f"stored values need {described}, which TWOFACTOR_KEYS lacks: add that key back "
        "(run `twofactor keys rotate` with it before removing it; waiting challenge codes expire "
        "on their own)"
    )
