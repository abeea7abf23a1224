"""The whole journey of examples/web in Chromium, against the real twofactor server.

One person's story per test, a screenshot per step in test-artifacts/web/<test>/.
"""

from __future__ import annotations

import re
import time

from playwright.sync_api import Locator, Page, expect

from tests.web.conftest import Authenticator, NewUser, Site, TwoFactorServer, Visitor, VisitorFactory
from tests.web.mailbox import Mailbox


def sign_in(visitor: Visitor, user: str) -> None:
    page = visitor.page
    page.goto("/login")
    page.fill("#username", user)
    page.fill("#password", f"{user}-demo-password")
    page.get_by_role("button", name="Sign in").click()


def log_out(visitor: Visitor) -> None:
    visitor.page.get_by_role("button", name="Log out").click()
    expect(visitor.page.get_by_role("heading", name="Sign in")).to_be_visible()


def enter_code(visitor: Visitor, code: str, button: str = "Verify") -> None:
    visitor.page.fill("#code", code)
    visitor.page.get_by_role("button", name=button).click()


def heading(page: Page, text: str) -> None:
    expect(page.get_by_role("heading", level=1)).to_have_text(text)


def flash(page: Page, text: str | re.Pattern[str]) -> None:
    expect(page.locator(".flash").first).to_contain_text(text)


def method_state(page: Page, slug: str) -> Locator:
    return page.locator(f'#methods tr[data-method="{slug}"] .state')


def enroll_authenticator(visitor: Visitor) -> Authenticator:
    """From the enrollment page: start, read the key off the page, confirm with the app's code."""
    page = visitor.page
    page.get_by_role("button", name="Set up an authenticator app").click()
    heading(page, "Set up: Authenticator app")
    # The QR code is the PNG from StartEnrollment, and the browser can draw it.
    page.wait_for_function("() => document.querySelector('.qr img').naturalWidth > 0")
    app = Authenticator(page.locator("#secret").inner_text().strip())
    visitor.shot("authenticator-qr")
    enter_code(visitor, app.code(), "Turn on authenticator app")
    flash(page, "Authenticator app is on.")
    return app


def step_up_if_asked(visitor: Visitor, then: str, code: str) -> bool:
    """Wait for the page headed `then`, or for "Confirm it's you", answered with `code` (True).

    A server with step-up tokens (issue 12) counts a contact change as a credential
    change: it spends the session's proof, and the next sensitive call asks again.
    """
    title = visitor.page.get_by_role("heading", level=1)
    expect(title).to_have_text(re.compile(f"^({re.escape(then)}|Confirm it's you)$"))
    if title.inner_text() != "Confirm it's you":
        return False
    visitor.shot("step-up-after-contact-change")
    enter_code(visitor, code)
    return True


def save_new_phone(visitor: Visitor, phone: str, step_up_code: str) -> None:
    """Save a new number on the contacts page until the site asks for the code texted to it.

    The text to the new number is a send like any other: within the server's resend cooldown
    (5 s here) of the last code the site says so, and the form is saved again (bounded)."""
    page = visitor.page
    deadline = time.monotonic() + 30
    while True:
        heading(page, "Where codes are sent")
        page.fill("#phone", phone)
        page.get_by_role("button", name="Save").click()
        title = page.get_by_role("heading", level=1)
        expect(title).to_have_text(
            re.compile("^(Confirm your new phone|Confirm it's you|Where codes are sent)$")
        )
        if title.inner_text() == "Confirm your new phone":
            return
        if title.inner_text() == "Confirm it's you":
            enter_code(visitor, step_up_code)
            continue
        flash(page, "A code was sent moments ago")
        assert time.monotonic() < deadline, "the site kept refusing the new number"
        page.wait_for_timeout(500)


def backup_codes_on(page: Page) -> list[str]:
    expect(page.locator("#backup-codes li").first).to_be_visible()
    return [code.strip() for code in page.locator("#backup-codes li").all_inner_texts()]


