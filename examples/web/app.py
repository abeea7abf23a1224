"""The Flask app: `create_app(settings)` wires the pages, the session and the twofactor calls.

The pages, thin views that check who is asking, call second_factor and render
a template, are in login.py, enrollment.py, account.py and admin.py; README.md
lists each with the RPCs behind it. `python -m examples.web` serves the app.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import twofactor
from flask import Flask, current_app, render_template
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from . import account, admin, enrollment, login, sessions
from .second_factor import BY_METHOD, SecondFactor
from .settings import SiteSettings
from .users import USERS


def create_app(
    settings: SiteSettings,
    *,
    second_factor: SecondFactor | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_NAME="site_session",
        SESSION_COOKIE_HTTPONLY=True,  # no script reads the session
        SESSION_COOKIE_SAMESITE="Lax",  # a second line of defence behind the CSRF token
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        # Also the signature's max age, from the last request; a sign-in's own bound counts from the login.
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(seconds=sessions.SIGNED_IN_SECONDS),
    )
    app.extensions["web.second_factor"] = second_factor or SecondFactor.connect(settings)
    app.extensions["web.clock"] = clock
    app.before_request(sessions.check_csrf)
    app.after_request(_security_headers)
    app.context_processor(_template_globals)
    app.add_template_filter(lambda method: BY_METHOD[method].label, "method_label")
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(twofactor.TwoFactorError, _service_error)
    for pages in (login.pages, enrollment.pages, account.pages, admin.pages):
        app.register_blueprint(pages)
    return app


def _template_globals() -> dict[str, object]:
    user = USERS.get(sessions.signed_in_user() or "")
    return {
        "csrf_field": sessions.csrf_field,
        "signed_in": user,
        "pending": sessions.pending_user() if user is None else None,
    }


def _security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.mimetype == "text/html":
        response.headers["Cache-Control"] = "no-store"  # pages show secrets and backup codes
    return response


def _http_error(error: HTTPException) -> tuple[str, int]:
    return render_template("error.html", title=error.name, message=error.description), error.code or 500


def _service_error(error: twofactor.TwoFactorError) -> tuple[str, int]:
    # Fail closed: without an answer from twofactor nobody signs in or changes anything.
    current_app.logger.warning("twofactor call failed: %s [request id %s]", error, error.request_id)
    if isinstance(error, twofactor.Unavailable | twofactor.DeadlineExceeded):
        message = "The verification service didn't answer. Try again in a moment."
        return render_template("error.html", title="Try again later", message=message), 503
    # The request id finds the call in the twofactor server's log and audit log.
    message = f"The verification service refused the request (request id {error.request_id})."
    return render_template("error.html", title="Something went wrong", message=message), 502
