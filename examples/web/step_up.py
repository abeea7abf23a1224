"""Sudo mode: a sensitive change needs a second-factor check within the last five minutes.

All of the step-up logic of the site is in this module:

- `record(response)` after an accepted Verify or ConfirmEnrollment notes when the
  second factor was last passed and, once the server returns one, the response's
  `verification_token` (issue 12 adds that field; until then it isn't there).
- `token_argument(...)` passes that token to GetBackupCodes, RegenerateBackupCodes,
  DisableMethod, StartEnrollment and SetContact, but only when the request message
  (and the SDK method) has the field, so the site runs against servers before and
  after issue 12.
- `@required` guards a view: without a fresh check it shows the code prompt, which
  returns to the same page (`@required_back_to(endpoint)` for a POST with no page
  of its own). So does a FAILED_PRECONDITION with reason STEP_UP_REQUIRED from
  the server: its own window may be shorter than ours, and a change (new backup
  codes, a method, a contact) makes older tokens invalid. A user with no method
  yet passes `@required` (their first enrollment needs no proof);
  `@required_always`, for an operator's change to somebody else's account, makes
  no such exception.

The site asks on its own even when the server doesn't: the window is the
site's policy ("sudo mode"), the token is the server's proof.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import twofactor
from flask import current_app, redirect, request, session, url_for
from google.protobuf.message import Message
from werkzeug.wrappers import Response

from . import sessions

WINDOW_SECONDS = 300  # like the server's TWOFACTOR_STEP_UP_SECONDS default
TOKEN_FIELD = "verification_token"  # noqa: S105 (a field name, not a secret)
STEP_UP_REQUIRED = "STEP_UP_REQUIRED"

P = ParamSpec("P")
R = TypeVar("R")


def has_token_field(message_type: type[Message]) -> bool:
    """Whether this version of the contract has the step-up token in the message."""
    return TOKEN_FIELD in message_type.DESCRIPTOR.fields_by_name


def record(response: Message) -> None:
    """The user just passed a second-factor check in this session."""
    session["second_factor_at"] = sessions.now()
    token = getattr(response, TOKEN_FIELD, "") if has_token_field(type(response)) else ""
    if token:
        session["verification_token"] = token
    else:
        session.pop("verification_token", None)


def forget() -> None:
    session.pop("second_factor_at", None)
    session.pop("verification_token", None)


def is_fresh() -> bool:
    passed_at = session.get("second_factor_at")
    return passed_at is not None and sessions.now() - float(passed_at) <= WINDOW_SECONDS


def token() -> str:
    return str(session.get("verification_token", ""))


def token_argument(request_type: type[Message], sdk_method: Callable[..., Any], value: str) -> dict[str, Any]:
    """{"verification_token": value} where the request message and the SDK method take it, else {}."""
    if value and has_token_field(request_type) and TOKEN_FIELD in inspect.signature(sdk_method).parameters:
        return {TOKEN_FIELD: value}
    return {}


def prompt(back_to: str | None) -> Response:
    """Ask for a code, then go to the page of endpoint `back_to`, or by default back to this URL
    (a GET: a POST's form is at the same URL, shown again)."""
    return redirect(url_for("login.step_up_form", next=url_for(back_to) if back_to else request.path))


def required(view: Callable[P, R]) -> Callable[P, R | Response]:
    """Guard a view that shows or changes the user's second factor (below its access check)."""
    return _guarded(view, back_to=None, first_enrollment_passes=True)


def required_back_to(endpoint: str) -> Callable[[Callable[P, R]], Callable[P, R | Response]]:
    """`required`, for a POST with no page at its own URL: the prompt returns to `endpoint`."""
    return functools.partial(_guarded, back_to=endpoint, first_enrollment_passes=True)


def required_always(view: Callable[P, R]) -> Callable[P, R | Response]:
    """`required` without the exception for a user who has no method: a fresh check, always.

    For changes to other people's accounts (an operator's reset). Its access check sends
    a user with no method elsewhere first: the prompt would have nothing to ask them for.
    """
    return _guarded(view, back_to=None, first_enrollment_passes=False)


def _guarded(
    view: Callable[P, R], *, back_to: str | None, first_enrollment_passes: bool
) -> Callable[P, R | Response]:
    @functools.wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | Response:
        if _needs_check(first_enrollment_passes):
            return prompt(back_to)
        try:
            return view(*args, **kwargs)
        except twofactor.FailedPrecondition as error:
            if error.reason != STEP_UP_REQUIRED:
                raise
            forget()  # the server's window closed, or a change (new codes, a contact) spent the proof
            return prompt(back_to)

    return guarded


def _needs_check(first_enrollment_passes: bool) -> bool:
    if is_fresh():
        return False
    if not first_enrollment_passes:
        return True
    # A user with no method enabled has nothing to step up with (and the first
    # enrollment needs no proof); everyone else proves a recent check.
    user_id = sessions.current_user()
    return bool(user_id and current_app.extensions["web.second_factor"].status(user_id).enabled_methods)
