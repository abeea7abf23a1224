"""What every use case reads of a user (the row, the enabled methods, the lock), and the
user's own status and contacts (GetStatus, SetContact)."""

from __future__ import annotations

from twofactor_server.domain import contacts, lockout
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from twofactor_server.domain.models import Caller, UserState
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import MethodRecord, UserRecord
from twofactor_server.usecases import audit


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
    until = lockout.locked_until_after(failures, policy, now)
    permanent = failures >= policy.max_consecutive_failures
    if until is not None or permanent:
        store.set_locked_until(tx, user_id, until)
        detail = "until unlocked" if permanent else f"{(until or now) - now} ms after {failures} failures"
        audit.record(tx, caller, now, user_id, "user_locked", detail=detail)
        metrics.lockout()
    return failures


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

    def __init__(self, db: Database, policy: PolicySettings, clock: Clock) -> None:
        self._db = db
        self._policy = policy
        self._clock = clock

    def get_status(self, user_id: str) -> UserState | None:
        """The user's methods, contacts and lock; None for a user never seen (not an error: not enrolled)."""
        with self._db.transaction() as tx:
            user = store.get_user(tx, user_id)
            return None if user is None else load_state(tx, user, self._policy, now_ms(self._clock))

    def set_contact(self, user_id: str, *, email: str | None, phone: str | None, caller: Caller) -> UserState:
        """Set or clear (empty string) the email and phone; None leaves one as it is. Creates the user."""
        if email and not contacts.is_valid_email(email):
            raise InvalidArgument("INVALID_EMAIL", "email is not a valid address")
        if phone and not contacts.is_valid_phone(phone):
            raise InvalidArgument("INVALID_PHONE", "phone must be in E.164 form, like +14155550123")
        now = now_ms(self._clock)
        with self._db.transaction() as tx:
            store.ensure_user(tx, user_id, now)
            store.get_user(tx, user_id, lock=True)
            changed = []
            for column, value in (("email", email), ("phone", phone)):
                if value is not None:
                    store.set_contact(tx, user_id, column, value or None)
                    changed.append(column)
            if changed:
                audit.record(tx, caller, now, user_id, "contact_changed", detail=",".join(changed))
            return load_state(tx, existing_user(tx, user_id), self._policy, now)
