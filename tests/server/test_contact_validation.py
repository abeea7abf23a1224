"""What SetContact takes as an email address or a phone number, beyond hidden characters
(test_contacts.py): an address is a plain dot-atom whose letters' case makes no other
destination, and a number is one a text reaches (mobile), not a premium-rate or landline one."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import default as default_policy

import grpc
import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberType
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import ServerFactory
from tests.server.helpers import EMAIL, error_info
from tests.server.stored_rows import query
from twofactor_server.domain import contacts

# Deterministic runs with no time limit per example (a loaded CI machine is slow, not wrong).
STEADY = settings(deadline=None, derandomize=True, database=None, max_examples=300)
# An RFC 2047 encoded word as the local part: the email package decodes it when the message is
# built, so it would be sent to "attacker@evil.example>,"@example.com, To: attacker@evil.example>,
ENCODED_WORD = "=?utf-8?q?attacker=40evil.example=3E=2C?=@example.com"
ATEXT_SYMBOLS = "!#$%&'*+-/=?^_`{|}~"
FULL_WIDTH_AT = "\uff20"  # a symbol that looks like @
# atext, the dot, letters of other scripts and a combining accent, and what a dot-atom refuses.
LONGEST_ADDRESS = "a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 60  # 254 bytes
LOCAL_PART_CHARACTERS = st.sampled_from(
    [*"abcXYZ019", *ATEXT_SYMBOLS, ".", "á", "ß", "İ", "東", "\u0301", *'"\\(@<, ', FULL_WIDTH_AT]
)


def addr_spec_sent_to(address: str) -> list[str]:
    """The addresses the email package finds in a To header holding `address` (what the SMTP
    provider's fallback path, EmailMessage and smtplib.send_message, sends to)."""
    message = EmailMessage(policy=default_policy)
    message["To"] = address
    return [each.addr_spec for each in message["To"].addresses]


@pytest.mark.parametrize(
    ("typed", "kept"),
    [
        ("ana@example.com", "ana@example.com"),
        ("ána.o'brien+2fa@example.com", "ána.o'brien+2fa@example.com"),
        ("東京@example.jp", "東京@example.jp"),
        ("a!#$%&'*+-/?=^_`{|}~@example.com", "a!#$%&'*+-/?=^_`{|}~@example.com"),  # all of atext
        ("a=b?c@example.com", "a=b?c@example.com"),  # = and ? are atext; only "=?" starts a word
        ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),  # an IDN in its ASCII form
        # One mailbox, one destination: the case is folded, the local part's too.
        ("victim@eXample.COM", "victim@example.com"),
        ("VICTIM@example.com", "victim@example.com"),
        ("Ána@Example.com", "ána@example.com"),
        ("a\u0301na@example.com", "ána@example.com"),  # decomposed: the same letters as precomposed
        # RFC 5321's limits are inclusive: a local part of 64 octets, an address of 254.
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
        ("é" * 32 + "@example.com", "é" * 32 + "@example.com"),
        (LONGEST_ADDRESS, LONGEST_ADDRESS),
    ],
)
def test_a_plain_address_is_kept_in_one_form(typed: str, kept: str) -> None:
    assert contacts.is_valid_email(typed)
    assert contacts.normalized_email(typed) == kept


@pytest.mark.parametrize(
    "typed",
    [
        ENCODED_WORD,
        "=?utf-8?q?attacker=40evil.example?=@example.com",
        "=?UTF-8?B?YXR0YWNrZXJAZXZpbC5leGFtcGxl?=@example.com",
        "a.=?utf-8?q?b?=@example.com",
        "ab=?c@example.com",
        '"attacker@evil.example"@example.com',  # a quoted local part
        '"ana"@example.com',
        "a\\@b@example.com",  # a quoted pair
        "ana(comment)@example.com",
        ".ana@example.com",
        "ana.@example.com",
        "an..a@example.com",
        f"an{FULL_WIDTH_AT}a@example.com",  # symbols of other scripts are no letters
        "ana\uff1c@example.com",  # a full-width <
        "€@example.com",
        "ana@example",
        "ana@-example.com",
        "ana@exämple.com",  # an IDN is written in its xn-- form
        "a" * 65 + "@example.com",
        "é" * 33 + "@example.com",  # 66 octets: RFC 5321 counts octets, and relays refuse it
        LONGEST_ADDRESS + "e",  # 255 bytes
    ],
)
def test_an_address_that_is_not_a_plain_dot_atom_is_invalid(typed: str) -> None:
    assert not contacts.is_valid_email(typed)


