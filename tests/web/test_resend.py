"""The code prompt's "Send me a code by ..." buttons in Chromium: each waits only for its own method.

The server's resend cooldown (5 s in these tests) is per user and method: right after an
email code, a text may be asked for at once ("text me instead").
"""

from __future__ import annotations

import re
import secrets
import time

from playwright.sync_api import expect
from twofactor import Method, TwoFactorClient

from tests.web.conftest import ClientSiteFactory, NewUser, TwoFactorServer, VisitorFactory, flashes
from tests.web.mailbox import Mailbox
from tests.web.test_journey import enter_code, flash, heading, sign_in


def enable_sms_then_email(server: TwoFactorServer, mailbox: Mailbox, user_id: str, phone: str) -> None:
    """SMS, then email, turned on through the SDK. In this order the email code's cooldown
    ends last: once the prompt can send an email code, the text is free too."""
    with TwoFactorClient(server.target, token=server.app_token) as client:
        client.set_contact(user_id=user_id, email=f"{user_id}@example.com", phone=phone)
        before = server.lines_so_far()
        client.start_enrollment(user_id=user_id, method=Method.METHOD_SMS)
        code = server.sms_code_to(phone, after=before)
        enabled = client.confirm_enrollment(user_id=user_id, method=Method.METHOD_SMS, code=code)
        token = enabled.verification_token  # SMS is on: enrolling email needs the proof
        before = mailbox.count()
        client.start_enrollment(user_id=user_id, method=Method.METHOD_EMAIL, verification_token=token)
        code = mailbox.code_sent_to(f"{user_id}@example.com", after=before)
        client.confirm_enrollment(user_id=user_id, method=Method.METHOD_EMAIL, code=code)


def test_a_text_goes_out_at_once_after_an_email_code(
    visitor: VisitorFactory, new_user: NewUser, twofactor_server: TwoFactorServer, mailbox: Mailbox
) -> None:
    user_id = new_user("frank")
    phone = f"+1415555{secrets.randbelow(10_000):04d}"
    enable_sms_then_email(twofactor_server, mailbox, user_id, phone)
    frank = visitor("frank")
    page = frank.page
    sign_in(frank, user_id)
    heading(page, "Two-factor verification")
    by_email = page.get_by_role("button", name="Send me a code by email")
    by_sms = page.get_by_role("button", name="Send me a code by SMS")
    email_wait = page.locator("#resend-wait-email")
    sms_wait = page.locator("#resend-wait-sms")

    # The enrollment's email went out moments ago: its cooldown may still run (bounded).
    deadline = time.monotonic() + 30
    while True:
        expect(by_email).to_be_enabled()
        clicked_at_ms = time.time() * 1000
        by_email.click()
        flash(page, re.compile("We sent a code|A code was sent moments ago"))
        if "We sent a code" in page.locator(".flash").first.inner_text():
            break
        assert time.monotonic() < deadline, "the site kept refusing the email code"
    flash(page, re.compile(r"We sent a code to \S+@example\.com"))
    frank.shot("email-code-sent")

    # The SMS button is on at once (as the page came, not turned on by its script later):
    # it doesn't wait for the email's cooldown.
    assert by_sms.is_enabled()
    assert float(by_sms.get_attribute("data-enable-at") or 0) <= clicked_at_ms
    expect(sms_wait).to_have_count(0)
    # The email button waits for its own cooldown, and says so.
    expect(by_email).to_be_disabled()
    assert float(by_email.get_attribute("data-enable-at") or 0) > clicked_at_ms
    expect(email_wait).to_have_text(re.compile(r"^\s*You can ask for a new email code in \d s\.\s*$"))
    expect(by_email).to_have_attribute("aria-describedby", "resend-wait-email")

    # "Text me instead": the server sends it at once, and the email button keeps waiting.
    email_enable_at = float(by_email.get_attribute("data-enable-at") or 0)
    before = twofactor_server.lines_so_far()
    texted_at_ms = time.time() * 1000
    by_sms.click()
    masked = f"+1******{phone[-4:]}"
    flash(page, f"We sent a code to {masked}")
    frank.shot("text-sent-at-once")
    # Each button keeps its own time (read from the page, not from a countdown that a slow
    # machine may see run out): the email's as before, the SMS's from its own send.
    assert float(by_email.get_attribute("data-enable-at") or 0) == email_enable_at
    assert float(by_sms.get_attribute("data-enable-at") or 0) > texted_at_ms
    enter_code(frank, twofactor_server.sms_code_to(phone, after=before))
    heading(page, "Your account")


def send_button(page: str, noun: str) -> str:
    """The <button ...> tag of "Send me a code by `noun`" in the page's HTML."""
    found = re.search(rf"<button([^>]*)>Send me a code by {noun}</button>", page)
    assert found, f"no button to send a code by {noun}"
    return found.group(1)


def test_a_refused_resend_holds_only_its_own_method(
    client_site: ClientSiteFactory, new_user: NewUser, twofactor_server: TwoFactorServer, mailbox: Mailbox
) -> None:
    """RESEND_TOO_SOON for email (here: the email code is asked for twice in a row) turns off
    the email button until the server's retry_after, and leaves the SMS button alone."""
    user_id = new_user("grace")
    enable_sms_then_email(twofactor_server, mailbox, user_id, f"+1415555{secrets.randbelow(10_000):04d}")
    grace = client_site(twofactor_server).visitor()
    assert grace.sign_in(user_id) == "/login/verify"

    def ask_for_email_code() -> list[str]:
        sent = grace.post("/send-code", method="email", send_key=secrets.token_hex(8), back="/login/verify")
        return flashes(grace.follow(sent))

    # The enrollment's email code may have started the cooldown already; if not, this one does.
    said = ask_for_email_code()
    if not said[0].startswith("A code was sent moments ago"):
        assert said[0].startswith("We sent a code to "), said
        said = ask_for_email_code()
    assert said == ["A code was sent moments ago: you can ask for another when the button comes back."]

    page = grace.get("/login/verify").get_data(as_text=True)
    assert "disabled" not in send_button(page, "SMS")
    assert 'id="resend-wait-sms"' not in page
    assert "disabled" in send_button(page, "email")
    assert 'id="resend-wait-email"' in page