def test_the_whole_journey(visitor: VisitorFactory, mailbox: Mailbox) -> None:
    alice = visitor("alice")
    page = alice.page

    # The password alone doesn't sign her in: 2FA is required and she has no method yet.
    page.goto("/login")
    alice.shot("login")
    sign_in(alice, "alice")
    heading(page, "Set up two-factor verification")
    expect(page.locator(".who")).to_have_text("alice (signing in)")
    page.goto("/account")
    heading(page, "Sign in")
    page.goto("/enroll")
    alice.shot("enrollment-required")

    # Enroll the authenticator: the key is read off the page; the first codes come with it.
    app = enroll_authenticator(alice)
    heading(page, "Your backup codes")
    codes = backup_codes_on(page)
    assert len(codes) == 10
    page.get_by_role("button", name="Copy to clipboard").click()
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()").split() == codes
    alice.shot("first-backup-codes")
    page.get_by_role("link", name="Done").click()
    heading(page, "Your account")
    expect(method_state(page, "authenticator")).to_have_text("On")
    alice.shot("account")

    # See the backup codes again (she has just passed a code: no prompt).
    page.get_by_role("link", name="Show backup codes").click()
    assert backup_codes_on(page) == codes
    alice.shot("backup-codes")

    # Log out, and in with the app's next code.
    log_out(alice)
    sign_in(alice, "alice")
    heading(page, "Two-factor verification")
    expect(page.get_by_role("button", name=re.compile("Send me a code"))).to_have_count(0)
    alice.shot("prompt")
    enter_code(alice, app.code())
    heading(page, "Your account")
    alice.shot("signed-in-with-authenticator")

    # Log in with a backup code.
    log_out(alice)
    sign_in(alice, "alice")
    enter_code(alice, codes[0])
    heading(page, "Your account")
    flash(page, "You used a backup code; 9 left.")
    alice.shot("signed-in-with-backup-code")

    # Get new codes: the old set stops working.
    page.get_by_role("link", name="Show backup codes").click()
    assert backup_codes_on(page) == codes[1:]
    page.get_by_role("button", name="Get new codes").click()
    flash(page, "New backup codes: the old ones no longer work.")
    new_codes = backup_codes_on(page)
    assert len(new_codes) == 10
    assert not set(new_codes) & set(codes)
    alice.shot("new-backup-codes")
    log_out(alice)
    sign_in(alice, "alice")
    enter_code(alice, codes[1])
    flash(page, "Wrong code.")
    alice.shot("old-backup-code-rejected")
    enter_code(alice, new_codes[0])
    heading(page, "Your account")

    # Enroll email, with the code from the SMTP sink.
    page.locator('#methods tr[data-method="email"]').get_by_role("link", name="Turn on").click()
    heading(page, "Set up two-factor verification")
    page.fill("#contact-email", "alice@example.com")
    before = mailbox.count()
    page.get_by_role("button", name="Send a code by email").click()
    if step_up_if_asked(alice, then="Set up: Email", code=new_codes[1]):
        heading(page, "Set up two-factor verification")  # back where she was; the address is on file
        page.get_by_role("button", name="Send a code by email").click()
    expect(page.get_by_text(re.compile(r"We sent a code to a\*+@example\.com"))).to_be_visible()
    alice.shot("email-code-sent")
    enter_code(alice, mailbox.code_sent_to("alice@example.com", after=before), "Turn on email")
    flash(page, "Email is on.")
    expect(method_state(page, "email")).to_have_text("On")
    alice.shot("email-enrolled")

    # Log in with an emailed code: "send me a code", and the cooldown it starts.
    log_out(alice)
    sign_in(alice, "alice")
    send = page.get_by_role("button", name="Send me a code by email")
    before = mailbox.count()
    clicked_at_ms = time.time() * 1000
    send.click()
    flash(page, re.compile("We sent a code|A code was sent moments ago"))
    if "moments ago" in page.locator(".flash").first.inner_text():
        # Still within the cooldown of the enrollment code: the button comes back by itself.
        alice.shot("resend-cooldown")
        expect(send).to_be_enabled()
        send.click()
        flash(page, "We sent a code to a")
    # The page knows the challenge's resend_after: the button stays off until then.
    assert float(send.get_attribute("data-enable-at") or 0) > clicked_at_ms
    alice.shot("login-code-sent")
    enter_code(alice, mailbox.code_sent_to("alice@example.com", after=before))
    heading(page, "Your account")

    # Disable a method.
    page.locator('#methods tr[data-method="email"]').get_by_role("link", name="Turn off").click()
    heading(page, "Turn off email?")
    page.get_by_role("button", name="Turn off").click()
    flash(page, "Email is off.")
    expect(method_state(page, "email")).to_have_text("Off")
    alice.shot("email-disabled")

    # An operator resets her 2FA (carol enrolls first: the policy requires it of everyone).
    carol = visitor("carol")
    sign_in(carol, "carol")
    heading(carol.page, "Set up two-factor verification")
    enroll_authenticator(carol)
    carol.page.get_by_role("link", name="Done").click()
    carol.page.get_by_role("link", name="Admin").click()
    heading(carol.page, "Users")
    expect(carol.page.get_by_text("Admin reset allowed")).to_be_visible()
    row = carol.page.locator('#users tr[data-user="alice"]')
    expect(row.locator(".methods")).to_have_text("Authenticator app")
    carol.shot("admin")
    row.get_by_role("link", name="Reset 2FA").click()
    carol.page.fill("#reason", "lost phone, checked by ticket 42")
    carol.page.get_by_role("button", name="Reset 2FA").click()
    flash(carol.page, "alice's two-factor setup is cleared")
    expect(row.locator(".methods")).to_have_text("none")
    expect(carol.page.locator("#audit .action").first).to_have_text("user_reset")
    carol.shot("after-reset")

    # Her next login must enroll again.
    log_out(alice)
    sign_in(alice, "alice")
    heading(page, "Set up two-factor verification")
    flash(page, "This site requires two-factor verification")
    alice.shot("must-enroll-again")
    again = enroll_authenticator(alice)
    assert again.totp.secret != app.totp.secret
    assert len(backup_codes_on(page)) == 10
    page.get_by_role("link", name="Done").click()
    expect(method_state(page, "authenticator")).to_have_text("On")
    alice.shot("enrolled-again")


