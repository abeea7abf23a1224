"""The country of a mobile number, for the SMS pumping guard (pure: libphonenumber's tables)."""

from __future__ import annotations

import phonenumbers

UNKNOWN = "ZZ"  # libphonenumber's "unknown region"


def phone_country(phone: str) -> str:
    """The ISO 3166-1 alpha-2 country of an E.164 number; for a number libphonenumber can't place
    exactly, the main country of its calling code; UNKNOWN when not even that is known."""
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return UNKNOWN
    region = phonenumbers.region_code_for_number(number)
    if not region and number.country_code is not None:
        region = phonenumbers.region_code_for_country_code(number.country_code)
    return region or UNKNOWN


def country_allowed(country: str, allowed: tuple[str, ...]) -> bool:
    """Whether texts may go to `country`: every country when the list is empty."""
    return not allowed or country in allowed
