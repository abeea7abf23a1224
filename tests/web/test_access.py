"""examples/web's access helpers without a browser: where the code prompt may send the user back to."""

from __future__ import annotations

import datetime
from urllib.parse import unquote

import pytest

from examples.web.access import lockout_message, safe_next


@pytest.mark.parametrize(
    "target",
    [
        "/account",
        "/backup-codes",
        "/methods/authenticator/disable",
        "/admin?user=alice",
        "/admin/users/alice%2Fbob/reset",  # an escaped slash stays in the path
        "/account#methods",
        "/caf\u00e9",
    ],
)
def test_a_path_on_this_site_is_kept(target: str) -> None:
    assert safe_next(target) == target


@pytest.mark.parametrize(
    "target",
    [
        None,
        "",
        "account",  # relative: not a path from the root
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\\/evil.example",
        "/account\\..\\..\\evil",
        "/\t/evil.example",  # browsers drop the tab: //evil.example
        unquote("/%09/evil.example"),  # the same, as ?next=/%09/evil.example arrives
        "/\n/evil.example",  # a newline would also make the redirect raise ValueError
        "/\r\n/evil.example",
        unquote("/%0d%0aSet-Cookie:x=y"),
        "/ /evil.example",
        "\t//evil.example",
        " /account",
        "/account\x00",
        "/\x7f/evil.example",
        "/\u0085/evil.example",  # a C1 control (NEL)
        "/\u200b/evil.example",  # a zero-width space (a format character)
        "/\u3000/evil.example",  # an ideographic space
        "https://evil.example",
        "https:/evil.example",
        "http://127.0.0.1/account",
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "mailto:someone@evil.example",
    ],
)
def test_anything_else_goes_to_the_default_page(target: str | None) -> None:
    assert safe_next(target) == "/account"
    assert safe_next(target, default="/admin") == "/admin"


@pytest.mark.parametrize(
    ("retry_after", "message"),
    [
        (datetime.timedelta(seconds=59.2), "Too many wrong codes: try again in 60 seconds."),
        (datetime.timedelta(seconds=0), "Too many wrong codes: try again in 1 second."),
        (datetime.timedelta(minutes=15), "Too many wrong codes: try again in 15 minutes."),
        (None, "Too many wrong codes: an administrator must unlock your account."),
    ],
)
def test_the_lockout_message_says_when_to_try_again(
    retry_after: datetime.timedelta | None, message: str
) -> None:
    assert lockout_message(retry_after) == message
