"""One delivery attempt of a challenge's code: read the outbox row, send, record.

Safe to run twice: a challenge already sent, failed, expired or unknown is a
no-op, and the code is wiped from the row once the provider accepted it. The
caller (a Celery task, or the in-process runner) retries when told to.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

from twofactor_server.delivery.messages import render_email, render_sms
from twofactor_server.delivery.providers import (
    EmailMessage,
    EmailSender,
    PermanentDeliveryError,
    SmsMessage,
    SmsSender,
    TransientDeliveryError,
)
from twofactor_server.domain.clock import Clock, now_ms, system_clock
from twofactor_server.domain.keyring import CHALLENGE_CODE, Keyring
from twofactor_server.observability import metrics
from twofactor_server.storage import outbox
from twofactor_server.storage.database import Database

log = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 60.0


@dataclass(frozen=True)
class Outcome:
    status: str  # sent | failed | expired | nothing_to_do | retry
    retry_in: float | None = None


def backoff_seconds(attempt: int, base: float) -> float:
    """Exponential backoff with jitter (half to all of the step), so retries from many workers spread out."""
    ceiling = min(RETRY_MAX_SECONDS, base * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


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
        clock: Clock = system_clock,
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._email = email_sender
        self._sms = sms_sender
        self._issuer = issuer
        self._retry_base = retry_base_seconds
        self._clock = clock

    def deliver(self, challenge_id: str) -> Outcome:
        now = self._now_ms()
        with self._db.transaction() as tx:
            challenge = outbox.claim_delivery(tx, challenge_id, now)
        if challenge is None:
            return Outcome("nothing_to_do")
        if (
            challenge.expires_at <= now
            or challenge.superseded_at is not None
            or challenge.consumed_at is not None
        ):
            self._record(
                challenge_id, "expired", failure_reason="the code expired or was replaced before delivery"
            )
            self._count(challenge.method, "expired")
            return Outcome("expired")
        assert challenge.code_ciphertext is not None  # claim_delivery takes only rows that still hold it
        code = self._keyring.decrypt(
            challenge.code_ciphertext, purpose=CHALLENGE_CODE, user_id=challenge_id
        ).decode()
        ttl_minutes = max(1, math.ceil((challenge.expires_at - now) / 60_000))
        try:
            message_id = self._send(
                challenge.method,
                challenge.purpose,
                challenge.destination,
                challenge.locale,
                code,
                ttl_minutes,
            )
        except TransientDeliveryError as error:
            retry_in = backoff_seconds(challenge.delivery_attempts, self._retry_base)
            if now + retry_in * 1000 >= challenge.expires_at:
                self._record(challenge_id, "expired", failure_reason=f"gave up: {error.reason}")
                self._count(challenge.method, "expired")
                return Outcome("expired")
            log.info(
                "delivery of %s failed transiently, retry in %.1fs: %s", challenge_id, retry_in, error.reason
            )
            self._record(challenge_id, "sending", failure_reason=error.reason, wipe_code=False)
            self._count(challenge.method, "retry")
            return Outcome("retry", retry_in)
        except PermanentDeliveryError as error:
            log.warning("delivery of %s failed: %s", challenge_id, error.reason)
            self._record(challenge_id, "failed", failure_reason=error.reason)
            self._count(challenge.method, "failed")
            return Outcome("failed")
        self._record(challenge_id, "sent", provider_message_id=message_id)
        self._count(challenge.method, "sent", since_send_ms=self._now_ms() - challenge.created_at)
        log.info("delivered %s by %s as %s", challenge_id, challenge.method, message_id)
        return Outcome("sent")

    def _send(
        self, method: str, purpose: str, destination: str, locale: str, code: str, ttl_minutes: int
    ) -> str:
        if method == "email":
            subject, text, html = render_email(
                purpose=purpose, code=code, issuer=self._issuer, ttl_minutes=ttl_minutes, locale=locale
            )
            return self._email.send_email(EmailMessage(to=destination, subject=subject, text=text, html=html))
        text = render_sms(
            purpose=purpose, code=code, issuer=self._issuer, ttl_minutes=ttl_minutes, locale=locale
        )
        return self._sms.send_sms(SmsMessage(to=destination, text=text))

    def _record(
        self,
        challenge_id: str,
        status: str,
        *,
        provider_message_id: str | None = None,
        failure_reason: str | None = None,
        wipe_code: bool = True,
    ) -> None:
        with self._db.transaction() as tx:
            outbox.mark_delivery(
                tx,
                challenge_id,
                status,
                self._now_ms(),
                provider_message_id=provider_message_id,
                failure_reason=failure_reason,
                wipe_code=wipe_code,
            )

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
