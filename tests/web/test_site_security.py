"""CSRF, the session and redirects, as a browser meets them."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.web.conftest import NewUser, Site, VisitorFactory
from tests.web.test_journey import backup_codes_on, enroll_authenticator, enter_code, flash, heading, sign_in


def test_a_post_without_the_csrf_token_is_refused(visitor: VisitorFactory) -> None:
    dave = visitor("dave")
    page = dave.page
    page.goto("/login")
    before_login = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    assert before_login

    credentials: dict[str, str | float | bool] = {"username": "dave", "password": "dave-demo-password"}
    assert page.request.post("/login", form=credentials).status == 403
    assert page.request.post("/login", form={**credentials, "csrf_token": "forged"}).status == 403

    # With the token from the form the same login goes through, in a new session with a new token.
    page.fill("#username", "dave")
    page.fill("#password", "dave-demo-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Set up two-factor verification")
    after_login = page.locator('input[name="csrf_token"]').first.get_attribute("value")
    assert after_login and after_login != before_login
    assert page.request.post("/logout", form={"csrf_token": before_login}).status == 403

    # A form whose token is gone (as in a forged cross-site form): 403 in the browser too.
    page.locator('form[action="/logout"] input[name="csrf_token"]').evaluate("input => input.remove()")
    with page.expect_response(lambda response: response.url.endswith("/logout")) as refused:
        page.get_by_role("button", name="Log out").click()
    assert refused.value.status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("Forbidden")
    dave.shot("csrf-refused")


def test_the_code_prompt_returns_only_to_this_site(
    visitor: VisitorFactory, site: Site, new_user: NewUser
) -> None:
    """A link to the prompt whose `next` hides another host behind a tab (browsers drop it:
    `/<tab>/example.org` is `//example.org`) still ends on the site's own page.

    Without safe_next's check Chrome doesn't get there: the site's CSP (form-action 'self')
    makes it abort the form's redirect off the site, leaving the prompt on the screen; a
    browser without that check would follow it to example.org.
    """
    erin = visitor("erin")
    page = erin.page
    sign_in(erin, new_user("erin"))
    app = enroll_authenticator(erin)
    page.get_by_role("link", name="Done").click()

    page.goto("/step-up?next=/%09/example.org/phish")
    heading(page, "Confirm it's you")
    erin.shot("step-up-with-hostile-next")
    enter_code(erin, app.code())

    heading(page, "Your account")
    assert page.url == f"{site.url}/account"
    erin.shot("back-on-the-site")


def test_a_link_from_another_site_shows_no_backup_codes(
    visitor: VisitorFactory, site: Site, new_user: NewUser
) -> None:
    """Showing the backup codes is audited and mailed to the user: a link on another site, which
    the browser follows with the session cookie (SameSite=Lax lets a top-level GET through),
    lands on the account page instead, and the site's own link still shows them."""
    fay = visitor("fay")
    page = fay.page
    sign_in(fay, new_user("fay"))
    enroll_authenticator(fay)  # the confirmation's step-up proof is fresh: nothing else stops it
    codes = backup_codes_on(page)
    page.route(
        "http://elsewhere.example/",
        lambda route: route.fulfill(
            content_type="text/html",
            body=f'<a id="lure" href="{site.url}/backup-codes">win a prize</a>',
        ),
    )
    page.goto("http://elsewhere.example/")
    page.click("#lure")  # Chromium says where it came from: Sec-Fetch-Site: cross-site
    heading(page, "Your account")
    flash(page, "Open your backup codes from this page.")
    expect(page.locator("#backup-codes li")).to_have_count(0)
    fay.shot("lured-to-backup-codes")
    page.get_by_role("link", name="Show backup codes").click()
    assert backup_codes_on(page) == codes


def test_a_sign_in_ends_eight_hours_after_the_login_however_busy(
    visitor: VisitorFactory, site: Site, new_user: NewUser
) -> None:
    """The session cookie is signed again at each request; the sign-in itself lasts 8 hours."""
    gil = visitor("gil")
    page = gil.page
    sign_in(gil, new_user("gil"))
    enroll_authenticator(gil)
    for hour in range(8):  # a request every hour keeps the cookie fresh, not the sign-in
        site.clock.offset += 3600 if hour < 7 else 3600 - 120  # the test's own time: under 2 minutes
        page.goto("/account")
        heading(page, "Your account")
    site.clock.offset += 240
    page.goto("/account")
    heading(page, "Sign in")
    gil.shot("signed-out-after-eight-hours")
