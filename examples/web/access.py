"""Who may see what, and the small helpers every page uses."""

from __future__ import annotations

import datetime
import functools
import unicodedata
from collections.abc import Callable
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

from flask import abort, current_app, flash, redirect, url_for
from werkzeug.wrappers import Response

from . import sessions
from .second_factor import METHODS, MethodInfo, SecondFactor
from .users import USERS, User

P = ParamSpec("P")
R = TypeVar("R")


def tf() -> SecondFactor:
    """The twofactor calls (second_factor.SecondFactor) of this app."""
    second_factor: SecondFactor = current_app.extensions["web.second_factor"]
    return second_factor


def signed_in(view: Callable[P, R]) -> Callable[P, R | Response]:
    @functools.wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | Response:
        if sessions.signed_in_user() is None:
            return redirect(url_for("login.login_form"))
        return view(*args, **kwargs)

    return guarded


def admin_only(view: Callable[P, R]) -> Callable[P, R | Response]:
    """An operator who has a second factor enabled.

    An operator without one is sent to set one up first: otherwise the password
    alone could reset anybody's second factor (sudo mode lets a user with no
    method through, for their first enrollment).
    """

    @functools.wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | Response:
        user = USERS.get(sessions.signed_in_user() or "")
        if user is None or not user.is_admin:
            abort(403, "Operators only.")
        if not tf().status(user.user_id).enabled_methods:
            flash("Operators need two-factor verification: set up a method to use the admin page.", "warning")
            return redirect(url_for("enrollment.enroll_form"))
        return view(*args, **kwargs)

    return guarded


def may_enroll(view: Callable[P, R]) -> Callable[P, R | Response]:
    """A signed-in user, or one half-way through a login who has no method yet.

    Someone who only knows the password of a user with a method must pass that
    method first: enrolling a new one would get round it.
    """

    @functools.wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | Response:
        if sessions.signed_in_user() is None:
            user_id = sessions.pending_user()
            if user_id is None:
                return redirect(url_for("login.login_form"))
            if tf().status(user_id).enabled_methods:
                return redirect(url_for("login.login_verify_form"))
        return view(*args, **kwargs)

    return guarded


def current_user() -> User:
    user_id = sessions.current_user()
    if user_id is None or user_id not in USERS:
        abort(403)
    return USERS[user_id]


def safe_next(target: str | None, default: str = "/account") -> str:
    """`target` when it is a path on this site, else `default` (no open redirect).

    Browsers read more into a Location than it says: they drop tabs and newlines
    inside it (a slash, a tab, then `/evil.example` is `//evil.example`: another
    host), read a backslash as a slash, and strip leading control characters and
    spaces. So only a plain path passes: one leading slash, no backslash, no
    whitespace or control character anywhere (a newline would also make the
    redirect itself fail), and neither a scheme nor a host.
    """
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in target):
        return default
    try:
        parts = urlsplit(target)
    except ValueError:
        return default
    return target if not parts.scheme and not parts.netloc else default


def lockout_message(retry_after: datetime.timedelta | None) -> str:
    """What a locked-out user reads: when to try again, or that an operator must unlock them."""
    if retry_after is None:
        return "Too many wrong codes: an administrator must unlock your account."
    seconds = max(1, int(retry_after.total_seconds() + 0.999))
    wait = f"{seconds} second{'s' * (seconds > 1)}" if seconds < 120 else f"{(seconds + 59) // 60} minutes"
    return f"Too many wrong codes: try again in {wait}."


def time_left_locked(user_id: str) -> datetime.timedelta | None:
    """How long the user stays locked out, from GetStatus (a ConfirmEnrollment or ConfirmContact
    that locked them doesn't say); None when only an operator can unlock them."""
    status = tf().status(user_id)
    if status.locked_permanently or not status.HasField("locked_until"):
        return None
    return datetime.timedelta(seconds=max(0.0, status.locked_until.ToNanoseconds() / 1e9 - sessions.now()))


def method_info(slug: str) -> MethodInfo:
    if slug not in METHODS:
        abort(404)
    return METHODS[slug]
