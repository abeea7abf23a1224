"""The login session: Flask's signed cookie, and what a real site does with it.

A visitor is in one of three states:

- anonymous: the session holds only a CSRF token;
- pending: the password was right (`pending_user`), the second factor not yet
  passed; only the code prompt, and enrollment for a user with no method yet, are open;
- signed in (`user`): set only once the second factor passed (or the user has
  none and the policy doesn't require one).

Each change of state clears the session and gives it a new id and CSRF token,
so a session planted before the login (session fixation) or a CSRF token seen
before it is worth nothing after it.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable

from flask import abort, current_app, request, session
from markupsafe import Markup

PENDING_SECONDS = 600  # the second factor must follow the password within 10 minutes
# A sign-in lasts 8 hours from the login, however busy: the session cookie is signed again at
# every write, so its own max age (PERMANENT_SESSION_LIFETIME) counts from the last request.
SIGNED_IN_SECONDS = 8 * 3600
_CSRF_FIELD = "csrf_token"
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def now() -> float:
    """The site's clock (injectable, so tests can move it)."""
    clock: Callable[[], float] = current_app.extensions["web.clock"]
    return clock()


# -- CSRF: a synchronizer token in the session and in every form --------------------------------


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def csrf_field() -> Markup:
    """The hidden input every POST form carries (templates call {{ csrf_field() }})."""
    return Markup('<input type="hidden" name="{}" value="{}">').format(_CSRF_FIELD, csrf_token())


def check_csrf() -> None:
    """Refuse (403) any state-changing request whose form lacks this session's token."""
    if request.method not in _UNSAFE_METHODS:
        return
    expected = session.get("csrf", "")
    sent = request.form.get(_CSRF_FIELD, "")
    if not expected or not sent or not hmac.compare_digest(str(expected), sent):
        abort(403, "The form is missing its CSRF token or it has expired: reload the page and try again.")


def from_another_site() -> bool:
    """Whether the browser says this request came from another site's page (Fetch Metadata):
    SameSite=Lax sends the session cookie with a top-level GET from any link, so a GET with an
    effect (showing the backup codes is audited and mailed) must not run for one."""
    return request.headers.get("Sec-Fetch-Site", "same-origin") in ("cross-site", "same-site")


# -- login states -------------------------------------------------------------------------------


def _new_session() -> None:
    session.clear()
    session["sid"] = secrets.token_urlsafe(16)  # rotated at every change of state
    session["csrf"] = secrets.token_urlsafe(32)


def start_pending_login(user_id: str) -> None:
    """The password was right: the second factor comes next."""
    _new_session()
    session["pending_user"] = user_id
    session["pending_since"] = now()


def pending_user() -> str | None:
    return _user_within("pending_user", "pending_since", PENDING_SECONDS)


def complete_login(user_id: str) -> None:
    """Both factors passed: the visitor is signed in, in a brand-new session."""
    _new_session()
    session["user"] = user_id
    session["signed_in_at"] = now()


def signed_in_user() -> str | None:
    return _user_within("user", "signed_in_at", SIGNED_IN_SECONDS)


def _user_within(key: str, since_key: str, seconds: float) -> str | None:
    """The session's user under `key`, unless `since_key` is more than `seconds` ago."""
    user_id = session.get(key)
    if user_id is None or now() - float(session.get(since_key, 0)) > seconds:
        return None
    return str(user_id)


def current_user() -> str | None:
    """Signed in, or half-way through a login."""
    return signed_in_user() or pending_user()


def log_out() -> None:
    _new_session()


# -- per-login state of sent codes, for the resend cooldown ------------------------------------
# The server's cooldown is per user and method: after an email code a text may go out at once.
# So the session keeps, per method slug, when its next code may be asked for and where its
# last one went: {"email": {"resend_after": 1234.5, "sent_to": "a***@example.com"}, ...}.


def note_code_sent(method: str, masked_destination: str, resend_after: float) -> None:
    _note(method, sent_to=masked_destination, resend_after=resend_after)


def note_resend_wait(method: str, resend_after: float) -> None:
    """The server refused a code by `method` until `resend_after`: the other methods don't wait."""
    _note(method, resend_after=resend_after)


def resend_after(method: str) -> float:
    return float(_codes_sent().get(method, {}).get("resend_after", 0.0))


def code_sent_to(method: str) -> str:
    return str(_codes_sent().get(method, {}).get("sent_to", ""))


def _codes_sent() -> dict[str, dict[str, float | str]]:
    return dict(session.get("codes_sent", {}))


def _note(method: str, **fields: float | str) -> None:
    codes_sent = _codes_sent()
    codes_sent[method] = {**codes_sent.get(method, {}), **fields}
    session["codes_sent"] = codes_sent  # a new dict: Flask sees the change and signs the cookie again
