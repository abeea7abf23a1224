"""The SMS pumping guard: texts only to allowed countries, and no more per hour than the caps."""

from __future__ import annotations

import logging

from twofactor_server.domain import contacts
from twofactor_server.domain.errors import FailedPrecondition, ResourceExhausted
from twofactor_server.domain.sms_countries import country_allowed, phone_country
from twofactor_server.observability import metrics
from twofactor_server.settings import PolicySettings
from twofactor_server.storage import store
from twofactor_server.storage.database import Transaction

log = logging.getLogger(__name__)
HOUR_MS = 3_600_000
ALL_COUNTRIES = "*"


def require_sms_country(phone: str, policy: PolicySettings) -> str:
    """The number's country; FAILED_PRECONDITION SMS_COUNTRY_NOT_ALLOWED outside the allowed list."""
    country = phone_country(phone)
    if not country_allowed(country, policy.sms_allowed_countries):
        raise FailedPrecondition(
            "SMS_COUNTRY_NOT_ALLOWED",
            f"codes can't be texted to numbers in {country} here; "
            f"register a number in {', '.join(policy.sms_allowed_countries)} or use another method",
            metadata={"country": country},
        )
    return country


def take_sms_quota(tx: Transaction, phone: str, policy: PolicySettings, now: int) -> None:
    """Count one text to `phone` against this clock hour's caps, in the sending transaction.

    Invariant: however many sends run at once, no more than TWOFACTOR_SMS_PER_COUNTRY_PER_HOUR
    texts go to one country and no more than TWOFACTOR_SMS_PER_HOUR in all within a clock hour
    (a refused send counts nothing: its transaction rolls back). Refusals are
    RESOURCE_EXHAUSTED with a RetryInfo at the next hour.
    """
    country = require_sms_country(phone, policy)
    if contacts.normalized_phone(phone) is None:
        # Stored before SetContact took mobile numbers only: a premium-rate number would be paid
        # for every text (SMS pumping), a landline never gets one.
        raise FailedPrecondition(
            "PHONE_NOT_MOBILE",
            "the registered number can't take texts (not a mobile number); register a mobile "
            "number with SetContact, or use another method",
            metadata={"contact": "phone"},
        )
    hour = now // HOUR_MS
    retry_after = ((hour + 1) * HOUR_MS - now) / 1000
    caps = (
        (country, policy.sms_per_country_per_hour, "SMS_COUNTRY_LIMIT", f"to numbers in {country}"),
        (ALL_COUNTRIES, policy.sms_per_hour, "SMS_GLOBAL_LIMIT", "in all"),
    )
    for bucket, cap, reason, where in caps:  # always the country first: one lock order
        if cap and not store.take_sms_send(tx, hour, bucket, cap):
            metrics.send_refused(reason)  # an alert on SMS pumping watches this
            log.warning(
                "SMS send refused (%s): %d texts %s this hour; number %s",
                reason,
                cap,
                where,
                contacts.mask_phone(phone),
            )
            raise ResourceExhausted(
                reason,
                f"the hourly limit of texted codes {where} is reached; retry later or use another method",
                metadata={"country": country},
                retry_after=retry_after,
            )


def give_back_sms_quota(tx: Transaction, phone: str, policy: PolicySettings, counted_at: int) -> None:
    """Uncount what take_sms_quota counted at `counted_at` for a send that was voided (its caller
    told UNAVAILABLE): such a send is counted toward no limit, or a broker outage would use up
    the hour's texts. Nothing once that hour's counts are dropped (the hour after next)."""
    hour = counted_at // HOUR_MS
    country = phone_country(phone)
    for bucket, cap in ((country, policy.sms_per_country_per_hour), (ALL_COUNTRIES, policy.sms_per_hour)):
        if cap:  # take_sms_quota's order and condition
            store.give_back_sms_send(tx, hour, bucket)