def test_sensitive_pages_ask_for_a_fresh_code(
    visitor: VisitorFactory, site: Site, twofactor_server: TwoFactorServer
) -> None:
    """Sudo mode: five minutes after the last code, backup codes and changes ask for one again."""
    bob = visitor("bob")
    page = bob.page
    sign_in(bob, "bob")
    app = enroll_authenticator(bob)
    codes = backup_codes_on(page)
    page.get_by_role("link", name="Done").click()
    page.get_by_role("link", name="Show backup codes").click()
    assert backup_codes_on(page) == codes
    page.get_by_role("link", name="Done").click()

    site.clock.offset += 301
    page.get_by_role("link", name="Show backup codes").click()
    heading(page, "Confirm it's you")
    bob.shot("step-up-prompt")
    enter_code(bob, app.code())
    expect(page).to_have_url(re.compile(r"/backup-codes$"))
    assert backup_codes_on(page) == codes
    bob.shot("backup-codes-after-step-up")

    # A form left open past the window: its POST asks for a code, then shows the form again.
    page.goto("/methods/authenticator/disable")
    heading(page, "Turn off authenticator app?")
    site.clock.offset += 301
    page.get_by_role("button", name="Turn off").click()
    heading(page, "Confirm it's you")
    enter_code(bob, codes[0])  # a backup code is a second factor too
    expect(page).to_have_url(re.compile(r"/methods/authenticator/disable$"))
    page.get_by_role("button", name="Turn off").click()
    flash(page, "turn on another method first")  # the policy forces 2FA: not the last method
    expect(method_state(page, "authenticator")).to_have_text("On")
    bob.shot("last-method-kept")

    # Within the window the site asks nothing: set a mobile number, enroll SMS with the texted code.
    page.get_by_role("link", name="Change").click()
    heading(page, "Where codes are sent")
    page.fill("#phone", "+14155550123")
    page.get_by_role("button", name="Save").click()
    flash(page, "phone: +1******0123")
    bob.shot("phone-saved")
    page.locator('#methods tr[data-method="sms"]').get_by_role("link", name="Turn on").click()
    before = twofactor_server.lines_so_far()
    page.get_by_role("button", name="Send a code by SMS").click()
    if step_up_if_asked(bob, then="Set up: Text message (SMS)", code=codes[1]):
        heading(page, "Set up two-factor verification")
        page.get_by_role("button", name="Send a code by SMS").click()
    expect(page.get_by_text("We sent a code to +1******0123")).to_be_visible()
    enter_code(bob, twofactor_server.sms_code_to("+14155550123", after=before), "Turn on SMS")
    flash(page, "Text message (SMS) is on.")
    expect(method_state(page, "sms")).to_have_text("On")
    bob.shot("sms-enrolled")

    # A new number for SMS, which is on: a text goes to it first, and a wrong code changes nothing.
    page.get_by_role("link", name="Change").click()
    before = twofactor_server.lines_so_far()
    save_new_phone(bob, "+14155550124", step_up_code=codes[2])
    expect(page.get_by_text("We sent a code to +1******0124")).to_be_visible()
    bob.shot("new-phone-code-sent")
    code = twofactor_server.sms_code_to("+14155550124", after=before)
    # He leaves the page before the text arrives; the account page leads him back to the code.
    page.goto("/account")
    waiting = page.locator('.pending-contact[data-method="sms"]')
    expect(waiting).to_contain_text("waits for the code we sent to +1******0124")
    bob.shot("new-phone-waiting")
    waiting.get_by_role("link", name="Enter the code").click()
    heading(page, "Confirm your new phone")
    expect(page.get_by_text("We sent a code to +1******0124")).to_be_visible()
    page.fill("#code", "000000" if code != "000000" else "111111")
    page.get_by_role("button", name="Use this phone").click()
    flash(page, "Wrong code.")
    page.fill("#code", code)
    page.get_by_role("button", name="Use this phone").click()
    flash(page, "Your phone is now +1******0124.")
    expect(page.locator(".pending-contact")).to_have_count(0)
    bob.shot("new-phone-confirmed")
    # Nothing waits any more: the old link says so instead of showing a form for no code.
    page.goto("/contacts/sms/confirm")
    heading(page, "Where codes are sent")
    flash(page, "That change has expired or was replaced: make it again.")


