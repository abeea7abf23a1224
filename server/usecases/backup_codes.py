"""Backup codes: showing the unused ones again, regenerating the set, using one at login."""

from __future__ import annotations

from twofactor_server.domain import backup_codes
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.keyring import BACKUP_CODE, KeyMismatch, Keyring, version_of
from twofactor_server.domain.models import BackupCodeSet, Caller
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.usecases import audit
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.users import existing_user, require_enrolled, require_step_up


def backup_code_data(user_id: str, code: str) -> bytes:
    """What a backup code's hash covers: the normalized code bound to its user."""
    return f"{user_id}\0{code}".encode()


class BackupCodes:
    def __init__(
        self, db: Database, keyring: Keyring, policy: PolicySettings, notices: Notices, clock: Clock
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._notices = notices
        self._clock = clock

    def get_backup_codes(self, user_id: str, *, verification_token: str, caller: Caller) -> BackupCodeSet:
        """The unused codes of the current set, decrypted for display.

        Invariants: shown only with a step-up proof for this user (require_step_up) at the
        credential epoch of the set shown (the row lock: a regeneration, reset or re-enrollment
        committing between the proof's check and the read of the codes would otherwise show
        the new set to the proof it retired); audited, and the user is told by email (a notice).
        """
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            enabled = require_enrolled(tx, user_id, self._policy)
            now = now_ms(self._clock)
            require_step_up(self._keyring, self._policy, user, enabled, verification_token, caller, now)
            codes = tuple(
                backup_codes.display(
                    self._keyring.decrypt(row.code_ciphertext, purpose=BACKUP_CODE, user_id=user_id).decode()
                )
                for row in store.unused_backup_codes(tx, user_id)
            )
            audit.record(tx, caller, now, user_id, "backup_codes_viewed", detail=f"{len(codes)} codes")
            self._notices.add(tx, user.email, user_id, "backup_codes_viewed", now)
            return BackupCodeSet(codes, user.backup_codes_generated_at)

    def regenerate_backup_codes(
        self, user_id: str, *, verification_token: str, caller: Caller
    ) -> BackupCodeSet:
        """A new set; every code of the old set stops working in the same transaction.

        Invariant: only with a step-up proof (require_step_up); the new set moves the
        credential epoch on, so that proof is spent."""
        now = now_ms(self._clock)
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            enabled = require_enrolled(tx, user_id, self._policy)
            require_step_up(self._keyring, self._policy, user, enabled, verification_token, caller, now)
            codes = self.replace_set(tx, user_id, now)
            audit.record(tx, caller, now, user_id, "backup_codes_regenerated", detail=f"{len(codes)} codes")
            self._notices.add(tx, user.email, user_id, "backup_codes_regenerated", now)
            return BackupCodeSet(codes, now)

    def replace_set(self, tx: Transaction, user_id: str, now: int) -> tuple[str, ...]:
        """Store a new set (each code as a keyed hash to check and a ciphertext to show); return it."""
        rows, shown = self.new_set(user_id)
        store.replace_backup_codes(tx, user_id, rows, now)
        return shown

    def new_set(self, user_id: str) -> tuple[list[tuple[bytes, bytes]], tuple[str, ...]]:
        """A new set: the rows to store (keyed hash, ciphertext) and the codes as shown."""
        codes = backup_codes.new_codes(self._policy.backup_code_count)
        rows = [
            (
                self._keyring.keyed_hash(backup_code_data(user_id, code), purpose=BACKUP_CODE),
                self._keyring.encrypt(code.encode(), purpose=BACKUP_CODE, user_id=user_id),
            )
            for code in codes
        ]
        return rows, tuple(backup_codes.display(code) for code in codes)

    def use(self, tx: Transaction, user_id: str, code: str, now: int) -> bool:
        """Whether `code` (normalized) is an unused code of the user's; if so it is used up now.

        Invariant: each code works once, decided by one conditional UPDATE.
        """
        data = backup_code_data(user_id, code)
        rows = store.unused_backup_codes(tx, user_id)
        for row in rows:
            if self._keyring.matches(row.code_hash, data, purpose=BACKUP_CODE):
                return store.use_backup_code(tx, user_id, row.position, now)
        # A wrong code, not a wrong key: a row's hash and seal were made together, by one key, so a
        # seal that opens with this server's key of the hash's version says the hashes of that
        # version are ours too (KeyMismatch when none does; a damaged one alone is no mismatch).
        # What else this server has opened proves nothing of these: perhaps only what it sealed
        # itself, with another environment's key.
        for version in {version_of(row.code_hash) for row in rows}:
            of_version = [row for row in rows if version_of(row.code_hash) == version]
            if not any(
                self._keyring.opens(row.code_ciphertext, purpose=BACKUP_CODE, user_id=user_id)
                for row in of_version
            ):
                raise KeyMismatch(version)
        return False
