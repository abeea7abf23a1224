"""The use cases of TwoFactorService: enrollment, codes, verification, backup codes.

Each public method is one transaction. Rules that must hold under concurrency
(a code accepted once, a step never replayed) rest on the user's row lock and
on conditional UPDATEs in server/storage/store.py.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from twofactor_server.domain import audit, backup_codes, contacts, lockout, one_time_codes, qr_codes, totp
from twofactor_server.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import (
    AuthenticatorSetup,
    BackupCodeSet,
    Caller,
    ChallengeView,
    CodeKind,
    Confirmation,
    EnrollmentStart,
    Lock,
    UserState,
    VerifyOutcome,
    VerifyResult,
)
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Database, Row, Transaction

log = logging.getLogger(__name__)

AUTHENTICATOR, EMAIL, SMS = "authenticator", "email", "sms"
HOUR_MS = 3_600_000
# Purposes bind each ciphertext and hash to what it is for (keyring associated data).
TOTP_SECRET = "totp_secret"  # noqa: S105 - a purpose label, not a secret
BACKUP_CODE = "backup_code"
CHALLENGE_CODE = "challenge_code"


class Dispatcher(Protocol):
    """Hands a committed challenge to the delivery workers."""

    def dispatch(self, challenge_id: str) -> None:
        """Queue the delivery; raise Unavailable when the queue can't be reached."""


