"""What every use case reads of a user (the row, the enabled methods, the lock), and the
user's own status and contacts (GetStatus, SetContact)."""

from __future__ import annotations

from twofactor_server.domain import contacts, lockout, step_up
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import Caller, UserState
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import MethodRecord, UserRecord
from twofactor_server.usecases import audit
from twofactor_server.usecases.sms_guard import require_sms_country


def existing_user(tx: Transaction, user_id: str, *, lock: bool = False) -> UserRecord:
    """The user's row (locked to the end of the transaction with lock=True); NOT_FOUND if unknown."""
    user = store.get_user(tx, user_id, lock=lock)
    if user is None:
        raise NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": user_id})
    return user


def usable_methods(methods: list[MethodRecord], policy: PolicySettings) -> tuple[str, ...]:
    """Of a user's methods, the enabled ones the policy still allows: those a code may be checked for."""
    return tuple(m.method for m in methods if m.enabled and m.method in policy.allowed_methods)


def require_allowed(method: str, policy: PolicySettings) -> None:
    if method not in policy.allowed_methods:
        raise FailedPrecondition(
            "METHOD_NOT_ALLOWED", f"the policy does not allow {method}", metadata={"method": method}
        )


def require_enrolled(tx: Transaction, user_id: str, policy: PolicySettings) -> tuple[str, ...]:
    """The user's usable methods; NOT_ENROLLED when there are none."""
    methods = usable_methods(store.methods_of(tx, user_id), policy)
    if not methods:
        raise FailedPrecondition("NOT_ENROLLED", "the user has no second-factor method enabled")
    return methods


def require_step_up(
    keyring: Keyring,
    policy: PolicySettings,
    user: UserRecord,
    enabled: tuple[str, ...],
    token: str,
    caller: Caller,
    now: int,
) -> None:
    """Refuse a sensitive change (STEP_UP_REQUIRED) unless `token` proves a recent second factor.

    Invariant: once a user has a usable method, their backup codes, methods and contacts only
    change (or show) with a verification_token issued for this user, to this API token, at
    the user's current credential epoch, less than step_up_seconds ago. A user with no usable
    method has no second factor to prove and needs none (first enrollment).
    """
    if not enabled or not policy.step_up_required:
        return
    valid = step_up.token_is_valid(
        keyring,
        token,
        user_id=user.user_id,
        actor=caller.actor,
        epoch=user.credential_epoch,
        now_ms=now,
        lifetime_ms=policy.step_up_seconds * 1000,
    )
    if not valid:
        raise FailedPrecondition(
            "STEP_UP_REQUIRED",
            "this change needs a fresh second factor: call Verify with the user's code "
            "and pass its verification_token",
            metadata={"user_id": user.user_id},
        )


def step_up_token(keyring: Keyring, user_id: str, epoch: int, caller: Caller, now: int) -> str:
    """A verification_token for a user who just passed their second factor."""
    return step_up.issue_token(keyring, user_id=user_id, actor=caller.actor, epoch=epoch, now_ms=now)


def refuse_if_locked(user: UserRecord, policy: PolicySettings, now: int) -> None:
    lock = lockout.lock_of(user.failed_attempts, user.locked_until, policy, now)
    if lock is not None:
        retry = None if lock.until_ms is None else (lock.until_ms - now) / 1000
        raise FailedPrecondition(
            "USER_LOCKED", "too many wrong codes; the user is locked out", retry_after=retry
        )


def count_failure(tx: Transaction, caller: Caller, user_id: str, policy: PolicySettings, now: int) -> int:
    """Count one more consecutive wrong code, locking the user past a threshold; return the count."""
    failures = store.add_failure(tx, user_id)
    locks, until = lock_after_failures(failures, policy, now)
    if locks:
        store.set_locked_until(tx, user_id, until)
        audit_lock(tx, caller, user_id, failures, until, policy, now)
    return failures


def lock_after_failures(failures: int, policy: PolicySettings, now: int) -> tuple[bool, int | None]:
    """Whether `failures` consecutive failures, counted now, lock the user, and until when
    (None with True: until an admin unlocks)."""
    until = lockout.locked_until_after(failures, policy, now)
    return until is not None or failures >= policy.max_consecutive_failures, until


def audit_lock(
    tx: Transaction,
    caller: Caller,
    user_id: str,
    failures: int,
    until: int | None,
    policy: PolicySettings,
    now: int,
) -> None:
    permanent = failures >= policy.max_consecutive_failures
    detail = "until unlocked" if permanent else f"{(until or now) - now} ms after {failures} failures"
    audit.record(tx, caller, now, user_id, "user_locked", detail=detail)
    metrics.lockout()


def user_state(
    user: UserRecord, methods: list[MethodRecord], backup_left: int, policy: PolicySettings, now: int
) -> UserState:
    return UserState(
        user_id=user.user_id,
        enabled_methods=tuple(m.method for m in methods if m.enabled),
        pending_methods=tuple(m.method for m in methods if m.pending),
        email=user.email or "",
        phone=user.phone or "",
        backup_codes_remaining=backup_left,
        failed_attempts=user.failed_attempts,
        lock=lockout.lock_of(user.failed_attempts, user.locked_until, policy, now),
        created_at_ms=user.created_at,
        last_verified_at_ms=user.last_verified_at,
    )


def load_state(tx: Transaction, user: UserRecord, policy: PolicySettings, now: int) -> UserState:
    methods = store.methods_of(tx, user.user_id)
    return user_state(user, methods, store.count_unused_backup_codes(tx, user.user_id), policy, now)


class UserProfiles:
    """GetStatus and SetContact."""

    def __init__(self, db: Database, keyring: Keyring, policy: PolicySettings, clock: Clock) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._clock = clock

    def get_status(self, user_id: str) -> UserState | None:
        """The user's methods, contacts and lock; None for a user never seen (not an error: not enrolled)."""
        with self._db.transaction() as tx:
            user = store.get_user(tx, user_id)
            return None if user is None else load_state(tx, user, self._policy, now_ms(self._clock))

    def set_contact(
        self,
        user_id: str,
        *,
        email: str | None,
        phone: str | None,
        verification_token: str,
        caller: Caller,
    ) -> UserState:
        """Set or clear (empty string) the email and phone; None leaves one as it is. Creates the user.

        Invariants: a stored email holds no control, format or unassigned character; a stored
        phone is a number valid in its country's numbering plan, in E.164 form, from an allowed
        country; for a user with a usable method this needs a step-up proof (require_step_up),
        and any change moves the credential epoch on.
        """
        if email and not contacts.is_valid_email(email):
            raise InvalidArgument(
                "INVALID_EMAIL", "email must be an address like ana@example.com, without control characters"
            )
        if phone:
            phone = contacts.normalized_phone(phone)
            if phone is None:
                raise InvalidArgument(
                    "INVALID_PHONE",
                    "phone must be a valid number with its country code, like +14155550123",
                )
            require_sms_country(phone, self._policy)
        now = now_ms(self._clock)
        with self._db.transaction() as tx:
            store.ensure_user(tx, user_id, now)
            user = existing_user(tx, user_id, lock=True)
            enabled = usable_methods(store.methods_of(tx, user_id), self._policy)
            require_step_up(self._keyring, self._policy, user, enabled, verification_token, caller, now)
            changed = []
            for column, value in (("email", email), ("phone", phone)):
                if value is not None:
                    store.set_contact(tx, user_id, column, value or None)
                    changed.append(column)
            if changed:
                audit.record(tx, caller, now, user_id, "contact_changed", detail=",".join(changed))
            return load_state(tx, existing_user(tx, user_id), self._policy, now)
