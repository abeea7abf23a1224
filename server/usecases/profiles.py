"""The user's own status and contacts: GetStatus, SetContact and ConfirmContact.

A contact that an enabled method sends codes to is never replaced on the caller's word
alone: the new address gets a code (a challenge of purpose 'contact' whose destination is
the new address), the old one stays in force until that code is confirmed, and the old
email address is told once the change is made.
"""

from __future__ import annotations

from dataclasses import replace

from twofactor_server.domain import contacts, one_time_codes
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, InvalidArgument
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import (
    Caller,
    ChallengeView,
    ConfirmResult,
    ContactChange,
    ContactConfirmation,
    UserState,
)
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import outbox, store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import UserRecord
from twofactor_server.usecases import audit
from twofactor_server.usecases.challenges import CONTACT, EMAIL, SMS, Challenges
from twofactor_server.usecases.notices import CONTACT_NAMES, Notices
from twofactor_server.usecases.sms_guard import require_sms_country
from twofactor_server.usecases.users import (
    existing_user,
    load_state,
    refuse_if_locked,
    require_step_up,
    step_up_token,
    usable_methods,
    wrong_confirmation_code,
)

CONTACT_OF = {EMAIL: "email", SMS: "phone"}  # the method, and the contact its codes go to


class UserProfiles:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        policy: PolicySettings,
        challenges: Challenges,
        notices: Notices,
        clock: Clock,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._challenges = challenges
        self._notices = notices
        self._clock = clock

    def get_status(self, user_id: str) -> UserState | None:
        """The user's methods, contacts, lock and contact changes waiting for their code; None for a
        user never seen (not an error: not enrolled)."""
        now = now_ms(self._clock)
        with self._db.transaction(snapshot=True) as tx:  # the row, methods and codes of one moment
            user = store.get_user(tx, user_id)
            if user is None:
                return None
            state = load_state(tx, user, self._policy, now)
            # The methods ConfirmContact takes a code for: enabled and allowed by the policy.
            usable = tuple(m for m in state.enabled_methods if m in self._policy.allowed_methods)
            changes = self._challenges.pending_contact_changes(
                tx, user_id, now, usable, user.credential_epoch
            )
            return replace(state, contact_changes=changes)

    def set_contact(
        self,
        user_id: str,
        *,
        email: str | None,
        phone: str | None,
        locale: str = "en",
        verification_token: str,
        caller: Caller,
    ) -> ContactChange:
        """Set or clear (empty string) the email and phone; None leaves one as it is. Creates the user.

        Invariants: a stored email holds no control, format or unassigned character; a stored
        phone is a number valid in its country's numbering plan, in E.164 form, from an allowed
        country; for a user with a usable method this needs a step-up proof (require_step_up).
        The contact of an enabled method changes only through ConfirmContact (a code is sent
        to the new address) and can't be removed while the method is on; any other change
        applies at once, moves the credential epoch on and is told to the (old) email address.
        """
        email, phone = _valid_email(email), _valid_phone(phone, self._policy)
        now = now_ms(self._clock)
        with self._db.transaction() as tx:
            store.ensure_user(tx, user_id, now)
            user, to_confirm, at_once = self._plan(tx, user_id, email, phone, verification_token, caller, now)
            if not to_confirm:
                return ContactChange(self._apply_at_once(tx, user, at_once, caller, now), ())
        # The codes first: a refused send (a limit, the SMS quota) or one that can't be queued
        # leaves every contact as it was, so an error answer never hides an applied change.
        confirmations: list[ChallengeView] = []
        # A new email and a new phone in one call: two methods, each under its own cooldown.
        for method, destination in to_confirm:
            confirmations.append(
                self._challenges.issue(
                    user_id,
                    method,
                    CONTACT,
                    idempotency_key="",
                    locale=locale,
                    caller=caller,
                    new_destination=destination,
                    # The epoch the step-up rule was checked at: any credential change since, a
                    # reset among them, and the change can't be confirmed (ConfirmContact).
                    credential_epoch=user.credential_epoch,
                )
            )
        with self._db.transaction() as tx:
            # Planned again under the lock: only what is still a direct change applies (a method
            # enabled meanwhile keeps its address until a code confirms another).
            user, _, at_once = self._plan(tx, user_id, email, phone, verification_token, caller, now)
            state = self._apply_at_once(tx, user, at_once, caller, now)
            if at_once:  # this call's own changes moved the epoch on: its confirmations stay good
                started = tuple(c.challenge_id for c in confirmations)
                outbox.carry_contact_changes(tx, user_id, user.credential_epoch, only=started)
            return ContactChange(state, tuple(confirmations))

    def _apply_at_once(
        self, tx: Transaction, user: UserRecord, at_once: list[tuple[str, str]], caller: Caller, now: int
    ) -> UserState:
        """Set the contacts of methods that are off, each told to the (old) email address; the
        user's state after."""
        for method, value in at_once:
            column = CONTACT_OF[method]
            store.set_contact(tx, user.user_id, column, value or None)
            # Codes sent to the old address (an enrollment's, or a contact change made while the
            # method was on) stop working: whoever holds that mailbox or SIM can't use them.
            store.withdraw_codes_sent_elsewhere(tx, user.user_id, method, value or "", now)
            self._notices.add(
                tx,
                user.email,
                user.user_id,
                "contact_changed",
                now,
                contact=CONTACT_NAMES[column],
                new_value=_masked(column, value) or "removed",
            )
        if at_once:
            changed = ",".join(CONTACT_OF[method] for method, _ in at_once)
            audit.record(tx, caller, now, user.user_id, "contact_changed", detail=changed)
        return load_state(tx, existing_user(tx, user.user_id), self._policy, now)

    def _plan(
        self,
        tx: Transaction,
        user_id: str,
        email: str | None,
        phone: str | None,
        verification_token: str,
        caller: Caller,
        now: int,
    ) -> tuple[UserRecord, list[tuple[str, str]], list[tuple[str, str]]]:
        """Under the user's row lock, after the step-up rule: the user, the (method, new address)
        pairs that need a code first (the method is on), and those that apply at once."""
        user = existing_user(tx, user_id, lock=True)
        enabled = usable_methods(store.methods_of(tx, user_id), self._policy)
        require_step_up(self._keyring, self._policy, user, enabled, verification_token, caller, now)
        to_confirm: list[tuple[str, str]] = []
        at_once: list[tuple[str, str]] = []
        for method, value in ((EMAIL, email), (SMS, phone)):
            column = CONTACT_OF[method]
            if value is None or (value or None) == _stored_form(column, getattr(user, column)):
                continue
            if method in enabled and not value:
                raise FailedPrecondition(
                    "CONTACT_IN_USE",
                    f"the {column} receives this user's {method} codes; disable {method} first",
                    metadata={"contact": column},
                )
            (to_confirm if method in enabled else at_once).append((method, value))
        return user, to_confirm, at_once

    def confirm_contact(self, user_id: str, method: str, code: str, *, caller: Caller) -> ContactConfirmation:
        """Put the new address of a pending contact change in force with the code sent to it.

        Invariants: a wrong code counts toward the lockout like a wrong login code, and a
        locked user can't confirm; the change moves the credential epoch on, withdraws the
        codes sent to the old address, is audited and told to the old email address; the
        answer carries a step-up proof at the new epoch (the code just proved the user holds
        the new address).
        """
        if method not in CONTACT_OF:
            raise InvalidArgument("INVALID_METHOD", "ConfirmContact takes METHOD_EMAIL or METHOD_SMS")
        digits = one_time_codes.normalize(code)
        if digits is None:
            raise InvalidArgument("INVALID_CODE", "code must be 6 to 10 digits")
        column = CONTACT_OF[method]
        now = now_ms(self._clock)
        with self._db.transaction() as tx:
            user = existing_user(tx, user_id, lock=True)
            enabled = usable_methods(store.methods_of(tx, user_id), self._policy)
            refuse_if_locked(user, self._policy, now)
            # A contact change is for an enabled method's address: with the method turned off
            # since, the address is changed directly, and an older change must not come back.
            # Nor one authorized before the credentials last changed (a reset, a method turned
            # off or on, new backup codes, another contact): its step-up proof is spent.
            pending = (
                self._challenges.newest_live(
                    tx, user_id, CONTACT, now, method=method, epoch=user.credential_epoch
                )
                if method in enabled
                else None
            )
            if pending is None:
                raise FailedPrecondition(
                    "NO_PENDING_CONTACT_CHANGE",
                    f"no change of {column} is waiting for its code; call SetContact first",
                    metadata={"contact": column},
                )
            if not self._challenges.check(tx, pending, digits, now):
                audit.record(tx, caller, now, user_id, "contact_confirmed", outcome="failure", detail=column)
                wrong = wrong_confirmation_code(
                    tx, caller, user_id, enabled, self._policy, now, self._notices
                )
                state = load_state(tx, existing_user(tx, user_id), self._policy, now)
                return ContactConfirmation(wrong.result, state, attempts_left=wrong.attempts_left)
            store.set_contact(tx, user_id, column, pending.destination)
            # The other method's change authorized with this one (one SetContact may start both)
            # is not lapsed by the epoch this confirmation moves on.
            outbox.carry_contact_changes(tx, user_id, user.credential_epoch)
            store.withdraw_codes_sent_elsewhere(tx, user_id, method, pending.destination, now)
            store.record_success(tx, user_id, now)
            audit.record(tx, caller, now, user_id, "contact_changed", detail=f"{column} confirmed")
            self._notices.add(
                tx,
                user.email,  # the old address, when the email is what changed
                user_id,
                "contact_changed",
                now,
                contact=CONTACT_NAMES[column],
                new_value=_masked(column, pending.destination),
            )
            changed = existing_user(tx, user_id)
            return ContactConfirmation(
                ConfirmResult.CONFIRMED,
                load_state(tx, changed, self._policy, now),
                attempts_left=self._policy.lockout_threshold,
                verification_token=step_up_token(
                    self._keyring, user_id, changed.credential_epoch, caller, now
                ),
            )