@STEADY
@given(local=st.text(LOCAL_PART_CHARACTERS, min_size=1, max_size=24))
@example(local=ENCODED_WORD.partition("@")[0])
@example(local="=?utf-8?q?attacker=40evil.example?=")
def test_an_accepted_address_is_the_one_a_message_goes_to(local: str) -> None:
    """What is stored and shown masked is what the email package sends to, letter for letter."""
    address = f"{local}@example.com"
    if contacts.is_valid_email(address):
        assert addr_spec_sent_to(address) == [address]
        stored = contacts.normalized_email(address)
        assert stored is not None and addr_spec_sent_to(stored) == [stored]


@STEADY
@given(
    local=st.text(LOCAL_PART_CHARACTERS, min_size=1, max_size=24),
    domain=st.sampled_from(["example.com", "mail.example.org", "xn--bcher-kva.example"]),
    flips=st.lists(st.booleans(), min_size=64, max_size=64),
)
def test_case_variants_of_an_address_are_one_destination(local: str, domain: str, flips: list[bool]) -> None:
    address = f"{local}@{domain}"
    # Each letter flipped to its other case where that is one letter (ß's upper case is SS, not
    # the same string in another case: another address, as casefold would not treat it).
    variant = "".join(
        c.swapcase() if flip and len(c.swapcase()) == 1 else c
        for c, flip in zip(address, flips, strict=False)
    )
    stored = contacts.normalized_email(address)
    assert contacts.normalized_email(variant) == stored
    if stored is not None:
        assert contacts.normalized_email(stored) == stored  # stable: a stored address stays valid
        assert stored.partition("@")[2] == domain


# Numbers of each kind no code may be texted to: premium-rate and shared-cost numbers are how SMS
# pumping is paid; the others can't take a text or forward it somewhere unknown.
NOT_TEXTABLE = {
    "US premium rate": "+1 900 555 0123",
    "UK premium rate": "+44 909 879 0000",
    "DE premium rate": "+49 900 1 234567",
    "FR premium rate": "+33 8 92 12 34 56",
    "US toll free": "+1 800 555 0123",
    "UK toll free": "+44 800 123 4567",
    "UK UAN": "+44 55 1234 5678",
    "UK pager": "+44 76 2345 6789",
    "UK personal number": "+44 70 1234 5678",
    "US personal number": "+1 500 555 0006",
    "UK landline": "+44 20 7946 0958",
    "FR landline": "+33 1 23 45 67 89",
    "DE landline": "+49 30 123456",
}


@pytest.mark.parametrize("typed", NOT_TEXTABLE.values(), ids=NOT_TEXTABLE.keys())
def test_a_valid_number_no_text_reaches_is_refused(typed: str) -> None:
    assert phonenumbers.is_valid_number(phonenumbers.parse(typed))  # valid: refused for its kind
    assert contacts.normalized_phone(typed) is None


def test_every_plans_example_numbers_are_taken_by_their_kind() -> None:
    """Over phonenumbers' example number of each kind in every region: mobile ones (and those the
    plan can't tell from a landline, as in the US and Canada) are taken, no other kind is."""
    wrong = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (value for name, value in vars(PhoneNumberType).items() if name.isupper()):
            number = phonenumbers.example_number_for_type(region, kind)
            if number is None or not phonenumbers.is_valid_number(number):
                continue
            typed = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            actual_kind = phonenumbers.number_type(number)  # a fixed-line example can be either
            textable = actual_kind in (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)
            if (contacts.normalized_phone(typed) is not None) != textable:
                wrong.append((region, typed, actual_kind))
    assert wrong == []


