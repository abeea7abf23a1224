"""Codes sent by email or SMS: issuing one (limits, idempotency, superseding), reading its
delivery status, and checking a typed code against the newest live one."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection
from typing import Protocol

from twofactor_server.domain import one_time_codes
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.domain.models import Caller, ChallengeView
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import outbox, send_history, store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import ChallengeRecord, ChallengeStatus, NewChallenge
from twofactor_server.usecases import audit
from twofactor_server.usecases.sms_guard import give_back_sms_quota, take_sms_quota
from twofactor_server.usecases.users import refuse_if_locked, require_allowed, unknown_user

AUTHENTICATOR, EMAIL, SMS = "authenticator", "email", "sms"
LOGIN, ENROLLMENT, CONTACT = "login", "enrollment", "contact"
HOUR_MS = 3_600_000

log = logging.getLogger(__name__)
# The audit action of a send, by purpose.
_SEND_ACTIONS = {ENROLLMENT: "enrollment_started", CONTACT: "contact_change_started"}


class Dispatcher(Protocol):
    """Hands a committed challenge to delivery (a Celery queue, or the in-process runner)."""

    def dispatch(self, challenge_id: str, *, method: str = "") -> None:
        """Queue the delivery (`method`: the channel, which the in-process runner keeps apart);
        raise Unavailable when the queue can't be reached."""


def challenge_data(challenge_id: str, code: str) -> bytes:
    """What a challenge's code hash covers: the code bound to its challenge."""
    return f"{challenge_id}\0{code}".encode()


