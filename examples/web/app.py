"""The site's pages. Thin views: check who is asking, call second_factor, render a template.

`create_app(settings)` builds the Flask app; `python -m examples.web` serves it.
README.md lists each page with the RPCs behind it.
"""

from __future__ import annotations

import base64
import datetime
import functools
import time
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import twofactor
from flask import Blueprint, Flask, abort, current_app, flash, redirect, render_template, request, url_for
from twofactor import CodeKind, Method, VerifyResult
from twofactor.v1.twofactor_service_pb2 import VerifyResponse
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from . import sessions, step_up
from .second_factor import BY_METHOD, METHODS, MethodInfo, SecondFactor
from .settings import SiteSettings
from .users import USERS, User, check_password

P = ParamSpec("P")
R = TypeVar("R")

site = Blueprint("site", __name__)


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
        PERMANENT_SESSION_LIFETIME=datetime.timedelta(hours=8),  # also the signature's max age
    )
    app.extensions["web.second_factor"] = second_factor or SecondFactor.connect(settings)
    app.extensions["web.clock"] = clock
    app.before_request(sessions.check_csrf)
    app.after_request(_security_headers)
    app.context_processor(_template_globals)
    app.add_template_filter(lambda method: BY_METHOD[method].label, "method_label")
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(twofactor.TwoFactorError, _service_error)
    app.register_blueprint(site)
    return app


def tf() -> SecondFactor:
    second_factor: SecondFactor = current_app.extensions["web.second_factor"]
    return second_factor


# -- access ---------------------------------------------------------------------------------------


def signed_in(view: Callable[P, R]) -> Callable[P, R | Response]:
    @functools.wraps(view)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R | Response:
        if sessions.signed_in_user() is None:
            return redirect(url_for(".login_form"))
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
                return redirect(url_for(".login_form"))
            if tf().status(user_id).enabled_methods:
                return redirect(url_for(".login_verify_form"))
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


# -- password, then the second factor -------------------------------------------------------------


@site.get("/")
def home() -> Response:
    return redirect(url_for(".account" if sessions.signed_in_user() else ".login_form"))


@site.get("/login")
def login_form() -> str:
    return render_template("login.html")


@site.post("/login")
def login() -> Response | tuple[str, int]:
    user = check_password(request.form.get("username", "").strip(), request.form.get("password", ""))
    if user is None:
        flash("Wrong user name or password.", "error")
        return render_template("login.html", username=request.form.get("username", "")), 401
    status = tf().status(user.user_id)
    if status.enabled_methods:
        sessions.start_pending_login(user.user_id)
        return redirect(url_for(".login_verify_form"))
    if status.enrollment_required:
        sessions.start_pending_login(user.user_id)
        flash("This site requires two-factor verification: set it up to finish signing in.", "info")
        return redirect(url_for(".enroll_form"))
    # No method, and the policy doesn't require one: the password is the whole login.
    sessions.complete_login(user.user_id)
    flash("Two-factor verification is off for your account: turn it on below.", "warning")
    return redirect(url_for(".account"))


@site.get("/login/verify")
def login_verify_form() -> str | Response:
    user_id = sessions.pending_user()
    if user_id is None:
        return redirect(url_for(".login_form"))
    return render_prompt(user_id, action=url_for(".login_verify"), step_up_for="")


@site.post("/login/verify")
def login_verify() -> Response:
    user_id = sessions.pending_user()
    if user_id is None:
        flash("Your sign-in took too long: start again.", "error")
        return redirect(url_for(".login_form"))
    outcome = check_code(user_id)
    if outcome is None:
        return redirect(url_for(".login_verify_form"))
    sessions.complete_login(user_id)
    step_up.record(outcome)
    note_backup_code_use(outcome)
    return redirect(url_for(".account"))


@site.get("/step-up")
@signed_in
def step_up_form() -> str:
    user_id = sessions.signed_in_user() or ""
    return render_prompt(
        user_id, action=url_for(".step_up_verify"), step_up_for=safe_next(request.args.get("next"))
    )


