"""CSRF and the session, as a browser meets them."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.web.conftest import VisitorFactory


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