class Challenges:
    def __init__(
        self, db: Database, keyring: Keyring, policy: PolicySettings, dispatcher: Dispatcher, clock: Clock
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._policy = policy
        self._dispatcher = dispatcher
        self._clock = clock

    def send_code(
        self, user_id: str, method: str, *, idempotency_key: str, locale: str, caller: Caller
    ) -> ChallengeView:
        """Send a login code by email or SMS to a user who enabled that method."""
        if method == AUTHENTICATOR:
            raise FailedPrecondition(
                "METHOD_HAS_NO_CODE_TO_SEND",
                "authenticator codes come from the app; SendCode is for email and sms",
            )
        require_allowed(method, self._policy)
        return self.issue(
            user_id, method, LOGIN, idempotency_key=idempotency_key, locale=locale, caller=caller
        )

    def get_challenge(self, user_id: str, challenge_id: str) -> ChallengeView:
        """A challenge's delivery status, for its own user only."""
        with self._db.transaction() as tx:
            challenge = outbox.get_challenge(tx, challenge_id)
            if challenge is None or challenge.user_id != user_id:
                raise NotFound("CHALLENGE_NOT_FOUND", "no such challenge for this user")
            return self._view(tx, challenge)

    def issue(
        self,
        user_id: str,
        method: str,
        purpose: str,
        *,
        idempotency_key: str,
        locale: str,
        caller: Caller,
        new_destination: str | None = None,
        credential_epoch: int | None = None,
        authorize: Callable[[Transaction], bool] | None = None,
    ) -> ChallengeView:
        """Commit a new code for `purpose` and hand it to delivery: to the registered contact, or
        for purpose CONTACT to `new_destination`, the address it confirms, a change authorized at
        the user's `credential_epoch` (it lapses once the epoch moves on). For ENROLLMENT,
        `authorize` runs first under the user's row lock (the step-up rule: it raises to refuse)
        and says whether the start had a proof, which the pending enrollment records.

        Invariants: the send limits (the resend cooldown, per user and method; the hourly caps,
        per user and per destination, every method counted) are checked under the user's row
        lock and the destination's lock, so they hold exactly across concurrent calls and server
        processes; a repeated idempotency key within its
        window (for the same method) returns the first challenge and sends nothing; only a committed row is
        published, since the worker reads it back by id.

        A new code becomes live, and supersedes the user's older codes, only once its
        message is in the queue (a second short transaction). When the publish fails the
        send is void before the caller hears UNAVAILABLE: never delivered, counted toward
        no limit, and the user's previous code still works. If this process dies between
        the commit and that second transaction, the caller heard nothing: outbox recovery
        publishes the row after a grace and the code is delivered (delivery/recovery.py).
        """
        requested = now_ms(self._clock)
        policy = self._policy
        contact = "email" if method == EMAIL else "phone"
        with self._db.transaction() as tx:
            if purpose == ENROLLMENT:
                store.ensure_user(tx, user_id, requested)
            # The user's row, then the destination's lock: one round trip (outbox.lock_sender).
            sender = outbox.lock_sender(tx, user_id, contact, new_destination)
            if sender is None:
                raise unknown_user(user_id)
            destination = sender.destination
            with_proof = authorize(tx) if authorize is not None else False
            # The clock read again now that both locks are held: a send that committed while this
            # call waited for them is never "later" than this one, so a zero cooldown can't refuse
            # it as too soon, and created_at follows the order the locks gave the sends.
            now = now_ms(self._clock)
            # Read after both locks (a statement of its own: a snapshot taken after the waits).
            recent = send_history.recent_sends(
                tx, user_id, destination, since_ms=now - HOUR_MS, method=method
            )
            if purpose == LOGIN and not (recent.method_enabled and method in policy.allowed_methods):
                raise FailedPrecondition("METHOD_NOT_ENABLED", f"{method} is not enabled for this user")
            if not destination:
                raise FailedPrecondition(
                    "CONTACT_MISSING",
                    f"no {contact} is registered; call SetContact first",
                    metadata={"contact": contact},
                )
            if idempotency_key:
                earlier = outbox.challenge_by_idempotency_key(tx, user_id, idempotency_key)
                if (
                    earlier is not None
                    and earlier.method == method  # the key sent again for another method: a new request
                    and earlier.created_at > requested - policy.idempotency_window_seconds * 1000
                ):
                    return self._view(tx, earlier)
                if earlier is not None:
                    outbox.forget_idempotency_key(tx, earlier.challenge_id)
            refuse_if_locked(sender, policy, now)  # its codes would be refused until the lock ends
            self._enforce_send_limits(recent, now)
            if recent.last_ms is not None and now <= recent.last_ms:
                # The user's sends are in the order of their locks; their times say so too, one
                # millisecond apart at least, so "newest" (the code that counts) is never a tie.
                now = recent.last_ms + 1
            if method == SMS:
                take_sms_quota(tx, destination, policy, now)
            code = one_time_codes.new_code(policy.code_length)
            challenge_id = uuid.uuid4().hex
            action = _SEND_ACTIONS.get(purpose, "code_sent")
            outbox.insert_challenge(
                tx,
                NewChallenge(
                    challenge_id=challenge_id,
                    user_id=user_id,
                    method=method,
                    purpose=purpose,
                    destination=destination,
                    code_hash=self._keyring.keyed_hash(
                        challenge_data(challenge_id, code), purpose=CHALLENGE_CODE
                    ),
                    code_ciphertext=self._keyring.encrypt(
                        code.encode(), purpose=CHALLENGE_CODE, user_id=challenge_id
                    ),
                    idempotency_key=idempotency_key or None,
                    locale=locale or "en",
                    created_at=now,
                    expires_at=now + policy.code_ttl_seconds * 1000,
                    credential_epoch=credential_epoch if purpose == CONTACT else None,
                ),
                audit.event(caller, now, user_id, action, detail=method),
            )
            if purpose == ENROLLMENT:
                assert authorize is not None, "an enrollment is started only under the step-up rule"
                store.start_method_enrollment(tx, user_id, method, now, with_proof=with_proof)
        try:
            self._dispatcher.dispatch(challenge_id, method=method)
        except Unavailable:
            with self._db.transaction() as tx:
                voided = outbox.void_unpublished(tx, challenge_id, now_ms(self._clock))
                if voided and method == SMS:
                    give_back_sms_quota(tx, destination, policy, now)
            if voided:
                metrics.code_sent(method, "not_queued")
                raise
            # The message got through after all (a worker took it) or recovery published it.
            log.info("publish of %s reported failure, but its delivery is under way", challenge_id)
        metrics.code_sent(method, "queued")
        # PostgreSQL publishes in one statement, atomic by itself: no BEGIN and COMMIT around it.
        publishing = self._db.statements() if self._db.dialect == "postgres" else self._db.transaction()
        with publishing as tx:
            published = outbox.publish_new(tx, challenge_id, user_id, method, now_ms(self._clock))
            if published is not None:
                return self._view(tx, published[0], last_send=published[1])
            recorded = outbox.get_challenge(tx, challenge_id)  # recovery recorded the publish first
            assert recorded is not None
            return self._view(tx, recorded)

    def match(
        self, tx: Transaction, user_id: str, purpose: str, digits: str, now: int, *, method: str | None
    ) -> str | None:
        """The method of the newest live challenge if `digits` is its code, else None.

        Invariant: a code is accepted once (consumed by a conditional UPDATE), only the
        newest live code counts, and each wrong try counts against that code's attempts.
        """
        newest = self.newest_live(tx, user_id, purpose, now, method=method)
        return None if newest is None or not self.check(tx, newest, digits, now) else newest.method

    def newest_live(
        self,
        tx: Transaction,
        user_id: str,
        purpose: str,
        now: int,
        *,
        method: str | None,
        epoch: int | None = None,
    ) -> ChallengeRecord | None:
        """The newest code of `purpose` (and `method`) that can still be accepted; with `epoch`, the
        user's credential epoch now, of those authorized at it (a contact change)."""
        max_attempts = self._policy.max_attempts_per_code
        live = outbox.live_challenges(tx, user_id, purpose, now, max_attempts, epoch=epoch)
        return next((c for c in live if method is None or c.method == method), None)

    def pending_contact_changes(
        self, tx: Transaction, user_id: str, now: int, enabled: Collection[str], epoch: int
    ) -> tuple[ChallengeView, ...]:
        """The newest live contact-change code of each enabled method, as ConfirmContact would take it
        (a method turned off since has no contact change to confirm, nor has a change authorized
        before the user's credential epoch, `epoch`, last moved on)."""
        max_attempts = self._policy.max_attempts_per_code
        live = outbox.live_challenges(tx, user_id, CONTACT, now, max_attempts, epoch=epoch)
        # newest first in `live`: the last write wins
        newest = {c.method: c for c in reversed(live) if c.method in enabled}
        return tuple(self._view(tx, newest[m]) for m in sorted(newest))

    def check(self, tx: Transaction, challenge: ChallengeRecord, digits: str, now: int) -> bool:
        """Whether `digits` is the challenge's code; a right one is consumed (once), a wrong one
        counts against the code's attempts."""
        data = challenge_data(challenge.challenge_id, digits)
        if self._keyring.matches(challenge.code_hash, data, purpose=CHALLENGE_CODE):
            return outbox.consume_challenge(tx, challenge.challenge_id, now)
        # A wrong code, not a wrong key: the start-up check refused a key of this version other
        # than the one the database recorded (usecases/key_fingerprints.py).
        outbox.count_challenge_attempt(tx, challenge.challenge_id, now)
        return False

    def _enforce_send_limits(self, recent: send_history.RecentSends, now: int) -> None:
        policy = self._policy
        # The cooldown is the method's: "text me instead" after an email code goes out at once.
        last = recent.last_of_method_ms
        cooldown_ends = (last or 0) + policy.resend_cooldown_seconds * 1000
        # No cooldown set: none, though the last send's time may be a millisecond ahead (send()).
        if policy.resend_cooldown_seconds and last is not None and cooldown_ends > now:
            metrics.send_refused("RESEND_TOO_SOON")
            raise ResourceExhausted(
                "RESEND_TOO_SOON",
                "a code was sent by this method moments ago; wait, or ask for one by another method",
                retry_after=(cooldown_ends - now) / 1000,
            )
        if recent.to_user >= policy.sends_per_user_per_hour:
            metrics.send_refused("USER_SEND_LIMIT")
            raise ResourceExhausted(
                "USER_SEND_LIMIT",
                "too many codes sent to this user in the last hour",
                retry_after=HOUR_MS / 1000,
            )
        if recent.to_destination >= policy.sends_per_destination_per_hour:
            metrics.send_refused("DESTINATION_SEND_LIMIT")
            raise ResourceExhausted(
                "DESTINATION_SEND_LIMIT",
                "too many codes sent to this address in the last hour",
                retry_after=HOUR_MS / 1000,
            )

    def _view(
        self, tx: Transaction, challenge: ChallengeRecord | ChallengeStatus, *, last_send: int | None = None
    ) -> ChallengeView:
        status = challenge.delivery_status
        now = now_ms(self._clock)
        if status in ("queued", "sending") and challenge.expires_at <= now:
            status = "expired"
        elif status == "void":  # a send whose caller was told UNAVAILABLE: it will never be delivered
            status = "failed"
        if last_send is None:  # the cooldown of the challenge's method: the other's may be over
            last_send = send_history.last_send_ms(tx, challenge.user_id, challenge.method)
        last = last_send or challenge.created_at
        return ChallengeView(
            challenge_id=challenge.challenge_id,
            method=challenge.method,
            destination=challenge.destination,
            expires_at_ms=challenge.expires_at,
            resend_after_ms=last + self._policy.resend_cooldown_seconds * 1000,
            delivery_status=status,
            provider_message_id=challenge.provider_message_id or "",
            failure_reason=challenge.failure_reason or "",
            delivery_attempts=challenge.delivery_attempts,
        )