class TwoFactor:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        policy: PolicySettings,
        dispatcher: Dispatcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._dispatcher = dispatcher
        self._clock = clock

    # ---- status and contacts ------------------------------------------------

    def get_status(self, user_id: str) -> UserState | None:
        with self._db.transaction() as tx:
            return self._state(tx, user_id)

    def set_contact(self, user_id: str, *, email: str | None, phone: str | None, caller: Caller) -> UserState:
        if email and not contacts.is_valid_email(email):
            raise InvalidArgument("INVALID_EMAIL", "email is not a valid address")
        if phone and not contacts.is_valid_phone(phone):
            raise InvalidArgument("INVALID_PHONE", "phone must be in E.164 form, like +14155550123")
        now = self._now_ms()
        with self._db.transaction() as tx:
            store.ensure_user(tx, user_id, now)
            store.get_user(tx, user_id, lock=True)
            changed = []
            for column, value in (("email", email), ("phone", phone)):
                if value is not None:
                    store.set_contact(tx, user_id, column, value or None)
                    changed.append(column)
            if changed:
                self._audit(tx, caller, user_id, "contact_changed", detail=",".join(changed))
            state = self._state(tx, user_id)
            assert state is not None
            return state

    # ---- enrollment -----------------------------------------------------------

    def start_enrollment(
        self, user_id: str, method: str, *, account_name: str, locale: str, caller: Caller
    ) -> EnrollmentStart:
        self._require_allowed(method)
        now = self._now_ms()
        if method == AUTHENTICATOR:
            secret = totp.new_secret()
            with self._db.transaction() as tx:
                store.ensure_user(tx, user_id, now)
                store.get_user(tx, user_id, lock=True)
                sealed = self._keyring.encrypt(secret, purpose=TOTP_SECRET, user_id=user_id)
                store.start_method_enrollment(tx, user_id, method, now, pending_secret=sealed)
                self._audit(tx, caller, user_id, "enrollment_started", detail=method)
            uri = totp.provisioning_uri(
                secret, account_name=account_name or user_id, issuer=self._policy.issuer
            )
            setup = AuthenticatorSetup(
                totp.to_base32(secret), uri, qr_codes.qr_png(uri), qr_codes.qr_svg(uri)
            )
            return EnrollmentStart(method, authenticator=setup)
        challenge = self._send(
            user_id, method, "enrollment", idempotency_key="", locale=locale, caller=caller
        )
        return EnrollmentStart(method, challenge=challenge)

    def confirm_enrollment(self, user_id: str, method: str, code: str, *, caller: Caller) -> Confirmation:
        self._require_allowed(method)
        digits = _digits_or_raise(code)
        now = self._now_ms()
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            methods = store.methods_of(tx, user_id)
            enabled = tuple(m["method"] for m in self._enabled_rows(methods))
            row = next((m for m in methods if m["method"] == method), None)
            if row is None or row["pending_since"] is None:
                raise FailedPrecondition(
                    "NO_PENDING_ENROLLMENT", f"no {method} enrollment is pending; call StartEnrollment first"
                )
            self._refuse_if_locked(user, now)
            if method == AUTHENTICATOR:
                secret = self._keyring.decrypt(row["pending_secret"], purpose=TOTP_SECRET, user_id=user_id)
                step = totp.matching_step(secret, digits, now / 1000) if len(digits) == totp.DIGITS else None
                ok = step is not None
                if ok:
                    # A new secret starts a new history; the confirming code must not work
                    # again at login (RFC 6238 §5.2). The row lock makes this race-free.
                    store.set_totp_step(tx, user_id, step)
            else:
                ok = self._match_challenge(tx, user_id, "enrollment", digits, now, method=method) is not None
            if not ok:
                failures = self._count_failure(tx, caller, user_id, now)
                self._audit(tx, caller, user_id, "enrollment_confirmed", outcome="failure", detail=method)
                return Confirmation(
                    False,
                    enabled,
                    attempts_left=lockout.attempts_left(failures, self._policy),
                )
            first_method = not enabled
            store.enable_method(tx, user_id, method, now)
            store.record_success(tx, user_id, now)
            self._audit(tx, caller, user_id, "enrollment_confirmed", detail=method)
            codes: tuple[str, ...] = ()
            if first_method:
                codes = self._replace_backup_codes(tx, user_id, now)
                self._audit(tx, caller, user_id, "backup_codes_generated", detail=f"{len(codes)} codes")
            return Confirmation(
                True,
                tuple(sorted({*enabled, method})),  # methods_of's order
                backup_codes=codes,
                attempts_left=self._policy.lockout_threshold,
            )

    def disable_method(self, user_id: str, method: str, *, caller: Caller) -> tuple[str, ...]:
        with self._db.transaction() as tx:
            existing_user(tx, user_id, lock=True)
            enabled = self._enabled(tx, user_id)
            if method not in enabled:
                raise FailedPrecondition("METHOD_NOT_ENABLED", f"{method} is not enabled for this user")
            remaining = tuple(m for m in enabled if m != method)
            if self._policy.force_two_factor and not remaining:
                raise FailedPrecondition(
                    "LAST_METHOD_REQUIRED",
                    "the policy requires two-factor authentication; "
                    "enable another method before disabling this one",
                )
            store.delete_method(tx, user_id, method)
            if not remaining:
                # With no method left there is no second factor to recover; the codes go too.
                store.delete_backup_codes(tx, user_id)
            self._audit(tx, caller, user_id, "method_disabled", detail=method)
            return remaining

    # ---- codes by email and SMS ----------------------------------------------

    def send_code(
        self, user_id: str, method: str, *, idempotency_key: str, locale: str, caller: Caller
    ) -> ChallengeView:
        if method == AUTHENTICATOR:
            raise FailedPrecondition(
                "METHOD_HAS_NO_CODE_TO_SEND",
                "authenticator codes come from the app; SendCode is for email and sms",
            )
        self._require_allowed(method)
        return self._send(
            user_id, method, "login", idempotency_key=idempotency_key, locale=locale, caller=caller
        )

    def get_challenge(self, user_id: str, challenge_id: str) -> ChallengeView:
        with self._db.transaction() as tx:
            row = store.get_challenge(tx, challenge_id)
            if row is None or row["user_id"] != user_id:
                raise NotFound("CHALLENGE_NOT_FOUND", "no such challenge for this user")
            return self._challenge_view(tx, row)

    def _send(
        self, user_id: str, method: str, purpose: str, *, idempotency_key: str, locale: str, caller: Caller
    ) -> ChallengeView:
        now = self._now_ms()
        policy = self._policy
        with self._db.transaction() as tx:
            if purpose == "enrollment":
                store.ensure_user(tx, user_id, now)
            user = existing_user(tx, user_id, lock=True)
            if purpose == "login" and method not in self._enabled(tx, user_id):
                raise FailedPrecondition("METHOD_NOT_ENABLED", f"{method} is not enabled for this user")
            destination = user[EMAIL if method == EMAIL else "phone"]
            if not destination:
                contact = "email" if method == EMAIL else "phone"
                raise FailedPrecondition(
                    "CONTACT_MISSING",
                    f"no {contact} is registered; call SetContact first",
                    metadata={"contact": contact},
                )
            if idempotency_key:
                earlier = store.challenge_by_idempotency_key(tx, user_id, idempotency_key)
                if (
                    earlier is not None
                    and earlier["created_at"] > now - policy.idempotency_window_seconds * 1000
                ):
                    return self._challenge_view(tx, earlier)
                if earlier is not None:
                    store.forget_idempotency_key(tx, earlier["challenge_id"])
            self._enforce_send_limits(tx, user_id, destination, now)
            code = one_time_codes.new_code(policy.code_length)
            challenge_id = uuid.uuid4().hex
            store.supersede_challenges(tx, user_id, purpose, method if purpose == "enrollment" else None, now)
            store.insert_challenge(
                tx,
                challenge_id=challenge_id,
                user_id=user_id,
                method=method,
                purpose=purpose,
                destination=destination,
                code_hash=self._keyring.keyed_hash(
                    _challenge_data(challenge_id, code), purpose=CHALLENGE_CODE
                ),
                code_ciphertext=self._keyring.encrypt(
                    code.encode(), purpose=CHALLENGE_CODE, user_id=challenge_id
                ),
                idempotency_key=idempotency_key or None,
                locale=locale or "en",
                created_at=now,
                expires_at=now + policy.code_ttl_seconds * 1000,
                delivery_status="queued",
                updated_at=now,
            )
            if purpose == "enrollment":
                store.start_method_enrollment(tx, user_id, method, now)
                self._audit(tx, caller, user_id, "enrollment_started", detail=method)
            else:
                self._audit(tx, caller, user_id, "code_sent", detail=method)
        # Only a committed row may be queued: the worker reads it back by id.
        try:
            self._dispatcher.dispatch(challenge_id)
        except Unavailable:
            with self._db.transaction() as tx:
                store.mark_delivery(
                    tx,
                    challenge_id,
                    "failed",
                    self._now_ms(),
                    failure_reason="not queued: broker unavailable",
                    wipe_code=True,
                )
                store.forget_idempotency_key(tx, challenge_id)
            raise
        with self._db.transaction() as tx:
            row = store.get_challenge(tx, challenge_id)
            assert row is not None
            return self._challenge_view(tx, row)

    def _enforce_send_limits(self, tx: Transaction, user_id: str, destination: str, now: int) -> None:
        policy = self._policy
        last = store.last_send_ms(tx, user_id)
        cooldown_ends = (last or 0) + policy.resend_cooldown_seconds * 1000
        if last is not None and cooldown_ends > now:
            raise ResourceExhausted(
                "RESEND_TOO_SOON",
                "a code was sent moments ago; wait before sending another",
                retry_after=(cooldown_ends - now) / 1000,
            )
        hour_ago = now - HOUR_MS
        if store.count_sends_since(tx, since_ms=hour_ago, user_id=user_id) >= policy.sends_per_user_per_hour:
            raise ResourceExhausted(
                "USER_SEND_LIMIT",
                "too many codes sent to this user in the last hour",
                retry_after=HOUR_MS / 1000,
            )
        if (
            store.count_sends_since(tx, since_ms=hour_ago, destination=destination)
            >= policy.sends_per_destination_per_hour
        ):
            raise ResourceExhausted(
                "DESTINATION_SEND_LIMIT",
                "too many codes sent to this address in the last hour",
                retry_after=HOUR_MS / 1000,
            )

    # ---- verification ------------------------------------------------------------

    def verify(self, user_id: str, code: str, *, caller: Caller) -> VerifyOutcome:
        digits = one_time_codes.normalize(code)
        backup = backup_codes.normalize(code)
        if digits is None and backup is None:
            raise InvalidArgument(
                "INVALID_CODE", "code must be 6 to 10 digits or a backup code like k7m2q-x9p4w"
            )
        now = self._now_ms()
        if digits is not None and len(digits) == totp.DIGITS:
            accepted = self._accept_authenticator_code(user_id, digits, now)
            if accepted is not None:
                return accepted
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            methods = {m["method"]: m for m in self._enabled_rows(store.methods_of(tx, user_id))}
            if not methods:
                raise FailedPrecondition("NOT_ENROLLED", "the user has no second-factor method enabled")
            lock = self._lock_of(user, now)
            if lock is not None:
                return self._outcome(
                    tx, user_id, VerifyResult.LOCKED, None, user["failed_attempts"], lock, now
                )
            matched = None
            if digits is not None:
                if AUTHENTICATOR in methods and len(digits) == totp.DIGITS:
                    secret = self._keyring.decrypt(
                        methods[AUTHENTICATOR]["secret"], purpose=TOTP_SECRET, user_id=user_id
                    )
                    step = totp.matching_step(secret, digits, now / 1000)
                    if step is not None and store.advance_totp_step(tx, user_id, step):
                        matched = CodeKind.AUTHENTICATOR
                if matched is None and (EMAIL in methods or SMS in methods):
                    kind = self._match_challenge(tx, user_id, "login", digits, now, method=None)
                    if kind in methods:
                        matched = CodeKind(kind)
            if matched is None and backup is not None and self._use_backup_code(tx, user_id, backup, now):
                matched = CodeKind.BACKUP_CODE
                self._audit(tx, caller, user_id, "backup_code_used")
            if matched is not None:
                store.record_success(tx, user_id, now)
                return self._outcome(tx, user_id, VerifyResult.ACCEPTED, matched, 0, None, now)
            failures = self._count_failure(tx, caller, user_id, now)
            lock = self._lock_of(
                {"failed_attempts": failures, "locked_until": self._lock_until(failures, now)}, now
            )
            result = VerifyResult.LOCKED if lock is not None else VerifyResult.REJECTED
            return self._outcome(tx, user_id, result, None, failures, lock, now)

    def _accept_authenticator_code(self, user_id: str, digits: str, now: int) -> VerifyOutcome | None:
        """The common login, a right authenticator code, in two statements and no transaction.

        None hands the call to the locking path in verify(), which gives every other
        answer (unknown user, lockout, replay, a wrong code counted as a failure).
        """
        if AUTHENTICATOR not in self._policy.allowed_methods:
            return None
        with self._db.statements() as q:
            rows = store.verify_snapshot(q, user_id)
            sealed = next((r["secret"] for r in rows if r["method"] == AUTHENTICATOR), None)
            if sealed is None or self._lock_of(rows[0], now) is not None:
                return None
            secret = self._keyring.decrypt(sealed, purpose=TOTP_SECRET, user_id=user_id)
            step = totp.matching_step(secret, digits, now / 1000)
            if step is None:
                return None
            left = store.accept_totp_step(
                q, user_id, step, sealed, now, self._policy.max_consecutive_failures
            )
        if left is None:
            return None
        return VerifyOutcome(
            result=VerifyResult.ACCEPTED,
            matched=CodeKind.AUTHENTICATOR,
            attempts_left=lockout.attempts_left(0, self._policy),
            backup_codes_remaining=left,
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
        return VerifyOutcome(
            result=result,
            matched=matched,
            attempts_left=lockout.attempts_left(failures, self._policy),
            backup_codes_remaining=store.count_unused_backup_codes(tx, user_id),
            lock=lock,
            now_ms=now,
        )

    def _match_challenge(
        self, tx: Transaction, user_id: str, purpose: str, digits: str, now: int, *, method: str | None
    ) -> str | None:
        """The method of the newest live challenge if `digits` is its code (consumed now), else None."""
        live = store.live_challenges(tx, user_id, purpose, now, self._policy.max_attempts_per_code)
        newest = next((c for c in live if method is None or c["method"] == method), None)
        if newest is None:
            return None
        data = _challenge_data(newest["challenge_id"], digits)
        if self._keyring.matches(newest["code_hash"], data, purpose=CHALLENGE_CODE):
            if store.consume_challenge(tx, newest["challenge_id"], now):
                return str(newest["method"])
            return None
        store.count_challenge_attempt(tx, newest["challenge_id"], now)
        return None

    def _use_backup_code(self, tx: Transaction, user_id: str, code: str, now: int) -> bool:
        data = _backup_code_data(user_id, code)
        for row in store.unused_backup_codes(tx, user_id):
            if self._keyring.matches(row["code_hash"], data, purpose=BACKUP_CODE):
                return store.use_backup_code(tx, user_id, row["position"], now)
        return False

    # ---- backup codes ------------------------------------------------------------

    def get_backup_codes(self, user_id: str) -> BackupCodeSet:
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id)
            self._require_enrolled(tx, user_id)
            codes = tuple(
                backup_codes.display(
                    self._keyring.decrypt(
                        row["code_ciphertext"], purpose=BACKUP_CODE, user_id=user_id
                    ).decode()
                )
                for row in store.unused_backup_codes(tx, user_id)
            )
            return BackupCodeSet(codes, user["backup_codes_generated_at"])

    def regenerate_backup_codes(self, user_id: str, *, caller: Caller) -> BackupCodeSet:
        now = self._now_ms()
        with self._db.transaction() as tx:
            existing_user(tx, user_id, lock=True)
            self._require_enrolled(tx, user_id)
            codes = self._replace_backup_codes(tx, user_id, now)
            self._audit(tx, caller, user_id, "backup_codes_regenerated", detail=f"{len(codes)} codes")
            return BackupCodeSet(codes, now)

    def _replace_backup_codes(self, tx: Transaction, user_id: str, now: int) -> tuple[str, ...]:
        codes = backup_codes.new_codes(self._policy.backup_code_count)
        rows = [
            (
                self._keyring.keyed_hash(_backup_code_data(user_id, code), purpose=BACKUP_CODE),
                self._keyring.encrypt(code.encode(), purpose=BACKUP_CODE, user_id=user_id),
            )
            for code in codes
        ]
        store.replace_backup_codes(tx, user_id, rows, now)
        return tuple(backup_codes.display(code) for code in codes)

    # ---- shared helpers ----------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _require_allowed(self, method: str) -> None:
        if method not in self._policy.allowed_methods:
            raise FailedPrecondition(
                "METHOD_NOT_ALLOWED", f"the policy does not allow {method}", metadata={"method": method}
            )

    def _require_enrolled(self, tx: Transaction, user_id: str) -> None:
        if not self._enabled(tx, user_id):
            raise FailedPrecondition("NOT_ENROLLED", "the user has no second-factor method enabled")

    def _enabled_rows(self, methods: list[Row]) -> list[Row]:
        """Of a user's method rows, the enabled ones the policy still allows."""
        allowed = self._policy.allowed_methods
        return [m for m in methods if m["enabled_at"] is not None and m["method"] in allowed]

    def _enabled(self, tx: Transaction, user_id: str) -> tuple[str, ...]:
        return tuple(m["method"] for m in self._enabled_rows(store.methods_of(tx, user_id)))

    def _lock_until(self, failures: int, now: int) -> int | None:
        seconds = lockout.lock_seconds(failures, self._policy)
        return None if seconds is None or seconds == 0 else now + int(seconds * 1000)

    def _lock_of(self, user: Row, now: int) -> Lock | None:
        if user["failed_attempts"] >= self._policy.max_consecutive_failures:
            return Lock(None, permanent=True)
        until = user["locked_until"]
        return Lock(until) if until is not None and until > now else None

    def _refuse_if_locked(self, user: Row, now: int) -> None:
        lock = self._lock_of(user, now)
        if lock is not None:
            retry = None if lock.until_ms is None else (lock.until_ms - now) / 1000
            raise FailedPrecondition(
                "USER_LOCKED", "too many wrong codes; the user is locked out", retry_after=retry
            )

    def _count_failure(self, tx: Transaction, caller: Caller, user_id: str, now: int) -> int:
        failures = store.add_failure(tx, user_id)
        until = self._lock_until(failures, now)
        permanent = failures >= self._policy.max_consecutive_failures
        if until is not None or permanent:
            store.set_locked_until(tx, user_id, until)
            detail = "until unlocked" if permanent else f"{(until or now) - now} ms after {failures} failures"
            self._audit(tx, caller, user_id, "user_locked", detail=detail)
        return failures

    def _state(self, tx: Transaction, user_id: str) -> UserState | None:
        user = store.get_user(tx, user_id)
        return None if user is None else load_state(tx, user, self._policy, self._now_ms())

    def _challenge_view(self, tx: Transaction, row: Row) -> ChallengeView:
        status = row["delivery_status"]
        now = self._now_ms()
        if status in ("queued", "sending") and row["expires_at"] <= now:
            status = "expired"
        last = store.last_send_ms(tx, row["user_id"]) or row["created_at"]
        return ChallengeView(
            challenge_id=row["challenge_id"],
            method=row["method"],
            destination=row["destination"],
            expires_at_ms=row["expires_at"],
            resend_after_ms=last + self._policy.resend_cooldown_seconds * 1000,
            delivery_status=status,
            provider_message_id=row["provider_message_id"] or "",
            failure_reason=row["failure_reason"] or "",
            delivery_attempts=row["delivery_attempts"],
        )

    def _audit(
        self,
        tx: Transaction,
        caller: Caller,
        user_id: str,
        action: str,
        *,
        outcome: str = "success",
        detail: str = "",
    ) -> None:
        audit.record(tx, caller, self._now_ms(), user_id, action, outcome=outcome, detail=detail)