@site.post("/step-up")
@signed_in
def step_up_verify() -> Response:
    back = safe_next(request.form.get("next"))
    outcome = check_code(sessions.signed_in_user() or "")
    if outcome is None:
        return redirect(url_for(".step_up_form", next=back))
    step_up.record(outcome)
    note_backup_code_use(outcome)
    return redirect(back)


def render_prompt(user_id: str, *, action: str, step_up_for: str) -> str:
    """The code prompt: for the login (step_up_for="") or for sudo mode (the page to return to)."""
    status = tf().status(user_id)
    enabled = [BY_METHOD[m] for m in status.enabled_methods]
    wait = max(0, int(sessions.resend_after() - sessions.now() + 0.999))
    return render_template(
        "prompt.html",
        action=action,
        next=step_up_for,
        has_authenticator=Method.METHOD_AUTHENTICATOR in status.enabled_methods,
        sendable=[info for info in enabled if info.contact],
        send_key=uuid.uuid4().hex,  # one per rendered form: a double click sends once
        wait_seconds=wait,
        resend_at=sessions.resend_after(),
        sent_to=sessions.code_sent_to(),
        locked_until=status.locked_until.ToDatetime(datetime.UTC)
        if status.HasField("locked_until")
        else None,
    )


def check_code(user_id: str) -> VerifyResponse | None:
    """Verify the submitted code; None (with a message flashed) unless accepted."""
    try:
        outcome = tf().verify(user_id, request.form.get("code", "").strip())
    except twofactor.InvalidArgument:
        flash("That is not a code: type the digits you were given, or a backup code.", "error")
        return None
    except twofactor.UserLocked as error:
        flash(f"Too many wrong codes: try again in {error.retry_after or 'a while'}.", "error")
        return None
    if outcome.result == VerifyResult.VERIFY_RESULT_ACCEPTED:
        return outcome
    if outcome.result == VerifyResult.VERIFY_RESULT_LOCKED:
        wait = outcome.retry_after.ToTimedelta() if outcome.HasField("retry_after") else None
        flash(
            f"Too many wrong codes: try again in {wait}."
            if wait
            else "Too many wrong codes: an administrator must unlock your account.",
            "error",
        )
    else:
        flash(f"Wrong code. {outcome.attempts_left} attempts left before a lockout.", "error")
    return None


def note_backup_code_use(outcome: VerifyResponse) -> None:
    # Flashed after complete_login(), which starts a new session (and so drops earlier messages).
    if outcome.matched == CodeKind.CODE_KIND_BACKUP_CODE:
        flash(
            f"You used a backup code; {outcome.backup_codes_remaining} left. "
            "Get new ones from your account page when you run low.",
            "warning",
        )


@site.post("/send-code")
def send_code() -> Response:
    user_id = sessions.current_user()
    if user_id is None:
        return redirect(url_for(".login_form"))
    info = method_info(request.form.get("method", ""))
    back = safe_next(request.form.get("back"))
    try:
        challenge = tf().send_code(user_id, info.method, request.form.get("send_key", "")[:128])
    except twofactor.RateLimited as error:
        wait = error.retry_after.total_seconds() if error.retry_after else 60.0
        sessions.note_code_sent(sessions.code_sent_to(), sessions.now() + wait)
        if error.reason == "RESEND_TOO_SOON":
            flash("A code was sent moments ago: you can ask for another when the button comes back.", "info")
        else:  # an hourly limit (USER_SEND_LIMIT, DESTINATION_SEND_LIMIT)
            flash("Too many codes were sent: use another method or a backup code, or wait a while.", "error")
        return redirect(back)
    except (twofactor.ContactMissing, twofactor.NotEnrolled):
        flash(f"No {info.noun} is set up for your account: use another method.", "error")
        return redirect(back)
    except twofactor.UserLocked as error:
        flash(f"Too many wrong codes: try again in {error.retry_after or 'a while'}.", "error")
        return redirect(back)
    sessions.note_code_sent(challenge.masked_destination, challenge.resend_after.ToNanoseconds() / 1e9)
    flash(f"We sent a code to {challenge.masked_destination}.", "info")
    return redirect(back)


