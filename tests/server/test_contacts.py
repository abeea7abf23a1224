"""Contacts and every other free-text field refuse what a person can't see or type: control
characters (NUL, C0, DEL, C1), format characters (bidi overrides, zero-width), unassigned code
points. Phone numbers are checked against real numbering plans and stored in E.164 form.
On both stores, so no input can make PostgreSQL raise (NUL) and answer INTERNAL."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import Message
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness
from tests.server.helpers import AUTHENTICATOR, EMAIL, error_info
from tests.server.stored_rows import query
from twofactor_server.domain import contacts

HIDDEN = {
    "NUL": "\x00",
    "SOH": "\x01",
    "BEL": "\x07",
    "TAB": "\t",
    "LF": "\n",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "C1 NEL": "\x85",
    "C1 CSI": "\x9b",
    "RLO U+202E": "\u202e",
    "LRI U+2066": "\u2066",
    "ZWJ U+200D": "\u200d",
    "BOM U+FEFF": "\ufeff",
    "soft hyphen U+00AD": "\u00ad",
    "unassigned U+0378": "\u0378",
    "unassigned U+E0080": "\U000e0080",
    "private use U+E000": "\ue000",
}


def rejected(call: Callable[[], Message]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), error_info(raised.value).reason


def stored(h: Harness, user_id: str) -> dict[str, object]:
    rows = query(h.settings, "SELECT email, phone FROM users WHERE user_id = %(u)s", {"u": user_id})
    return rows[0] if rows else {}


@pytest.mark.parametrize("character", HIDDEN.values(), ids=HIDDEN.keys())
def test_an_email_with_a_hidden_character_is_invalid(harness: Harness, character: str) -> None:
    for email in (
        f"an{character}a@example.com",
        f"ana@example.com{character}",
        f"{character}ana@example.com",
    ):
        answer = rejected(
            lambda email=email: harness.twofactor.SetContact(  # type: ignore[misc]
                pb.SetContactRequest(user_id="ana", email=email), metadata=harness.app_metadata
            )
        )
        assert answer == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EMAIL"), repr(email)
    assert stored(harness, "ana") == {}  # nothing was stored, not even the user


@pytest.mark.parametrize("character", HIDDEN.values(), ids=HIDDEN.keys())
def test_a_phone_with_a_hidden_character_is_invalid(harness: Harness, character: str) -> None:
    for phone in (f"+1415555{character}0123", f"+14155550123{character}", f"{character}+14155550123"):
        answer = rejected(
            lambda phone=phone: harness.twofactor.SetContact(  # type: ignore[misc]
                pb.SetContactRequest(user_id="ana", phone=phone), metadata=harness.app_metadata
            )
        )
        assert answer == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PHONE"), repr(phone)
    assert stored(harness, "ana") == {}


@pytest.mark.parametrize(
    ("typed", "e164"),
    [
        ("+14155550123", "+14155550123"),  # United States
        ("+1 (415) 555-0123", "+14155550123"),
        ("+44 7911 123456", "+447911123456"),  # United Kingdom, mobile
        ("+33 6 12 34 56 78", "+33612345678"),  # France, mobile
        ("+49 151 23456789", "+4915123456789"),  # Germany, mobile
        ("+81 90-1234-5678", "+819012345678"),  # Japan, mobile
        ("+55 11 91234-5678", "+5511912345678"),  # Brazil, mobile
        ("+91 98765 43210", "+919876543210"),  # India, mobile
        ("+61 412 345 678", "+61412345678"),  # Australia, mobile
    ],
)
def test_a_valid_international_number_is_stored_in_e164(harness: Harness, typed: str, e164: str) -> None:
    answer = harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="ana", phone=typed), metadata=harness.app_metadata
    )
    assert answer.masked_phone == contacts.mask_phone(e164)
    assert stored(harness, "ana")["phone"] == e164


@pytest.mark.parametrize(
    "typed",
    [
        "4155550123",  # no country code
        "+0123456789",  # no country starts with 0
        "+1415555012345678",  # too long for E.164
        "+14155",  # too short for its plan
        "+999 1234 5678",  # an unassigned country code
        "+1 011 555 0123",  # no US area code starts with 0
        "+44 1234",  # too short for the UK plan
        "+1-800-FLOWERS",  # letters
        "+1 415 555 0123 ext. 9",  # an extension can't receive a text
        "+1415555\uff10\uff11\uff12\uff13",  # full-width digits
        "tel:+14155550123",
        "++14155550123",
    ],
)
def test_a_number_outside_every_numbering_plan_is_invalid(harness: Harness, typed: str) -> None:
    answer = rejected(
        lambda: harness.twofactor.SetContact(
            pb.SetContactRequest(user_id="ana", phone=typed), metadata=harness.app_metadata
        )
    )
    assert answer == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PHONE")


def test_valid_contacts_are_still_accepted_and_cleared(harness: Harness) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="ana", email="ána.o'brien+2fa@example.com", phone="+14155550123"),
        metadata=harness.app_metadata,
    )
    assert stored(harness, "ana") == {"email": "ána.o'brien+2fa@example.com", "phone": "+14155550123"}
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="ana", email="", phone=""), metadata=harness.app_metadata
    )
    assert stored(harness, "ana") == {"email": None, "phone": None}


def other_text_fields(h: Harness, bad: str) -> list[tuple[str, Callable[[], Message]]]:
    """(expected reason, a call carrying `bad` in that field) for every other free-text field."""
    app, admin = h.app_metadata, h.admin_metadata
    return [
        ("INVALID_USER_ID", lambda: h.twofactor.GetStatus(pb.GetStatusRequest(user_id=bad), metadata=app)),
        (
            "INVALID_USER_ID",
            lambda: h.twofactor.SetContact(
                pb.SetContactRequest(user_id=bad, email="a@example.com"), metadata=app
            ),
        ),
        (
            "INVALID_ACCOUNT_NAME",
            lambda: h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="ana", method=AUTHENTICATOR, account_name=bad), metadata=app
            ),
        ),
        (
            "INVALID_LOCALE",
            lambda: h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="ana", method=EMAIL, locale=bad), metadata=app
            ),
        ),
        (
            "INVALID_IDEMPOTENCY_KEY",
            lambda: h.twofactor.SendCode(
                pb.SendCodeRequest(user_id="ana", method=EMAIL, idempotency_key=bad), metadata=app
            ),
        ),
        (
            "INVALID_LOCALE",
            lambda: h.twofactor.SendCode(
                pb.SendCodeRequest(user_id="ana", method=EMAIL, locale=bad), metadata=app
            ),
        ),
        (
            "INVALID_CHALLENGE_ID",
            lambda: h.twofactor.GetChallenge(
                pb.GetChallengeRequest(user_id="ana", challenge_id=bad), metadata=app
            ),
        ),
        (
            "INVALID_REASON",
            lambda: h.admin.ResetUser(admin_pb.ResetUserRequest(user_id="ana", reason=bad), metadata=admin),
        ),
        (
            "INVALID_USER_ID",
            lambda: h.admin.ListAuditEvents(admin_pb.ListAuditEventsRequest(user_id=bad), metadata=admin),
        ),
        ("INVALID_USER_ID", lambda: h.admin.GetUser(admin_pb.GetUserRequest(user_id=bad), metadata=admin)),
    ]


@pytest.mark.parametrize("character", HIDDEN.values(), ids=HIDDEN.keys())
def test_every_other_text_field_refuses_a_hidden_character(harness: Harness, character: str) -> None:
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="ana", email="ana@example.com"), metadata=harness.app_metadata
    )
    for reason, call in other_text_fields(harness, f"a{character}b"):
        assert rejected(call) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


@pytest.mark.parametrize("character", ["\x00", "\u202e", "\x85"])
def test_the_pure_check_sees_hidden_characters(character: str) -> None:
    assert contacts.has_hidden_characters(f"a{character}")
    assert not contacts.has_hidden_characters("ána o'brien 東京")


@pytest.mark.parametrize(
    ("e164", "masked"),
    [
        ("+14155550123", "+1******0123"),
        ("+447911123456", "+4*******3456"),
        ("+6907290", "+6****90"),  # Tokelau: a national number of 4 digits, half of them hidden
        ("+50051234", "+5*****34"),  # the Falklands: 5 digits
    ],
)
def test_a_masked_number_hides_at_least_half_of_its_national_digits(e164: str, masked: str) -> None:
    """The last four digits of a plan of four were the whole subscriber number in GetUser, audit
    details and logs."""
    assert contacts.mask_phone(e164) == masked


def test_a_masked_address_shows_only_its_first_character_and_its_domain() -> None:
    assert contacts.mask_email("ana@example.com") == "a***@example.com"
    assert contacts.mask_email("東京@example.jp") == "東***@example.jp"
    assert contacts.mask_email("") == contacts.mask_phone("") == ""  # no contact: nothing to show
