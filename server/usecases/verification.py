"""Verify: checking a login code (authenticator, emailed or texted, or a backup code)."""

from __future__ import annotations

from functools import partial

from twofactor_server.domain import backup_codes, lockout, one_time_codes, totp
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument
from twofactor_server.domain.keyring import TOTP_SECRET, Keyring, KeyringError, KeyVersionMissing
from twofactor_server.domain.lockout import Reservation
from twofactor_server.domain.models import Caller, CodeKind, Lock, VerifyOutcome, VerifyResult
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import attempts, store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import AcceptedStep, NewAuditEvent, UserRecord, VerifySnapshot
from twofactor_server.usecases import audit
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import AUTHENTICATOR, EMAIL, LOGIN, SMS, Challenges
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.sealed_secrets import CachedSecret, SealedSecrets
from twofactor_server.usecases.users import (
    audit_lock,
    count_failure,
    existing_user,
    lock_after_failures,
    step_up_token,
    usable_methods,
)

# The `verification` counter's labels of an acceptance, read once: Enum.value is a Python property.
_ACCEPTED_LABEL = VerifyResult.ACCEPTED.value
_KIND_LABELS = {kind: kind.value for kind in CodeKind}


class Verification:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        policy: PolicySettings,
        challenges: Challenges,
        backup_codes: BackupCodes,
        notices: Notices,
        clock: Clock,
        sealed_secrets: SealedSecrets | None = None,
    ) -> None:
        self._db = db
        self._sealed = sealed_secrets if sealed_secrets is not None else SealedSecrets()
        self._keyring = keyring
        self._policy = policy
        self._challenges = challenges
        self._backup_codes = backup_codes
        self._notices = notices
        self._clock = clock
        self._attempts_when_accepted = lockout.attempts_left(0, policy)  # an acceptance clears the count

    def verify(self, user_id: str, code: str, *, caller: Caller) -> VerifyOutcome:
        """Check a login code. A wrong code is an answer (REJECTED or LOCKED), not an error.

        Invariants: a locked user is answered LOCKED without any code being accepted or
        counted (the code just accepted is still recognized, to answer its double submit
        without counting it: it is spent, so this tells a guesser nothing); a code is
        decided by one statement that the user's row lock orders against every other guess (the
        locking transaction, or on the fast path one conditional UPDATE that accepts or counts
        it, the same path whether the code is right or wrong), so however many guesses arrive
        at once, no more than the lockout threshold are tried per lock window; every code is
        accepted at most once (an authenticator step only moves forward, an emailed code and a
        backup code are consumed by conditional UPDATEs); a wrong code stays counted, a right
        one clears the count. The authenticator code just accepted, sent again (same time step: a
        double submit), is REJECTED uncounted: it proves the user has the secret. An accepted
        code returns a step-up proof (verification_token) for this user, API token and epoch.
        """
        digits = one_time_codes.normalize(code)
        app_code = digits if digits is not None and len(digits) == totp.DIGITS else None  # an app's code
        # Six digits are never a backup code (longer): the common login skips its normalization.
        backup = None if app_code is not None else backup_codes.normalize(code)
        if digits is None and backup is None:
            raise InvalidArgument(
                "INVALID_CODE", "code must be 6 to 10 digits or a backup code like k7m2q-x9p4w"
            )
        now = now_ms(self._clock)
        accepted_event = None  # with TWOFACTOR_AUDIT_VERIFICATIONS=all, written with the acceptance
        if self._policy.audit_verifications == "all":
            accepted_event = audit.event(
                caller, now, user_id, audit.VERIFICATION_ACCEPTED, detail=CodeKind.AUTHENTICATOR.value
            )
        reserved: Reservation | None = None
        if app_code is not None:
            fast = self._accept_authenticator_code_fast(user_id, app_code, now, caller, accepted_event)
            if isinstance(fast, VerifyOutcome):
                return fast
            reserved = fast
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            methods = {m.method: m for m in store.methods_of(tx, user_id)}
            usable = usable_methods(list(methods.values()), self._policy)
            if not usable:
                raise FailedPrecondition("NOT_ENROLLED", "the user has no second-factor method enabled")
            step = None
            if app_code is not None and AUTHENTICATOR in usable:
                sealed = methods[AUTHENTICATOR].secret
                assert sealed is not None
                step = self._matching_step(user_id, app_code, sealed, now)
                if step is not None and step == user.totp_last_step:
                    # The code just accepted, again: not a failure (a reserved attempt is taken back).
                    if reserved is not None:
                        self._release(tx, user, reserved)
                        user = existing_user(tx, user_id)
                    failures = user.failed_attempts
                    lock = lockout.lock_of(failures, user.locked_until, self._policy, now)
                    result = VerifyResult.REJECTED if lock is None else VerifyResult.LOCKED
                    audit.spent_code(tx, caller, now, user_id, locked=lock is not None)
                    return self._outcome(tx, user_id, result, None, failures, lock, now)
            lock = lockout.lock_of(user.failed_attempts, user.locked_until, self._policy, now)
            if lock is not None and reserved is None:  # a reserved attempt was let in before the lock
                audit.record(tx, caller, now, user_id, audit.VERIFICATION_LOCKED, outcome="failure")
                return self._outcome(tx, user_id, VerifyResult.LOCKED, None, user.failed_attempts, lock, now)
            matched = None
            if step is not None:
                sealed = methods[AUTHENTICATOR].secret
                assert sealed is not None
                step_taken = self._accept_step_locked(tx, user_id, step, sealed, now, accepted_event)
                if step_taken is not None:
                    return self._accepted(user_id, CodeKind.AUTHENTICATOR, step_taken, now, caller, tx)
            if digits is not None and (EMAIL in usable or SMS in usable):
                kind = self._challenges.match(tx, user_id, LOGIN, digits, now, method=None)
                if kind in usable:
                    matched = CodeKind(kind)
            if matched is None and backup is not None and self._backup_codes.use(tx, user_id, backup, now):
                matched = CodeKind.BACKUP_CODE
                audit.record(tx, caller, now, user_id, "backup_code_used")
            if matched is not None:
                if accepted_event is not None and matched != CodeKind.BACKUP_CODE:  # that one always is
                    audit.record(tx, caller, now, user_id, audit.VERIFICATION_ACCEPTED, detail=matched.value)
                store.record_success(tx, user_id, now)
                outcome = self._outcome(tx, user_id, VerifyResult.ACCEPTED, matched, 0, None, now)
                token = step_up_token(self._keyring, user_id, user.credential_epoch, caller, now)
                return outcome._replace(verification_token=token)
            if reserved is None:
                failures = count_failure(tx, caller, user_id, self._policy, now, self._notices)
                lock = lockout.lock_of(
                    failures, lockout.locked_until_after(failures, self._policy, now), self._policy, now
                )
            else:  # counted when reserved; the row holds every count since, or an unlock's clearing
                failures = user.failed_attempts
                if reserved.locks and lock is not None:  # the lock it started, if still there
                    audit_lock(
                        tx,
                        caller,
                        user_id,
                        reserved.failures,
                        reserved.locked_until,
                        self._policy,
                        now,
                        self._notices,
                        lock_committed=True,
                    )
            result = VerifyResult.LOCKED if lock is not None else VerifyResult.REJECTED
            action = audit.VERIFICATION_LOCKED if lock is not None else audit.VERIFICATION_REJECTED
            audit.record(tx, caller, now, user_id, action, outcome="failure", detail=f"{failures} failures")
            return self._outcome(tx, user_id, result, None, failures, lock, now)

    def _accept_authenticator_code_fast(
        self, user_id: str, digits: str, now: int, caller: Caller, accepted_event: NewAuditEvent | None
    ) -> VerifyOutcome | Reservation | None:
        """The common login, a right authenticator code: one statement, no transaction.

        With the user's sealed secret cached in this process, a matching code goes straight to
        accept_totp_step_unlocked with the lock rule in its WHERE clause: one conditional UPDATE
        that accepts only if the user is not locked, the step is new and the user's methods and
        epoch are as when the cached secret was read. A code that doesn't match is counted
        by one UPDATE with the same two conditions (count_failure_unlocked), and the locking
        path settles it. Right or wrong, a guess takes the same path to the one statement the
        row lock orders, so a right code is accepted only when no count that locks the user came
        before it, as if every guess were checked one at a time. Anything else (a step already
        used, a lock, a stale cache: no row touched) reads the user afresh (_decide_from_snapshot).

        Returns the outcome when decided here; otherwise the reservation the locking path in
        verify() settles (a wrong code stays counted), or None when nothing was reserved
        (unknown user, no authenticator, locked, counters moved, not accepted).
        With an acceptance to audit, PostgreSQL writes the event in accept_totp_step_unlocked's one
        statement; SQLite (in-process: no round trips to save) takes the locking path, whose
        transaction holds both.
        """
        if AUTHENTICATOR not in self._policy.allowed_methods:
            return None
        if accepted_event is not None and self._db.dialect != "postgres":
            return None
        cached = self._sealed.get(user_id)
        cached_step = None
        if cached is not None:
            try:
                cached_step = self._matching_step(user_id, digits, cached.sealed, now)
            except (KeyringError, KeyVersionMissing):
                cached = None  # not checkable here: the snapshot read decides (and reports it)
        with self._db.statements() as q:  # one connection for the try and the fallback
            if cached is not None and cached_step is not None:
                accepted = self._accept_unlocked(q, user_id, cached_step, cached, now, accepted_event)
                if accepted is not None:
                    return self._accepted(user_id, CodeKind.AUTHENTICATOR, accepted, now, caller)
            elif cached is not None:
                counted = self._count_unlocked(q, user_id, cached, now)
                if counted is not None:
                    return counted
            return self._decide_from_snapshot(
                q, user_id, digits, now, caller, accepted_event, cached, cached_step
            )

    def _decide_from_snapshot(
        self,
        q: Transaction,
        user_id: str,
        digits: str,
        now: int,
        caller: Caller,
        accepted_event: NewAuditEvent | None,
        cached: CachedSecret | None,
        cached_step: int | None,
    ) -> VerifyOutcome | Reservation | None:
        """One read (lock state, last step, sealed secret) and the lock rule; a right code is then
        accepted by the lock-checking UPDATE, a wrong one counted before anything is decided on
        it (reserve_attempt: a conditional UPDATE on the counters just read, lock included).
        Counting first is what keeps concurrent guesses from being tried past the lockout
        threshold: a guess that loses the count goes to the row lock, where it meets the lock
        the winners' counts set; a right code that comes after a count meets it in its UPDATE."""
        seen = attempts.verify_snapshot(q, user_id)
        sealed = None if seen is None else seen.authenticator_secret
        version = None if seen is None else seen.secret_version
        if seen is None or sealed is None or version is None:
            self._sealed.put(user_id, None)
            return None
        if lockout.lock_of(seen.failed_attempts, seen.locked_until, self._policy, now) is not None:
            return None
        # Matched again only if the secret is not the cached one just tried (KEY_VERSION_MISSING
        # raises here, as on the locking path: never a wrong code).
        same = cached is not None and sealed == cached.sealed
        step = cached_step if same else self._matching_step(user_id, digits, sealed, now)
        read = CachedSecret(sealed, version, seen.credential_epoch)
        self._sealed.put(user_id, read)
        if step is not None and step == seen.totp_last_step:
            # The code just accepted, again: not counted (spent, it tells a guesser nothing).
            audit.spent_code(q, caller, now, user_id, locked=False)
            return self._double_submit(q, user_id, seen.failed_attempts, now)
        if step is not None:
            accepted = self._accept_unlocked(q, user_id, step, read, now, accepted_event)
            if accepted is None:
                return None  # locked, used or replaced meanwhile: decide under the row lock
            return self._accepted(user_id, CodeKind.AUTHENTICATOR, accepted, now, caller)
        reserved = self._reservation(seen, now)
        counted = attempts.reserve_attempt(
            q, user_id, seen, failed_attempts=reserved.failures, locked_until=reserved.locked_until
        )
        return reserved if counted else None  # not counted: another attempt moved the counters first

    def _accept_unlocked(
        self, q: Transaction, user_id: str, step: int, at: CachedSecret, now: int, event: NewAuditEvent | None
    ) -> AcceptedStep | None:
        max_failures = self._policy.max_consecutive_failures
        return attempts.accept_totp_step_unlocked(
            q, user_id, step, at.version, at.epoch, now, event, unlocked_below=max_failures
        )

    def _count_unlocked(self, q: Transaction, user_id: str, at: CachedSecret, now: int) -> Reservation | None:
        """A wrong code counted in one statement (attempts.count_failure_unlocked), as a right one
        is accepted: the same path up to the one UPDATE that the row lock orders, whatever the
        code. None when nothing was counted (locked, secret replaced): the snapshot decides."""
        schedule, later = lockout.lock_schedule(self._policy, now)
        counted = attempts.count_failure_unlocked(
            q,
            user_id,
            at.version,
            at.epoch,
            now,
            unlocked_below=self._policy.max_consecutive_failures,
            threshold=self._policy.lockout_threshold,
            schedule=schedule,
            later=later,
        )
        if counted is None:
            return None
        failures, until = counted
        locks, _ = lock_after_failures(failures, self._policy, now)
        # Counted only when unlocked: a lock it replaced had expired, as good as none.
        before = None if locks else until
        return Reservation(failures - 1, before, failures, until, locks)

    def _accept_step_locked(
        self,
        tx: Transaction,
        user_id: str,
        step: int,
        sealed: bytes,
        now: int,
        accepted_event: NewAuditEvent | None = None,
    ) -> AcceptedStep | None:
        """store.accept_totp_step under the user's row lock, re-reading the sealed secret when
        `twofactor keys rotate` re-encrypted it meanwhile: the rotation takes no user lock, and
        the plaintext (so the step) is the same. A rotation never turns a right code into a
        counted failure; a replayed step still finds the same secret and is refused."""
        for _ in range(3):  # each retry needs another re-encryption of this secret: a bounded race
            taken = attempts.accept_totp_step(tx, user_id, step, sealed, now, accepted_event)
            if taken is not None:
                return taken
            reread = next(
                (m.secret for m in store.methods_of(tx, user_id) if m.method == AUTHENTICATOR and m.enabled),
                None,
            )
            if reread is None or reread == sealed:
                return None
            sealed = reread
        return None

    def _double_submit(self, q: Transaction, user_id: str, failures: int, now: int) -> VerifyOutcome:
        metrics.verification(VerifyResult.REJECTED.value, "none")
        return VerifyOutcome(
            result=VerifyResult.REJECTED,
            matched=None,
            attempts_left=lockout.attempts_left(failures, self._policy),
            backup_codes_remaining=store.count_unused_backup_codes(q, user_id),
            now_ms=now,
        )

    def _reservation(self, seen: VerifySnapshot, now: int) -> Reservation:
        """The counters after one more failure, as count_failure would leave them."""
        failures = seen.failed_attempts + 1
        locks, until = lock_after_failures(failures, self._policy, now)
        return Reservation(
            failures_before=seen.failed_attempts,
            locked_until_before=seen.locked_until,
            failures=failures,
            locked_until=until if locks else seen.locked_until,
            locks=locks,
        )

    def _release(self, tx: Transaction, user: UserRecord, reserved: Reservation) -> None:
        """Take back a reserved attempt that was no guess (a double submit).

        Under the row lock. A success since then already cleared it; if nothing moved since,
        the counters go back exactly; otherwise one attempt comes off the count.
        """
        if user.failed_attempts == 0:
            return
        if (user.failed_attempts, user.locked_until) == (reserved.failures, reserved.locked_until):
            attempts.set_attempts(tx, user.user_id, reserved.failures_before, reserved.locked_until_before)
        else:
            attempts.set_attempts(tx, user.user_id, user.failed_attempts - 1, user.locked_until)

    def _matching_step(self, user_id: str, digits: str, sealed: bytes, now: int) -> int | None:
        """The time step at which the sealed secret shows `digits` now, if any.

        Accepting it is store.accept_totp_step's: an authenticator code is accepted once, the
        user's last step only moves forward, decided by one conditional UPDATE that also
        clears the failure count.
        """
        secret = self._keyring.decrypt(sealed, purpose=TOTP_SECRET, user_id=user_id)
        return totp.matching_step(secret, digits, now / 1000)

    def _accepted(
        self,
        user_id: str,
        kind: CodeKind,
        accepted: AcceptedStep,
        now: int,
        caller: Caller,
        tx: Transaction | None = None,
    ) -> VerifyOutcome:
        if tx is None:  # the fast path's statement has committed; else counted when `tx` commits
            metrics.verification(_ACCEPTED_LABEL, _KIND_LABELS[kind])
        else:
            tx.after_commit(partial(metrics.verification, _ACCEPTED_LABEL, _KIND_LABELS[kind]))
        token = step_up_token(self._keyring, user_id, accepted.credential_epoch, caller, now)
        # Positional: every login makes one, and keywords cost a third more.
        return VerifyOutcome(
            VerifyResult.ACCEPTED, kind, self._attempts_when_accepted, accepted.backup_left, None, now, token
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
        # Counted once the answer's writes commit: a failed commit answers UNAVAILABLE, and the retry counts.
        tx.after_commit(
            partial(metrics.verification, result.value, "none" if matched is None else matched.value)
        )
        return VerifyOutcome(
            result=result,
            matched=matched,
            attempts_left=lockout.attempts_left(failures, self._policy),
            backup_codes_remaining=store.count_unused_backup_codes(tx, user_id),
            lock=lock,
            now_ms=now,
        )
