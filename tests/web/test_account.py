"""examples/web's account pages through Flask's test client, against the real twofactor server:
a lockout while confirming a new contact."""

from __future__ import annotations

import re
import time

from twofactor.v1 import common_pb2 as common_pb

from tests.web.conftest import ClientSiteFactory, NewUser, SiteClient, TwoFactorServer, flashes
from tests.web.mailbox import Mailbox

WAIT = re.compile(r"Too many wrong codes: try again in (\d+) seconds\.")


def save_new_email(visitor: SiteClient, address: str) -> None:
    """Save a new address on the contacts page until the site asks for the code sent to it.

    The code to the new address is a send like any other: within the server's resend cooldown
    (5 s here) of the enrollment code the site says so, and the form is saved again (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        saved = visitor.post("/contacts", email=address)
        if saved.status_code == 200:
            assert "<h1>Confirm your new email</h1>" in saved.get_data(as_text=True), flashes(saved)
            return
        assert saved.headers["Location"] == "/contacts"
        [message] = flashes(visitor.follow(saved))
        assert message.startswith("A code was sent moments ago"), message
        assert time.monotonic() < deadline, "the site kept refusing the new address"
        time.sleep(0.5)


def start_email_codes(visitor: SiteClient, mailbox: Mailbox, user_id: str) -> str:
    """Sign in (2FA is forced: the site asks to enroll) and start email codes to
    <user_id>@example.com; the code mailed there."""
    assert visitor.sign_in(user_id) == "/enroll"
    before = mailbox.count()
    assert visitor.post("/enroll/email", contact=f"{user_id}@example.com").status_code == 200
    return mailbox.code_sent_to(f"{user_id}@example.com", after=before)


def assert_says_wait(messages: list[str], policy: common_pb.Policy) -> None:
    """Only the message that the user is locked out, and for about the server's first lockout."""
    [message] = messages
    found = WAIT.fullmatch(message)
    assert found, message
    lock_seconds = policy.lockout_base.seconds
    assert lock_seconds - 10 <= int(found.group(1)) <= lock_seconds + 1, message


def test_the_wrong_code_that_locks_and_a_try_while_locked_say_when_to_retry(
    client_site: ClientSiteFactory, twofactor_server: TwoFactorServer, mailbox: Mailbox, new_user: NewUser
) -> None:
    """erin has email codes on and changes her address; wrong codes for the new one lock her out.
    The wrong code that locks her, and a try while locked (even with the right code), say when
    to try again: not "attempts left", not an error page, not "try again later"."""
    site = client_site(twofactor_server)
    policy = site.second_factor.policy()
    assert policy.lockout_base.seconds < 120  # the message gives seconds below two minutes
    user_id = new_user("erin")
    erin = site.visitor()
    code = start_email_codes(erin, mailbox, user_id)
    assert "Email is on." in flashes(erin.post("/enroll/email/confirm", code=code))

    new_address = f"{user_id}@example.org"
    before = mailbox.count()
    save_new_email(erin, new_address)
    code = mailbox.code_sent_to(new_address, after=before)
    wrong = next(digits for digits in ("000000", "111111") if digits != code)

    for left in range(policy.lockout_threshold - 1, 0, -1):
        rejected = erin.post("/contacts/email/confirm", code=wrong)
        assert rejected.status_code == 200
        assert flashes(rejected) == [f"Wrong code. {left} attempts left before a lockout."]
    locking = erin.post("/contacts/email/confirm", code=wrong)

    assert locking.status_code == 302
    assert locking.headers["Location"] == "/account"
    assert_says_wait(flashes(erin.follow(locking)), policy)

    while_locked = erin.post("/contacts/email/confirm", code=code)

    assert while_locked.status_code == 302
    assert while_locked.headers["Location"] == "/account"
    assert_says_wait(flashes(erin.follow(while_locked)), policy)
    assert site.second_factor.status(user_id).HasField("locked_until")

    # A new address while locked: its code could not be confirmed until the lock ends, so none
    # is sent, and the site says when to try again instead of an error page.
    while_locked = erin.post("/contacts", email=f"{user_id}@example.net")
    assert while_locked.status_code == 302
    assert while_locked.headers["Location"] == "/account"
    assert_says_wait(flashes(erin.follow(while_locked)), policy)


def test_starting_email_codes_while_locked_says_when_to_retry(
    client_site: ClientSiteFactory, twofactor_server: TwoFactorServer, mailbox: Mailbox, new_user: NewUser
) -> None:
    """fay locks herself out with wrong codes while turning on email codes; asking for a new
    code then sends none and says when to try again, not an error page."""
    site = client_site(twofactor_server)
    policy = site.second_factor.policy()
    user_id = new_user("fay")
    fay = site.visitor()
    code = start_email_codes(fay, mailbox, user_id)
    wrong = next(digits for digits in ("000000", "111111") if digits != code)
    for _ in range(policy.lockout_threshold):
        assert fay.post("/enroll/email/confirm", code=wrong).status_code == 200
    assert site.second_factor.status(user_id).HasField("locked_until")

    again = fay.post("/enroll/email", contact=f"{user_id}@example.com")
    assert again.status_code == 302
    assert again.headers["Location"] == "/enroll"
    assert_says_wait(flashes(fay.follow(again)), policy)