def test_wrong_codes_at_enrollment_end_in_a_lockout_that_says_when_to_retry(
    visitor: VisitorFactory, new_user: NewUser
) -> None:
    """The wrong code that locks the user out, and a try while locked (even with the right
    code), show when to try again: not "attempts left", not an error page."""
    erin = visitor("erin")
    page = erin.page
    sign_in(erin, new_user("erin"))
    page.get_by_role("button", name="Set up an authenticator app").click()
    heading(page, "Set up: Authenticator app")
    app = Authenticator(page.locator("#secret").inner_text().strip())

    def confirm(code: str) -> str:
        with page.expect_response(lambda response: response.url.endswith("/confirm")) as answer:
            enter_code(erin, code, "Turn on authenticator app")
        assert answer.value.status == 200
        heading(page, "Set up: Authenticator app")
        return page.locator(".flash").first.inner_text()

    left: int | None = None
    for _ in range(10):  # the server's lockout threshold (5 by default) is well below
        message = confirm(wrong_code(app))
        if left == 1:
            break  # this was the wrong code that locks
        found = re.fullmatch(r"Wrong code\. (\d+) attempts left before a lockout\.", message)
        assert found, message
        left = int(found.group(1))
    assert re.fullmatch(r"Too many wrong codes: try again in \d+ seconds\.", message), message
    erin.shot("locked-by-the-last-wrong-code")

    message = confirm(app.code())
    assert re.fullmatch(r"Too many wrong codes: try again in \d+ seconds\.", message), message
    erin.shot("still-locked")


def wrong_code(app: Authenticator) -> str:
    """Six digits that none of the steps the server accepts now (or soon) would match."""
    now = time.time()
    accepted = {app.totp.at(now + 30 * step) for step in range(-2, 3)}
    return next(
        code for code in ("000000", "111111", "222222", "333333", "444444", "555555") if code not in accepted
    )