def existing_user(tx: Transaction, user_id: str, *, lock: bool = False) -> Row:
    """The user's row (locked to the end of the transaction with lock=True); NOT_FOUND if unknown."""
    user = store.get_user(tx, user_id, lock=lock)
    if user is None:
        raise NotFound("USER_NOT_FOUND", "no such user", metadata={"user_id": user_id})
    return user


def load_state(tx: Transaction, user: Row, policy: PolicySettings, now: int) -> UserState:
    user_id = user["user_id"]
    return user_state(
        user, store.methods_of(tx, user_id), store.count_unused_backup_codes(tx, user_id), policy, now
    )


def user_state(
    user: Row, methods: list[Row], backup_left: int, policy: PolicySettings, now: int
) -> UserState:
    permanent = user["failed_attempts"] >= policy.max_consecutive_failures
    until = user["locked_until"]
    lock = Lock(None, True) if permanent else (Lock(until) if until is not None and until > now else None)
    return UserState(
        user_id=user["user_id"],
        enabled_methods=tuple(m["method"] for m in methods if m["enabled_at"] is not None),
        pending_methods=tuple(m["method"] for m in methods if m["pending_since"] is not None),
        email=user["email"] or "",
        phone=user["phone"] or "",
        backup_codes_remaining=backup_left,
        failed_attempts=user["failed_attempts"],
        lock=lock,
        created_at_ms=user["created_at"],
        last_verified_at_ms=user["last_verified_at"],
    )


def _digits_or_raise(code: str) -> str:
    digits = one_time_codes.normalize(code)
    if digits is None:
        raise InvalidArgument("INVALID_CODE", "code must be 6 to 10 digits")
    return digits


def _challenge_data(challenge_id: str, code: str) -> bytes:
    return f"{challenge_id}\0{code}".encode()


def _backup_code_data(user_id: str, code: str) -> bytes:
    return f"{user_id}\0{code}".encode()
