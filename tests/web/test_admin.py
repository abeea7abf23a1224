"""examples/web's operator pages through Flask's test client, against real twofactor servers:
who may open them and reset, and what the page says a reset means.

`twofactor_server` forces 2FA; `optional_twofactor_server` leaves it optional, where an
operator's password alone signs them in while they have no method.
"""

from __future__ import annotations

import dataclasses

import pytest
from twofactor import Method

from examples.web.users import USERS
from tests.web.conftest import (
    Authenticator,
    ClientSite,
    ClientSiteFactory,
    NewUser,
    TwoFactorServer,
    flashes,
)

SENT_TO_ENROLL = "Operators need two-factor verification: set up a method to use the admin page."


@pytest.fixture
def new_operator(new_user: NewUser, monkeypatch: pytest.MonkeyPatch) -> NewUser:
    """new_operator("carol"): a `new_user` who is one of the site's operators."""

    def add(name: str) -> str:
        user_id = new_user(name)
        monkeypatch.setitem(USERS, user_id, dataclasses.replace(USERS[user_id], is_admin=True))
        return user_id

    return add


def user_with_authenticator(site: ClientSite, user_id: str) -> str:
    """`user_id` with the authenticator app on, set up with the site's own calls to the server."""
    setup = site.second_factor.start_authenticator(USERS[user_id], token="")
    confirmed = site.second_factor.confirm_enrollment(
        user_id, Method.METHOD_AUTHENTICATOR, Authenticator(setup.secret).code()
    )
    assert confirmed.confirmed
    return user_id


def enabled_methods(site: ClientSite, user_id: str) -> list[Method.ValueType]:
    return list(site.second_factor.status(user_id).enabled_methods)


@pytest.mark.parametrize("checked_now", [False, True])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin"), ("GET", "/admin/users/{user}/reset"), ("POST", "/admin/users/{user}/reset")],
)
def test_an_operator_without_a_second_factor_is_sent_to_set_one_up(
    client_site: ClientSiteFactory,
    optional_twofactor_server: TwoFactorServer,
    new_user: NewUser,
    new_operator: NewUser,
    method: str,
    path: str,
    checked_now: bool,
) -> None:
    """With 2FA optional the operator signs in with her password alone; no admin page opens for
    her, not even with a second-factor check a moment ago (from a method she has since turned off)."""
    site = client_site(optional_twofactor_server)
    alice = user_with_authenticator(site, new_user("alice"))
    carol = site.visitor()
    assert carol.sign_in(new_operator("carol")) == "/account"
    if checked_now:
        carol.enroll_authenticator()
        turned_off = carol.post("/methods/authenticator/disable")
        assert flashes(carol.follow(turned_off)) == ["Authenticator app is off."]

    response = carol.open(method, path.format(user=alice), reason="takeover")

    assert response.status_code == 302
    assert response.headers["Location"] == "/enroll"
    assert flashes(carol.follow(response)) == [SENT_TO_ENROLL]
    assert enabled_methods(site, alice) == [Method.METHOD_AUTHENTICATOR]


def test_an_operator_with_a_second_factor_sees_the_admin_page(
    client_site: ClientSiteFactory,
    optional_twofactor_server: TwoFactorServer,
    new_user: NewUser,
    new_operator: NewUser,
) -> None:
    """Sent to set up a method, she does; then the admin page opens, with the users on it."""
    site = client_site(optional_twofactor_server)
    alice = user_with_authenticator(site, new_user("alice"))
    carol = site.visitor()
    carol.sign_in(new_operator("carol"))
    first = carol.get("/admin")
    assert (first.status_code, first.headers.get("Location")) == (302, "/enroll")

    carol.enroll_authenticator()
    response = carol.get("/admin")

    assert response.status_code == 200
    assert f'data-user="{alice}"'.encode() in response.data


def test_a_reset_needs_a_fresh_check(
    client_site: ClientSiteFactory,
    twofactor_server: TwoFactorServer,
    new_user: NewUser,
    new_operator: NewUser,
) -> None:
    """Five minutes after her last code the operator is asked for another before a reset."""
    site = client_site(twofactor_server)
    alice = user_with_authenticator(site, new_user("alice"))
    carol = site.visitor()
    assert carol.sign_in(new_operator("carol")) == "/enroll"  # 2FA is forced
    carol.enroll_authenticator()  # her first code: signed in, checked just now
    site.clock.offset += 301

    response = carol.post(f"/admin/users/{alice}/reset", reason="lost phone")

    assert response.status_code == 302
    assert response.headers["Location"] == f"/step-up?next=/admin/users/{alice}/reset"
    assert enabled_methods(site, alice) == [Method.METHOD_AUTHENTICATOR]


@pytest.mark.parametrize(
    ("server", "form_says", "after"),
    [
        (
            "twofactor_server",
            "they set up a method again at their next login",
            "they enroll again at their next login",
        ),
        (
            "optional_twofactor_server",
            "until they turn it on again their password alone signs them in",
            "sign in with their password alone until they turn it on again",
        ),
    ],
    ids=["2fa-forced", "2fa-optional"],
)
def test_the_page_says_what_a_reset_user_meets_at_the_next_login(
    client_site: ClientSiteFactory,
    new_user: NewUser,
    new_operator: NewUser,
    request: pytest.FixtureRequest,
    server: str,
    form_says: str,
    after: str,
) -> None:
    """The policy of the server decides; and the reset user meets what the page said."""
    site = client_site(request.getfixturevalue(server))
    forced = site.second_factor.policy().force_two_factor
    assert forced == (server == "twofactor_server")
    alice = user_with_authenticator(site, new_user("alice"))
    carol = site.visitor()
    carol.sign_in(new_operator("carol"))
    carol.enroll_authenticator()

    form = carol.get(f"/admin/users/{alice}/reset")
    response = carol.post(f"/admin/users/{alice}/reset", reason="lost phone")

    assert form.status_code == 200
    assert form_says in " ".join(form.get_data(as_text=True).split())
    assert (b"next login" in form.data) == forced
    assert (b"their password alone signs them in" in form.data) != forced
    assert response.status_code == 302
    assert response.headers["Location"] == f"/admin?user={alice}"
    [message] = flashes(carol.follow(response))
    assert message.startswith(f"{alice}'s two-factor setup is cleared: ")
    assert after in message
    assert enabled_methods(site, alice) == []
    # What the page said: enroll again at the next login, or the password alone signs in.
    assert site.visitor().sign_in(alice) == ("/enroll" if forced else "/account")