def _valid_email(email: str | None) -> str | None:
    """The address in its stored form (contacts.normalized_email: NFC, lower case), or None/empty
    as given; refused unless it is a plain local@domain address."""
    if not email:
        return email
    normalized = contacts.normalized_email(email)
    if normalized is None:
        raise InvalidArgument(
            "INVALID_EMAIL", "email must be an address like ana@example.com, without control characters"
        )
    return normalized


def _valid_phone(phone: str | None, policy: PolicySettings) -> str | None:
    """The number in E.164 form (or None/empty as given); refused when invalid or from a
    country the SMS guard does not allow."""
    if not phone:
        return phone
    normalized = contacts.normalized_phone(phone)
    if normalized is None:
        raise InvalidArgument(
            "INVALID_PHONE", "phone must be a mobile number with its country code, like +14155550123"
        )
    require_sms_country(normalized, policy)
    return normalized


def _masked(column: str, value: str) -> str:
    if not value:
        return ""
    return contacts.mask_email(value) if column == "email" else contacts.mask_phone(value)


def _stored_form(column: str, value: str | None) -> str | None:
    """A stored contact as a new one is stored now: an email from before addresses were kept in
    lower case (migration 0010 folds ASCII; this, any case) compares equal to the same address."""
    if column != "email" or not value:
        return value
    return contacts.normalized_email(value) or value