def test_set_contact_refuses_an_encoded_word_or_quoted_address(start_server: ServerFactory) -> None:
    h = start_server()
    for email in (ENCODED_WORD, '"attacker@evil.example"@example.com', "an..a@example.com"):
        with pytest.raises(grpc.RpcError) as raised:
            h.twofactor.SetContact(pb.SetContactRequest(user_id="eve", email=email), metadata=h.app_metadata)
        assert (raised.value.code(), error_info(raised.value).reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_EMAIL",
        ), email
    assert query(h.settings, "SELECT user_id FROM users", {}) == []  # nothing stored


def test_set_contact_refuses_premium_toll_free_and_landline_numbers(start_server: ServerFactory) -> None:
    h = start_server()
    for phone in NOT_TEXTABLE.values():
        with pytest.raises(grpc.RpcError) as raised:
            h.twofactor.SetContact(pb.SetContactRequest(user_id="eve", phone=phone), metadata=h.app_metadata)
        assert (raised.value.code(), error_info(raised.value).reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PHONE",
        ), phone
    assert query(h.settings, "SELECT user_id FROM users", {}) == []


def test_the_refusal_of_a_premium_number_says_it_must_be_mobile(start_server: ServerFactory) -> None:
    h = start_server()
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id="eve", phone=NOT_TEXTABLE["US premium rate"]),
            metadata=h.app_metadata,
        )
    assert error_info(raised.value).reason == "INVALID_PHONE"
    assert "mobile" in (raised.value.details() or "")


def test_case_variants_of_one_address_share_its_send_limit(start_server: ServerFactory) -> None:
    """Victim@Example.com and victim@eXample.com reach one mailbox: the per-destination limit
    counts them together (it compares stored addresses, which are in one form)."""
    h = start_server(policy={"sends_per_destination_per_hour": 2})
    variants = ["victim@example.com", "victim@Example.com", "victim@eXample.com", "VICTIM@EXAMPLE.COM"]
    outcomes = []
    for n, address in enumerate(variants):
        user = f"attacker{n}"
        h.twofactor.SetContact(pb.SetContactRequest(user_id=user, email=address), metadata=h.app_metadata)
        try:
            h.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id=user, method=EMAIL), metadata=h.app_metadata
            )
            outcomes.append("sent")
        except grpc.RpcError as error:
            outcomes.append(error_info(error).reason)
    assert outcomes == ["sent", "sent", "DESTINATION_SEND_LIMIT", "DESTINATION_SEND_LIMIT"]
    stored = query(h.settings, "SELECT DISTINCT email FROM users", {})
    assert stored == [{"email": "victim@example.com"}]


def test_an_address_stored_before_lower_case_is_brought_to_it_and_the_same_one_changes_nothing(
    start_server: ServerFactory,
) -> None:
    """Addresses stored before this release keep the case they were typed in: migration 0010
    folds them, and SetContact compares a new address with the stored one in the stored form, so
    sending the same address again is no change (no epoch moved, no event, no code sent)."""
    h = start_server()
    for user_id in ("ana", "ada"):
        h.twofactor.SetContact(
            pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com"), metadata=h.app_metadata
        )
    db = h.server.db
    with db.transaction() as tx:  # as the previous release stored them; and 0010 not yet applied
        tx.execute("UPDATE users SET email = 'Ana@Example.COM' WHERE user_id = 'ana'")
        tx.execute("UPDATE users SET email = 'Ádá@Example.com' WHERE user_id = 'ada'")  # beyond ASCII
        tx.execute("DELETE FROM schema_migrations WHERE version = '0010_lowercase_emails'")
    assert db.migrate() == ["0010_lowercase_emails"]
    assert query(h.settings, "SELECT email FROM users WHERE user_id = 'ana'") == [
        {"email": "ana@example.com"}
    ]

    before = query(h.settings, "SELECT user_id, credential_epoch FROM users ORDER BY user_id")
    events = len(query(h.settings, "SELECT event_id FROM audit_events"))
    for user_id, typed in (("ana", "ANA@example.com"), ("ada", "ádá@example.COM")):
        same = h.twofactor.SetContact(
            pb.SetContactRequest(user_id=user_id, email=typed), metadata=h.app_metadata
        )
        assert not same.HasField("email_confirmation")
    assert query(h.settings, "SELECT user_id, credential_epoch FROM users ORDER BY user_id") == before
    assert len(query(h.settings, "SELECT event_id FROM audit_events")) == events
