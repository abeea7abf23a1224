"""Enrolling in a method (start, confirm with a first code) and disabling one."""

from __future__ import annotations

from collections.abc import Collection

from twofactor_server.domain import one_time_codes, qr_codes, totp
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument
from twofactor_server.domain.keyring import TOTP_SECRET, Keyring
from twofactor_server.domain.models import (
    AuthenticatorSetup,
    Caller,
    Confirmation,
    ConfirmResult,
    EnrollmentStart,
)
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import enrollments, store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import MethodRecord
from twofactor_server.usecases import audit
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import AUTHENTICATOR, EMAIL, ENROLLMENT, Challenges
from twofactor_server.usecases.notices import Notices, method_name
from twofactor_server.usecases.users import (
    existing_user,
    refuse_if_locked,
    require_allowed,
    require_step_up,
    step_up_token,
    usable_methods,
    wrong_confirmation_code,
)


class Enrollment:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        policy: PolicySettings,
        challenges: Challenges,
        backup_codes: BackupCodes,
        notices: Notices,
        clock: Clock,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._challenges = challenges
        self._backup_codes = backup_codes
        self._notices = notices
        self._clock = clock

    def start_enrollment(
        self,
        user_id: str,
        method: str,
        *,
        account_name: str,
        locale: str,
        verification_token: str,
        caller: Caller,
        qr_formats: Collection[str] = (),
    ) -> EnrollmentStart:
        """Begin enrolling: a new authenticator secret (pending until confirmed) with the QR code
        images in `qr_formats` (qr_codes.FORMATS; none by default, drawn after the commit), or a
        code sent by email or SMS. A pending enrollment replaces an earlier pending one of the
        same method.

        Invariant: a user who already has a usable method adds or replaces one only with a
        step-up proof (require_step_up); otherwise a caller could enroll its own second factor.
        """
        require_allowed(method, self._policy)
        qr_codes.require_known(qr_formats)

        def authorize(tx: Transaction) -> bool:
            # In the starting transaction, under the user's row lock: a method enabled a moment
            # ago is seen here, and the pending enrollment records whether this start had a proof.
            user = existing_user(tx, user_id, lock=True)  # a row Challenges.issue already holds
            enabled = usable_methods(store.methods_of(tx, user_id), self._policy)
            require_step_up(self._keyring, self._policy, user, enabled, verification_token, caller, now)
            return bool(enabled)

        now = now_ms(self._clock)
        if method != AUTHENTICATOR:
            challenge = self._challenges.issue(
                user_id,
                method,
                ENROLLMENT,
                idempotency_key="",
                locale=locale,
                caller=caller,
                authorize=authorize,
            )
            return EnrollmentStart(method, challenge=challenge)
        secret = totp.new_secret()
        with self._db.transaction() as tx:
            store.ensure_user(tx, user_id, now)
            with_proof = authorize(tx)
            sealed = self._keyring.encrypt(secret, purpose=TOTP_SECRET, user_id=user_id)
            store.start_method_enrollment(
                tx, user_id, method, now, with_proof=with_proof, pending_secret=sealed
            )
            audit.record(tx, caller, now, user_id, "enrollment_started", detail=method)
        uri = totp.provisioning_uri(secret, account_name=account_name or user_id, issuer=self._policy.issuer)
        images = qr_codes.qr_images(uri, qr_formats)
        setup = AuthenticatorSetup(totp.to_base32(secret), uri, qr_png=images.png, qr_svg=images.svg)
        return EnrollmentStart(method, authenticator=setup)

    def confirm_enrollment(self, user_id: str, method: str, code: str, *, caller: Caller) -> Confirmation:
        """Enable a pending method with its first code.

        Invariants: a wrong code counts toward the lockout like a wrong login code, and a
        locked user can't confirm; the first method enabled brings the first backup codes;
        the confirming authenticator code starts the secret's replay history, so it can't
        log in again (RFC 6238 §5.2). Enabling moves the credential epoch on and returns a
        step-up proof at the new epoch, so the new backup codes can be shown at once.
        """
        digits = one_time_codes.normalize(code)
        if digits is None:  # malformed whatever the state, the policy included
            raise InvalidArgument("INVALID_CODE", "code must be 6 to 10 digits")
        require_allowed(method, self._policy)
        now = now_ms(self._clock)
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            methods = store.methods_of(tx, user_id)
            enabled = usable_methods(methods, self._policy)
            pending = next((m for m in methods if m.method == method and m.pending), None)
            if pending is None:
                raise FailedPrecondition(
                    "NO_PENDING_ENROLLMENT", f"no {method} enrollment is pending; call StartEnrollment first"
                )
            if refusal := _stale_start(tx, pending, methods, user.credential_epoch, bool(enabled)):
                raise FailedPrecondition(
                    "NO_PENDING_ENROLLMENT",
                    f"the pending {method} enrollment {refusal}; call StartEnrollment again",
                )
            refuse_if_locked(user, self._policy, now)
            if method == AUTHENTICATOR:
                assert pending.pending_secret is not None
                secret = self._keyring.decrypt(pending.pending_secret, purpose=TOTP_SECRET, user_id=user_id)
                step = totp.matching_step(secret, digits, now / 1000) if len(digits) == totp.DIGITS else None
                ok = step is not None
            else:
                step = None
                sent = self._challenges.newest_live(tx, user_id, ENROLLMENT, now, method=method)
                if sent is None or sent.destination != (user.email if method == EMAIL else user.phone):
                    # The address changed since (at once: the method was not on yet), which withdrew
                    # the code, or the code expired: enable the method only for an address that
                    # received a live code.
                    raise FailedPrecondition(
                        "NO_PENDING_ENROLLMENT",
                        f"no live {method} enrollment code went to the registered address (it expired, "
                        "or the address changed); call StartEnrollment again",
                    )
                ok = self._challenges.match(tx, user_id, ENROLLMENT, digits, now, method=method) is not None
            if not ok:
                audit.record(
                    tx, caller, now, user_id, "enrollment_confirmed", outcome="failure", detail=method
                )
                return wrong_confirmation_code(tx, caller, user_id, enabled, self._policy, now, self._notices)
            # The same rows as enable_method, record_success, set_totp_step, replace_backup_codes and
            # two audit.record would write, in 5 statements instead of 9 and a read of the epoch.
            enrollments.enable_pending_method(tx, user_id, method, now)
            events = [audit.event(caller, now, user_id, "enrollment_confirmed", detail=method)]
            self._notices.add(tx, user.email, user_id, "method_added", now, method=method_name(method))
            codes: tuple[str, ...] = ()
            if not enabled:
                rows, codes = self._backup_codes.new_set(user_id)
                enrollments.store_backup_code_rows(tx, user_id, rows)
                events.append(
                    audit.event(caller, now, user_id, "backup_codes_generated", detail=f"{len(codes)} codes")
                )
            # The row lock makes the step's record race-free; the epoch moves on once for both changes.
            epoch = enrollments.confirm_user(tx, user_id, now, totp_step=step, new_backup_codes=bool(codes))
            enrollments.add_audit_events(tx, events)
            return Confirmation(
                ConfirmResult.CONFIRMED,
                tuple(sorted({*enabled, method})),  # methods_of's order
                backup_codes=codes,
                attempts_left=self._policy.lockout_threshold,
                verification_token=step_up_token(self._keyring, user_id, epoch, caller, now),
            )

    def disable_method(
        self, user_id: str, method: str, *, verification_token: str, caller: Caller
    ) -> tuple[str, ...]:
        """Turn a method off; return the methods left. With force-2FA the last one stays;
        with no method left the backup codes go too (nothing left for them to back up). A
        method the policy no longer allows is still left: allowed again, it verifies again.

        Invariant: only with a step-up proof (require_step_up)."""
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            methods = store.methods_of(tx, user_id)
            enabled = usable_methods(methods, self._policy)
            now = now_ms(self._clock)
            require_step_up(self._keyring, self._policy, user, enabled, verification_token, caller, now)
            if method not in enabled:
                raise FailedPrecondition("METHOD_NOT_ENABLED", f"{method} is not enabled for this user")
            remaining = tuple(m for m in enabled if m != method)
            if self._policy.force_two_factor and not remaining:
                raise FailedPrecondition(
                    "LAST_METHOD_REQUIRED",
                    "the policy requires two-factor authentication; "
                    "enable another method before disabling this one",
                )
            # Before the method goes: the notice is judged by the address as the method confirmed it
            # (Notices._over_the_cap); turning email off is what its owner most needs to hear of.
            self._notices.add(tx, user.email, user_id, "method_disabled", now, method=method_name(method))
            store.delete_method(tx, user_id, method)
            # Its codes in flight (a login's, a contact change's) stop working: enabled again
            # later, perhaps for another address, the method must not accept them.
            store.withdraw_codes_sent_elsewhere(tx, user_id, method, "", now)
            if not any(m.enabled and m.method != method for m in methods):
                store.delete_backup_codes(tx, user_id)
            audit.record(tx, caller, now, user_id, "method_disabled", detail=method)
            return remaining


def _stale_start(
    tx: Transaction, pending: MethodRecord, methods: list[MethodRecord], epoch: int, enrolled: bool
) -> str:
    """Why the user can't finish this pending enrollment ("" when they can); `enrolled`: whether
    they have a usable method now.

    One started when no method guarded the account had no step-up proof, and finishing it once
    one does must not step around it. One started with a proof no longer has it once the
    credential epoch moved on (a method, backup codes or a contact changed since), with or
    without a method left: its QR code, seen then, must not add an authenticator later (not
    even after the user turned their last method off). For a start the previous release wrote
    (nothing recorded), whether no method was enabled after it started, by the timestamps that
    release compared."""
    started = pending.pending_since or 0
    recorded = enrollments.enrollment_start(tx, pending.user_id, pending.method, started)
    if enrolled:  # with no usable method now, only a start with a proof can lapse
        if recorded is None:
            without_proof = any(m.enabled_at is not None and m.enabled_at > started for m in methods)
        else:
            without_proof = not recorded.with_proof
        if without_proof:
            return "was started before another method was enabled"
    if recorded is not None and recorded.with_proof and recorded.credential_epoch not in (None, epoch):
        return "was started before the account's methods, backup codes or contacts last changed"
    return ""