@site.post("/logout")
def logout() -> Response:
    sessions.log_out()
    flash("You are signed out.", "info")
    return redirect(url_for(".login_form"))


# -- the account page -----------------------------------------------------------------------------


@site.get("/account")
@signed_in
def account() -> str:
    status = tf().status(current_user().user_id)
    methods = [
        {
            "info": BY_METHOD[m],
            "enabled": m in status.enabled_methods,
            "pending": m in status.pending_methods,
        }
        for m in status.allowed_methods
    ]
    return render_template("account.html", status=status, methods=methods, fresh=step_up.is_fresh())


@site.get("/contacts")
@signed_in
@step_up.required
def contacts_form() -> str:
    return render_template("contacts.html", status=tf().status(current_user().user_id))


@site.post("/contacts")
@signed_in
@step_up.required
def contacts() -> Response | str:
    email, phone = request.form.get("email", "").strip(), request.form.get("phone", "").strip()
    try:
        result = tf().set_contact(
            current_user().user_id,
            # Empty leaves a contact as it is; the "remove" box sends "" (removes it).
            email="" if request.form.get("remove_email") else (email or None),
            phone="" if request.form.get("remove_phone") else (phone or None),
            token=step_up.token(),
        )
    except twofactor.InvalidArgument as error:
        flash(
            "That email address doesn't look right."
            if error.reason == "INVALID_EMAIL"
            else "Give the mobile number with its country code, like +14155550123.",
            "error",
        )
        return redirect(url_for(".contacts_form"))
    flash(f"Saved. Email: {result.masked_email or 'none'}; phone: {result.masked_phone or 'none'}.", "info")
    return redirect(url_for(".account"))


@site.get("/methods/<slug>/disable")
@signed_in
@step_up.required
def disable_form(slug: str) -> str:
    return render_template("disable.html", info=method_info(slug))


@site.post("/methods/<slug>/disable")
@signed_in
@step_up.required
def disable(slug: str) -> Response:
    info = method_info(slug)
    try:
        tf().disable_method(current_user().user_id, info.method, token=step_up.token())
    except twofactor.LastMethodRequired:
        flash("This site requires two-factor verification: turn on another method first.", "error")
        return redirect(url_for(".account"))
    except twofactor.NotEnrolled:
        pass  # already off (a second click, another tab): the outcome the user asked for
    flash(f"{info.label} is off.", "info")
    return redirect(url_for(".account"))


@site.get("/backup-codes")
@signed_in
@step_up.required
def backup_codes() -> str:
    codes = tf().backup_codes(current_user().user_id, token=step_up.token())
    return render_template("backup_codes.html", codes=codes, fresh_set=False)


@site.post("/backup-codes")
@signed_in
@step_up.required
def regenerate_backup_codes() -> str:
    # Rendered from the response, not redirected: the new set is in hand, and on a server
    # with step-up tokens the regeneration has made the session's token stale.
    codes = tf().regenerate_backup_codes(current_user().user_id, token=step_up.token())
    flash("New backup codes: the old ones no longer work.", "info")
    return render_template("backup_codes.html", codes=codes, fresh_set=True)


# -- enrollment -----------------------------------------------------------------------------------


@site.get("/enroll")
@may_enroll
@step_up.required
def enroll_form() -> str:
    status = tf().status(current_user().user_id)
    offered = [BY_METHOD[m] for m in status.allowed_methods if m not in status.enabled_methods]
    return render_template("enroll.html", offered=offered, status=status)


