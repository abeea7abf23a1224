"""One delivery attempt of a challenge's code: claim the outbox row under a lease, send, record.

Safe to run twice: only a message of the row's current generation claims it,
only one worker holds its lease at a time, and a challenge already sent,
failed, expired, void or unknown is a no-op. Any error is retried with
backoff until the code would expire first: a provider's transient error, a
template or key that won't load, storage that is down. The row ends SENT,
FAILED (with the reason) or EXPIRED; none is left claimed, because the lease
runs out and recovery publishes it again (delivery/recovery.py).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
import traceback
from dataclasses import dataclass

from twofactor_server.delivery.messages import render_email, render_notice, render_sms
from twofactor_server.delivery.providers import (
    EmailMessage,
    EmailSender,
    PermanentDeliveryError,
    SmsMessage,
    SmsSender,
    TransientDeliveryError,
)
from twofactor_server.delivery.providers.base import provider_message_id_text
from twofactor_server.domain import contacts
from twofactor_server.domain.clock import Clock, now_ms, system_clock
from twofactor_server.domain.errors import StorageUnavailable
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.observability import logs, metrics
from twofactor_server.storage import outbox
from twofactor_server.storage.database import Database
from twofactor_server.storage.records import ChallengeRecord

log = logging.getLogger(__name__)
# Jitter from a generator of our own: the global one belongs to the embedding program (and tests).
_jitter = random.Random()  # noqa: S311 - jitter, not a secret

RETRY_MAX_SECONDS = 60.0
# Recording a send that happened: tried again at most this far apart, and given up this long
# before the claim's lease runs out (recovery may then take the delivery over).
_RECORD_WAIT_MAX_SECONDS = 5.0
_LEASE_MARGIN_SECONDS = 1.0


# A code is sent only with time left to read and type it: a quarter of its lifetime, at most
# 30 s. One a late queue or a retry would deliver in its last seconds is recorded EXPIRED
# instead (GetChallenge says so, and the user asks for a new one) rather than arrive dead.
USEFUL_MS_MAX = 30_000
TOO_LATE_REASON = "the code had too little time left to be used when it could be delivered"


def useful_ms(challenge: ChallengeRecord) -> int:
    """How long a code must still live to be worth sending."""
    return min(USEFUL_MS_MAX, (challenge.expires_at - challenge.created_at) // 4)


@dataclass(frozen=True)
class Outcome:
    status: str  # sent | failed | expired | nothing_to_do | retry
    retry_in: float | None = None
    # With retry_in: the generation the retry's message carries. The row's, when this attempt
    # claimed it (a late message of an older generation may claim a row nobody tried yet, and
    # only the row's own generation claims it after an attempt); else the message's own.
    retry_generation: int | None = None


def backoff_seconds(attempt: int, base: float, ceiling: float = RETRY_MAX_SECONDS) -> float:
    """Exponential backoff with jitter (half to all of the step), so retries from many workers spread out."""
    step = min(ceiling, base * 2 ** max(attempt - 1, 0))
    return _jitter.uniform(step / 2, step)


class Deliverer:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        email_sender: EmailSender,
        sms_sender: SmsSender,
        *,
        issuer: str,
        retry_base_seconds: float = 2.0,
        lease_seconds: float = 120.0,
        recovery_seconds: float = 10.0,
        clock: Clock = system_clock,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._email = email_sender
        self._sms = sms_sender
        self._issuer = issuer
        self._retry_base = retry_base_seconds
        # The lease outlasts the longest retry countdown, and recovery waits for a due retry.
        self._retry_ceiling = min(RETRY_MAX_SECONDS, lease_seconds)
        self._lease_ms = int(lease_seconds * 1000)
        self._recovery_ms = int(recovery_seconds * 1000)
        self._clock = clock

    def deliver(self, challenge_id: str, generation: int = 0, *, tries: int = 0) -> Outcome:
        """One attempt for the message (challenge_id, generation); `tries`: earlier runs of this message.

        Storage that is down is a retry for the caller (it can record nothing now): the
        claim, if it was taken, runs out with its lease and recovery takes over. Only a send
        that happened waits for storage here, to be recorded (_record_sent).
        """
        try:
            with logs.bind(challenge_id=challenge_id):  # every line of the attempt names it
                return self._deliver(challenge_id, generation)
        except StorageUnavailable:
            retry_in = backoff_seconds(tries + 1, self._retry_base, self._retry_ceiling)
            log.warning("delivery of %s waits for storage, retry in %.1fs", challenge_id, retry_in)
            return Outcome("retry", retry_in, generation)

    def _deliver(self, challenge_id: str, generation: int) -> Outcome:
        now = self._now_ms()
        # The claim and the record are one conditional UPDATE each: atomic without BEGIN/COMMIT.
        with self._db.statements() as q:
            challenge = outbox.claim_delivery(q, challenge_id, generation, now, self._lease_ms)
        if challenge is None:  # stale message, another worker's lease, or done
            log.info(
                "delivery of %s: nothing to do (settled, held by another attempt, or replaced)", challenge_id
            )
            return Outcome("nothing_to_do")
        replaced = challenge.superseded_at is not None or challenge.consumed_at is not None
        if replaced or challenge.expires_at <= now:
            return self._settle(challenge, "expired", "the code expired or was replaced before delivery")
        if challenge.expires_at - now < useful_ms(challenge):
            return self._settle(challenge, "expired", TOO_LATE_REASON)
        code = ""  # once decrypted: masked in whatever a provider says, which may quote the message
        try:
            payload = self._payload(challenge)
            code = payload if challenge.notice is None else ""
            returned = self._send(challenge, payload, now)
        except StorageUnavailable:
            raise
        except PermanentDeliveryError as error:
            reason = without_secrets(error.reason, code, challenge.destination)
            log.warning("delivery of %s failed: %s", challenge_id, reason)
            return self._settle(challenge, "failed", reason)
        except TransientDeliveryError as error:
            return self._retry_or_give_up(
                challenge, now, without_secrets(error.reason, code, challenge.destination)
            )
        except Exception as error:  # a bad template, a key that no longer decrypts, a provider bug
            log.error(
                "delivery of %s failed with %s; it is retried until the code expires: "
                "check the templates, TWOFACTOR_KEYS and the provider",
                challenge_id,
                type(error).__name__,
            )
            if log.isEnabledFor(logging.DEBUG):  # the traceback, as text: the exception may quote the message
                trace = without_secrets(traceback.format_exc().rstrip(), code, challenge.destination)
                log.debug("delivery of %s failed:\n%s", challenge_id, trace)
            return self._retry_or_give_up(challenge, now, f"delivery error: {type(error).__name__}")
        # Sent: from here on nothing may raise into a retry. An operator's class may return its
        # SDK's UUID, bytes or a dict; the record takes text without NUL.
        # It may be the gateway's whole answer, echoing the message: the code is starred there too
        # (the destination is not masked: an id's digits would be taken for a number).
        message_id = without_code(provider_message_id_text(returned), code)
        self._record_sent(challenge, message_id)
        self._count(challenge.method, "sent", since_send_ms=self._now_ms() - challenge.created_at)
        log.info("delivered %s by %s as %s", challenge_id, challenge.method, message_id)
        return Outcome("sent")

    def _record_sent(self, challenge: ChallengeRecord, message_id: str) -> None:
        """Record a send that happened; never raises, and never leaves the row to be sent again
        when a record can be made.

        Left 'sending', the row is claimed again once its lease runs out (recovery republishes
        it) and the code goes out again. So a record that fails for any reason but storage
        being down (a bug, a value the database refuses) is made again without the provider's
        message id, the one value in it that came from outside: the row ends SENT, its code
        wiped, and nothing claims it. Recording 'failed' instead would tell the operator a
        delivered code never arrived."""
        assert challenge.lease_until is not None  # set by the claim
        deadline = time.monotonic() + (challenge.lease_until - self._now_ms()) / 1000 - _LEASE_MARGIN_SECONDS
        try:
            self._record_sent_until(challenge, message_id, deadline)
            return
        except Exception as error:
            failure = type(error).__name__
            log.debug("recording the send of %s failed", challenge.challenge_id, exc_info=True)
        try:
            self._record_sent_until(challenge, message_id, deadline, with_id=False)
        except Exception as error:
            log.error(
                "delivery of %s was sent as %r, but recording it failed with %s, and again without the "
                "message id with %s: it is sent again once its lease runs out; check the database log",
                challenge.challenge_id,
                message_id,
                failure,
                type(error).__name__,
            )
            log.debug("recording the send of %s failed again", challenge.challenge_id, exc_info=True)
            return
        log.error(
            "delivery of %s was sent as %r, but recording it failed with %s: recorded as sent without "
            "the provider's message id, so it is not sent again; report this bug with the traceback "
            "logged at DEBUG",
            challenge.challenge_id,
            message_id,
            failure,
        )

    def _record_sent_until(
        self, challenge: ChallengeRecord, message_id: str, deadline: float, *, with_id: bool = True
    ) -> None:
        """Storage that is down now must not make a send happen twice (a retry of the task would
        send again once the lease ran out): the record is tried again here while the lease holds;
        past it, recovery may publish the delivery again."""
        attempt = 0
        while True:
            try:
                self._record(challenge, "sent", provider_message_id=message_id if with_id else None)
                return
            except StorageUnavailable:
                attempt += 1
                wait = backoff_seconds(attempt, self._retry_base, _RECORD_WAIT_MAX_SECONDS)
                if time.monotonic() + wait > deadline:
                    log.error(
                        "delivery of %s was sent as %s, but storage stayed unavailable to record it "
                        "until its lease ran out: it may be sent again",
                        challenge.challenge_id,
                        message_id,
                    )
                    return
                log.warning(
                    "delivery of %s was sent as %s; storage is unavailable to record it, retry in %.1fs",
                    challenge.challenge_id,
                    message_id,
                    wait,
                )
                time.sleep(wait)

    def _retry_or_give_up(self, challenge: ChallengeRecord, now: int, reason: str) -> Outcome:
        retry_in = backoff_seconds(challenge.delivery_attempts, self._retry_base, self._retry_ceiling)
        due = now + int(retry_in * 1000)
        if challenge.expires_at - due < useful_ms(challenge):
            log.warning("delivery of %s failed, no time left to retry: %s", challenge.challenge_id, reason)
            return self._settle(challenge, "failed", f"gave up: {reason}")
        log.info("delivery of %s failed, retry in %.1fs: %s", challenge.challenge_id, retry_in, reason)
        # Queued again, the lease released; recovery republishes only if the retry goes missing.
        recorded = self._record(
            challenge,
            "queued",
            failure_reason=reason,
            wipe_code=False,
            republish_at=due + self._recovery_ms,
        )
        if recorded == "expired":  # the code was withdrawn during the attempt: no retry would run
            self._count(challenge.method, "expired")
            return Outcome("expired")
        if recorded:
            self._count(challenge.method, "retry")
        return Outcome("retry", retry_in, challenge.publish_generation + 1)  # the row's next (mark_delivery)

    def _settle(self, challenge: ChallengeRecord, status: str, reason: str) -> Outcome:
        """End the delivery unsent, FAILED or EXPIRED with `reason`, and count it (unless another
        attempt took it over: one delivery, one outcome)."""
        if self._record(challenge, status, failure_reason=reason):
            self._count(challenge.method, status)
        return Outcome(status)

    def _payload(self, challenge: ChallengeRecord) -> str:
        """The code to send, or a notice's variables (JSON)."""
        assert challenge.code_ciphertext is not None  # claim_delivery takes only rows that still hold it
        return self._keyring.decrypt(
            challenge.code_ciphertext, purpose=CHALLENGE_CODE, user_id=challenge.challenge_id
        ).decode()

    def _send(self, challenge: ChallengeRecord, payload: str, now: int) -> str:
        if challenge.notice is not None:
            subject, text, html = render_notice(
                notice=challenge.notice,
                variables=json.loads(payload),
                issuer=self._issuer,
                locale=challenge.locale,
            )
            return self._send_email(challenge, subject, text, html)
        code = payload
        # To the nearest minute: "10 minutes" for a code sent at once, and at most half a minute
        # more than is left (at least useful_ms is).
        ttl_minutes = max(1, (challenge.expires_at - now + 30_000) // 60_000)
        purpose, locale = challenge.purpose, challenge.locale
        if challenge.method == "email":
            subject, text, html = render_email(
                purpose=purpose, code=code, issuer=self._issuer, ttl_minutes=ttl_minutes, locale=locale
            )
            return self._send_email(challenge, subject, text, html)
        text = render_sms(
            purpose=purpose, code=code, issuer=self._issuer, ttl_minutes=ttl_minutes, locale=locale
        )
        return self._sms.send_sms(SmsMessage(to=challenge.destination, text=text))

    def _send_email(self, challenge: ChallengeRecord, subject: str, text: str, html: str) -> str:
        return self._email.send_email(
            EmailMessage(
                to=challenge.destination,
                subject=subject,
                text=text,
                html=html,
                message_key=challenge.challenge_id,
                sender_name=self._issuer,
            )
        )

    def _record(
        self,
        claimed: ChallengeRecord,
        status: str,
        *,
        provider_message_id: str | None = None,
        failure_reason: str | None = None,
        wipe_code: bool = True,
        republish_at: int | None = None,
    ) -> str | None:
        """Record the attempt's outcome; the status recorded, None when its lease ran out and
        another attempt took over (that one records and counts the delivery's outcome)."""
        with self._db.statements() as q:
            recorded = outbox.mark_delivery(
                q,
                claimed,
                status,
                self._now_ms(),
                provider_message_id=provider_message_id,
                failure_reason=failure_reason,
                wipe_code=wipe_code,
                republish_at=republish_at,
            )
        if not recorded:
            log.warning(
                "delivery of %s outlasted its lease; another attempt took over (%s not recorded)",
                claimed.challenge_id,
                status,
            )
        return recorded

    def _count(self, method: str, outcome: str, *, since_send_ms: int | None = None) -> None:
        sender = self._email if method == "email" else self._sms
        metrics.delivery(
            method,
            metrics.provider_label(sender),
            outcome,
            since_send_seconds=None if since_send_ms is None else since_send_ms / 1000,
        )

    def _now_ms(self) -> int:
        return now_ms(self._clock)


def without_secrets(reason: str, code: str, destination: str) -> str:
    """A provider's reason (or a traceback) with the code it may quote starred and the destination
    masked: the reason goes into log lines, the challenge's failure_reason and GetChallenge."""
    return without_destination(without_code(reason, code), destination)


def without_code(text: str, code: str) -> str:
    """`text` with the code it may quote starred."""
    return text.replace(code, "*" * len(code)) if code else text


def without_destination(reason: str, destination: str) -> str:
    """A provider's reason with the address it was sent to masked, as everywhere else in logs and
    records: relays quote it in a refusal ("550 5.1.1 <ana@example.com>: Recipient address
    rejected"), SMS gateways the number, in whatever form. Its exact forms first, then anything
    that looks like an address or a phone number (7 digits or more: not "550 5.1.1")."""
    if destination:
        masked = contacts.mask_email(destination) if "@" in destination else contacts.mask_phone(destination)
        for form in dict.fromkeys((destination, destination.lstrip("+"))):
            reason = re.sub(re.escape(form), masked, reason, flags=re.IGNORECASE)
    reason = _ADDRESS_LIKE.sub(lambda found: contacts.mask_email(found.group()), reason)
    return _NUMBER_LIKE.sub(_masked_number, reason)


_ADDRESS_LIKE = re.compile(r"[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+")
_NUMBER_LIKE = re.compile(r"\+?\d[\d ().-]{5,}\d")


def _masked_number(found: re.Match[str]) -> str:
    """All but the last four digits starred, separators kept; fewer than 7 digits left alone."""
    text = found.group()
    digits = sum(character.isdigit() for character in text)
    if digits < 7:
        return text
    starred, seen = [], 0
    for character in reversed(text):
        if character.isdigit():
            seen += 1
            starred.append(character if seen <= 4 else "*")
        else:
            starred.append(character)
    return "".join(reversed(starred))
