"""What every use case reads of a user (the row, the enabled methods, the lock) and the rules
they share: step-up, counting wrong codes, the lockout."""

from __future__ import annotations

from twofactor_server.domain import lockout, step_up
from twofactor_server.domain.errors import FailedPrecondition, NotFound
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import Caller, Confirmation, ConfirmResult, UserState
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Transaction
from twofactor_server.storage.records import MethodRecord, Sender, UserRecord
from twofactor_server.usecases import audit
from twofactor_server.usecases.notices import Notices, lock_text


def existing_user(tx: Transaction, user_id: str, *, lock: bool = False) -> UserRecord:
    """The user's row (locked to the end of the transaction with lock=True); NOT_FOUND if unknown."""
    user = store.get_user(tx, user_id, lock=lock)
    if user is None:
        raise unknown_user(user_id)
    return user


def unknown_user(user_id: str) -> NotFound:
    return NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": user_id})


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


def refuse_if_locked(user: UserRecord | Sender, policy: PolicySettings, now: int) -> None:
    """USER_LOCKED while a lock holds: a code can't be checked then, so none is checked or sent."""
    lock = lockout.lock_of(user.failed_attempts, user.locked_until, policy, now)
    if lock is not None:
        retry = None if lock.until_ms is None else (lock.until_ms - now) / 1000
        raise FailedPrecondition(
            "USER_LOCKED", "too many wrong codes; the user is locked out", retry_after=retry
        )


def count_failure(
    tx: Transaction, caller: Caller, user_id: str, policy: PolicySettings, now: int, notices: Notices
) -> int:
    """Count one more consecutive wrong code, locking the user past a threshold; return the count."""
    failures = store.add_failure(tx, user_id)
    locks, until = lock_after_failures(failures, policy, now)
    if locks:
        store.set_locked_until(tx, user_id, until)
        audit_lock(tx, caller, user_id, failures, until, policy, now, notices)
    return failures


def wrong_confirmation_code(
    tx: Transaction,
    caller: Caller,
    user_id: str,
    enabled: tuple[str, ...],
    policy: PolicySettings,
    now: int,
    notices: Notices,
) -> Confirmation:
    """A wrong code confirming an enrollment or a new contact: counted toward the lockout like a
    wrong login code; REJECTED, or LOCKED when this one locked the user."""
    failures = count_failure(tx, caller, user_id, policy, now, notices)
    locked = lockout.lock_of(failures, lockout.locked_until_after(failures, policy, now), policy, now)
    return Confirmation(
        ConfirmResult.LOCKED if locked else ConfirmResult.REJECTED,
        enabled,
        attempts_left=lockout.attempts_left(failures, policy),
    )


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
    notices: Notices,
    *,
    lock_committed: bool = False,
) -> None:
    """Record that the user was just locked: audit, metric, and an email to the user."""
    permanent = failures >= policy.max_consecutive_failures
    detail = "until unlocked" if permanent else f"{(until or now) - now} ms after {failures} failures"
    audit.record(tx, caller, now, user_id, "user_locked", detail=detail)
    if lock_committed:  # by an earlier statement (a reserved attempt's count)
        metrics.lockout()
    else:  # with `tx`: a lock that doesn't commit locks no one
        tx.after_commit(metrics.lockout)
    user = store.get_user(tx, user_id)
    if user is not None:
        notices.add(
            tx, user.email, user_id, "locked_out", now, lock=lock_text(None if permanent else until, now)
        )


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