@site.post("/enroll/authenticator")
@may_enroll
@step_up.required
def enroll_authenticator() -> str:
    setup = tf().start_authenticator(current_user(), token=step_up.token())
    return render_template(
        "enroll_confirm.html",
        info=METHODS["authenticator"],
        secret=setup.secret,
        otpauth_uri=setup.otpauth_uri,
        # The QR code as StartEnrollment drew it, inline (nothing secret is stored to serve it later).
        qr_data_uri="data:image/png;base64," + base64.b64encode(setup.qr_png).decode(),
    )


@site.post("/enroll/<slug>")
@may_enroll
@step_up.required
def enroll_by_code(slug: str) -> Response | str:
    info = method_info(slug)
    user_id = current_user().user_id
    contact = request.form.get("contact", "").strip()
    try:
        if contact:
            tf().set_contact(
                user_id,
                email=contact if info.contact == "email" else None,
                phone=contact if info.contact == "phone" else None,
                token=step_up.token(),
            )
        challenge = tf().start_code_enrollment(user_id, info.method, token=step_up.token())
    except twofactor.InvalidArgument:
        flash(f"That {info.contact} doesn't look right.", "error")
        return redirect(url_for(".enroll_form"))
    except twofactor.ContactMissing:
        flash(f"Give your {info.contact} to receive the code.", "error")
        return redirect(url_for(".enroll_form"))
    except twofactor.RateLimited as error:
        flash(f"A code was sent moments ago: try again in {error.retry_after or 'a minute'}.", "error")
        return redirect(url_for(".enroll_form"))
    return render_template(
        "enroll_confirm.html",
        info=info,
        sent_to=challenge.masked_destination,
        expires_at=challenge.expires_at.ToDatetime(datetime.UTC),
    )


@site.post("/enroll/<slug>/confirm")
@may_enroll
def enroll_confirm(slug: str) -> Response | str:
    info = method_info(slug)
    user_id = current_user().user_id
    try:
        result = tf().confirm_enrollment(user_id, info.method, request.form.get("code", "").strip())
    except twofactor.InvalidArgument:
        flash("That is not a code: type the digits you were given.", "error")
        return render_template("enroll_confirm.html", info=info)
    except twofactor.NotEnrolled:
        flash("That setup has expired or was replaced: start again.", "error")
        return redirect(url_for(".enroll_form"))
    if not result.confirmed:
        flash(f"Wrong code. {result.attempts_left} attempts left before a lockout.", "error")
        return render_template("enroll_confirm.html", info=info)
    if sessions.signed_in_user() is None:
        sessions.complete_login(user_id)  # enrolling was this login's second factor
    step_up.record(result)
    flash(f"{info.label} is on.", "info")
    if result.backup_codes:  # the first method: the only time the codes come with the response
        return render_template("backup_codes.html", codes=list(result.backup_codes), fresh_set=True)
    return redirect(url_for(".account"))


# -- operators ------------------------------------------------------------------------------------


@site.get("/admin")
@signed_in
@admin_only
def admin() -> str:
    only_user = request.args.get("user", "").strip()
    return render_template(
        "admin.html",
        policy=tf().policy(),
        users=tf().users(),
        events=tf().audit_events(user_id=only_user),
        only_user=only_user,
    )


@site.get("/admin/users/<user_id>/reset")
@signed_in
@admin_only
@step_up.required
def reset_form(user_id: str) -> str:
    return render_template("reset.html", user_id=user_id)


@site.post("/admin/users/<user_id>/reset")
@signed_in
@admin_only
@step_up.required
def reset(user_id: str) -> Response:
    reason = request.form.get("reason", "").strip() or "reset from the admin page"
    try:
        tf().reset_user(user_id, f"{reason} (by {current_user().user_id})")
    except twofactor.AdminResetDisabled:
        flash("The policy doesn't allow resets.", "error")
        return redirect(url_for(".admin"))
    flash(f"{user_id}'s two-factor setup is cleared: they enroll again at their next login.", "info")
    return redirect(url_for(".admin", user=user_id))


# -- plumbing -------------------------------------------------------------------------------------


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
