"""Verify: checking a login code (authenticator, emailed or texted, or a backup code)."""

from __future__ import annotations

from twofactor_server.domain import backup_codes, lockout, one_time_codes, totp
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument
from twofactor_server.domain.keyring import TOTP_SECRET, Keyring
from twofactor_server.domain.models import Caller, CodeKind, Lock, VerifyOutcome, VerifyResult
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import NewAuditEvent, VerifySnapshot
from twofactor_server.usecases import audit
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import AUTHENTICATOR, EMAIL, LOGIN, SMS, Challenges
from twofactor_server.usecases.users import count_failure, existing_user, usable_methods


class Verification:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        policy: PolicySettings,
        challenges: Challenges,
        backup_codes: BackupCodes,
        clock: Clock,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._challenges = challenges
        self._backup_codes = backup_codes
        self._clock = clock

    def verify(self, user_id: str, code: str, *, caller: Caller) -> VerifyOutcome:
        """Check a login code. A wrong code is an answer (REJECTED or LOCKED), not an error.

        Invariants: a locked user is answered LOCKED without any code being checked; every
        code is accepted at most once (an authenticator step only moves forward, an emailed
        code and a backup code are consumed by conditional UPDATEs); a wrong code counts one
        failure toward the lockout, a right one clears the count.
        """
        digits = one_time_codes.normalize(code)
        backup = backup_codes.normalize(code)
        if digits is None and backup is None:
            raise InvalidArgument(
                "INVALID_CODE", "code must be 6 to 10 digits or a backup code like k7m2q-x9p4w"
            )
        now = now_ms(self._clock)
        accepted_event = None
        if self._policy.audit_verifications == "all":
            accepted_event = audit.event(
                caller, now, user_id, audit.VERIFICATION_ACCEPTED, detail=CodeKind.AUTHENTICATOR.value
            )
        if digits is not None and len(digits) == totp.DIGITS:
            accepted = self._accept_authenticator_code_fast(user_id, digits, now, accepted_event)
            if accepted is not None:
                return accepted
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            methods = {m.method: m for m in store.methods_of(tx, user_id)}
            usable = usable_methods(list(methods.values()), self._policy)
            if not usable:
                raise FailedPrecondition("NOT_ENROLLED", "the user has no second-factor method enabled")
            lock = lockout.lock_of(user.failed_attempts, user.locked_until, self._policy, now)
            if lock is not None:
                audit.record(tx, caller, now, user_id, audit.VERIFICATION_LOCKED, outcome="failure")
                return self._outcome(tx, user_id, VerifyResult.LOCKED, None, user.failed_attempts, lock, now)
            matched = None
            if digits is not None and AUTHENTICATOR in usable and len(digits) == totp.DIGITS:
                seen = VerifySnapshot(user.failed_attempts, user.locked_until, methods[AUTHENTICATOR].secret)
                left = self._accept_authenticator_code(tx, user_id, digits, seen, now, accepted_event)
                if left is not None:
                    return self._accepted(CodeKind.AUTHENTICATOR, left, now)
            if digits is not None and (EMAIL in usable or SMS in usable):
                kind = self._challenges.match(tx, user_id, LOGIN, digits, now, method=None)
                if kind in usable:
                    matched = CodeKind(kind)
            if matched is None and backup is not None and self._backup_codes.use(tx, user_id, backup, now):
                matched = CodeKind.BACKUP_CODE
                audit.record(tx, caller, now, user_id, "backup_code_used")
            if matched is not None:
                if (
                    accepted_event is not None and matched != CodeKind.BACKUP_CODE
                ):  # that one is always logged
                    audit.record(tx, caller, now, user_id, audit.VERIFICATION_ACCEPTED, detail=matched.value)
                store.record_success(tx, user_id, now)
                return self._outcome(tx, user_id, VerifyResult.ACCEPTED, matched, 0, None, now)
            failures = count_failure(tx, caller, user_id, self._policy, now)
            lock = lockout.lock_of(
                failures, lockout.locked_until_after(failures, self._policy, now), self._policy, now
            )
            result = VerifyResult.LOCKED if lock is not None else VerifyResult.REJECTED
            action = audit.VERIFICATION_LOCKED if lock is not None else audit.VERIFICATION_REJECTED
            audit.record(tx, caller, now, user_id, action, outcome="failure", detail=f"{failures} failures")
            return self._outcome(tx, user_id, result, None, failures, lock, now)

    def _accept_authenticator_code_fast(
        self, user_id: str, digits: str, now: int, accepted_event: NewAuditEvent | None
    ) -> VerifyOutcome | None:
        """The common login, a right authenticator code, in two statements and no transaction.

        One read (lock state and sealed secret), the lock rule and the code checked here, then
        the one conditional UPDATE of _accept_authenticator_code, which also checks that nothing
        it read has moved. None hands the call to the locking path in verify(), which gives
        every other answer (unknown user, lockout, replay, a wrong code counted as a failure).
        With an audit event to write, PostgreSQL writes it in that same UPDATE statement; SQLite
        (in-process, no round trips to save) takes the locking path, whose transaction holds both.
        """
        if AUTHENTICATOR not in self._policy.allowed_methods:
            return None
        if accepted_event is not None and self._db.dialect != "postgres":
            return None
        with self._db.statements() as q:
            seen = store.verify_snapshot(q, user_id)
            if seen is None or seen.authenticator_secret is None:
                return None
            if lockout.lock_of(seen.failed_attempts, seen.locked_until, self._policy, now) is not None:
                return None
            left = self._accept_authenticator_code(q, user_id, digits, seen, now, accepted_event)
        return None if left is None else self._accepted(CodeKind.AUTHENTICATOR, left, now)

    def _accept_authenticator_code(
        self,
        tx: Transaction,
        user_id: str,
        digits: str,
        seen: VerifySnapshot,
        now: int,
        accepted_event: NewAuditEvent | None = None,
    ) -> int | None:
        """Accept `digits` if the sealed secret in `seen` shows them now and their step is new.

        Invariant: an authenticator code is accepted once: the user's last step only moves
        forward, decided by one conditional UPDATE that also clears the failure count.
        Returns the unused backup codes on acceptance, None otherwise.
        """
        assert seen.authenticator_secret is not None
        secret = self._keyring.decrypt(seen.authenticator_secret, purpose=TOTP_SECRET, user_id=user_id)
        step = totp.matching_step(secret, digits, now / 1000)
        if step is None:
            return None
        return store.accept_totp_step(tx, user_id, step, seen, now, accepted_event)

    def _accepted(self, kind: CodeKind, backup_left: int, now: int) -> VerifyOutcome:
        metrics.verification(VerifyResult.ACCEPTED.value, kind.value)
        return VerifyOutcome(
            result=VerifyResult.ACCEPTED,
            matched=kind,
            attempts_left=lockout.attempts_left(0, self._policy),
            backup_codes_remaining=backup_left,
            now_ms=now,
        )

    def _outcome(
        self,
        tx: Transaction,
        user_id: str,
        result: VerifyResult,
        matched: CodeKind | None,
        failures: int,
        lock: Lock | None,
        now: int,
    ) -> VerifyOutcome:
        metrics.verification(result.value, matched.value if matched is not None else "none")
        return VerifyOutcome(
            result=result,
            matched=matched,
            attempts_left=lockout.attempts_left(failures, self._policy),
            backup_codes_remaining=store.count_unused_backup_codes(tx, user_id),
            lock=lock,
            now_ms=now,
        )
