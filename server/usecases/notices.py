"""Users hear about changes to their second factor: an email to their registered address for
each sensitive change (a method added or disabled, a contact changed, backup codes viewed or
regenerated, an admin reset, a lockout), so a change they did not make does not go unseen.

A notice is an outbox row (purpose 'notice') written in the transaction of the change it
reports: it is sent if and only if the change commits, by the same workers, retries and
recovery as a code. Its detail is sealed like a code and wiped once sent. It counts toward
no send limit and supersedes nothing; an address no email method confirmed gets a few an
hour (_over_the_cap). It is published once the transaction has committed;
a publish that fails is left to outbox recovery (delivery/recovery.py), never to the caller:
the change itself succeeded.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from twofactor_server.delivery.messages import NOTICES
from twofactor_server.domain import contacts
from twofactor_server.domain.clock import Clock, now_ms
from twofactor_server.domain.errors import Unavailable
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import outbox, store
from twofactor_server.storage.database import Database, Transaction
from twofactor_server.storage.records import NewChallenge

if TYPE_CHECKING:  # challenges imports users, which imports this module
    from twofactor_server.usecases.challenges import Dispatcher

log = logging.getLogger(__name__)

NOTICE = "notice"
# Delivery is retried for this long; a notice a day late still tells of the change.
NOTICE_LIFETIME_MS = 24 * 3_600_000
# Notices to an address that no enabled email method confirmed, per address and hour. Without a
# method on, SetContact applies at once and without step-up, so an account switched back and
# forth between someone else's address and its own would mail that address without end.
NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR = 10
HOUR_MS = 3_600_000
METHOD_NAMES = {"authenticator": "authenticator app", "email": "email code", "sms": "text message (SMS) code"}
CONTACT_NAMES = {"email": "email address", "phone": "mobile number"}


class Notices:
    def __init__(
        self, db: Database, keyring: Keyring, policy: PolicySettings, dispatcher: Dispatcher, clock: Clock
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._enabled = policy.notify_users
        self._dispatcher = dispatcher
        self._clock = clock

    def add(
        self, tx: Transaction, to: str | None, user_id: str, notice: str, now: int, **variables: str
    ) -> None:
        """Write a notice to address `to` in `tx`; it is published after commit. Nothing when
        notices are off (TWOFACTOR_NOTIFY_USERS=false) or the user has no email address."""
        if not self._enabled or not to:
            return
        if notice not in NOTICES:
            raise ValueError(f"unknown notice {notice!r}")
        if self._over_the_cap(tx, to, user_id, now):
            log.warning(
                "notice %s for user %s not sent: %s had %d notices in the last hour and no email method "
                "of this user confirmed it",
                notice,
                user_id,
                contacts.mask_email(to),
                NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR,
            )
            return
        notice_id = uuid.uuid4().hex
        detail = {**variables, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now / 1000))}
        outbox.insert_challenge(
            tx,
            NewChallenge(
                challenge_id=notice_id,
                user_id=user_id,
                method="email",
                purpose=NOTICE,
                destination=to,
                # No code: a keyed hash of the id itself, which no typed code can match.
                code_hash=self._keyring.keyed_hash(notice_id.encode(), purpose=CHALLENGE_CODE),
                code_ciphertext=self._keyring.encrypt(
                    json.dumps(detail).encode(), purpose=CHALLENGE_CODE, user_id=notice_id
                ),
                idempotency_key=None,
                locale="en",
                created_at=now,
                expires_at=now + NOTICE_LIFETIME_MS,
                notice=notice,
            ),
        )
        tx.after_commit(lambda: self._publish(notice_id, notice))

    def _over_the_cap(self, tx: Transaction, to: str, user_id: str, now: int) -> bool:
        """Whether `to` already had its hour's notices and no email method of this user confirmed it
        (a confirmed address hears of every change: a flood can't silence its owner's notices)."""
        if any(m.method == "email" and m.enabled for m in store.methods_of(tx, user_id)):
            return False
        # The address first, as a sender's (one lock per address until commit): accounts that share
        # it each counted the hour's last place at once, and each wrote a notice past the cap.
        outbox.lock_destination(tx, to)
        sent = store.count_notices_to(tx, to, since_ms=now - HOUR_MS)
        return sent >= NOTICES_PER_UNCONFIRMED_ADDRESS_PER_HOUR

    def _publish(self, notice_id: str, notice: str) -> None:
        # Queued once committed, whether this publish works or outbox recovery's later one does.
        metrics.notice_queued(notice)
        try:
            self._dispatcher.dispatch(notice_id)
            with self._db.transaction() as tx:
                challenge = outbox.get_challenge(tx, notice_id)
                if challenge is not None:
                    outbox.mark_published(tx, challenge, now_ms(self._clock))
        except Unavailable as error:  # the broker, or the database (StorageUnavailable)
            log.warning(
                "notice %s not published now (%s); outbox recovery sends it later", notice_id, error.reason
            )


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def lock_text(until_ms: int | None, now: int) -> str:
    if until_ms is None:
        return "until an administrator unlocks it"
    minutes = max(1, round((until_ms - now) / 60_000))
    return f"for {minutes} minute{'s' if minutes != 1 else ''}"
