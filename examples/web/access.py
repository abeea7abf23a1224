"""Who may see what, and the small helpers every page uses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import abort, current_app, redirect, url_for
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


def admin_only(view: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        user = USERS.get(sessions.signed_in_user() or "")
        if user is None or not user.is_admin:
            abort(403, "Operators only.")
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
    """Only a path on this site: never `//evil.example` or `https://...` (open redirect)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return default


def method_info(slug: str) -> MethodInfo:
    if slug not in METHODS:
        abort(404)
    return METHODS[slug]
