"""The sign-in: password, then the code prompt (with "send me a code"); sudo mode's prompt; logout."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass

import twofactor
from flask import Blueprint, flash, redirect, render_template, request, url_for
from twofactor import CodeKind, Method, VerifyResult
from twofactor.v1.twofactor_service_pb2 import VerifyResponse
from werkzeug.wrappers import Response

from . import sessions, step_up
from .access import lockout_message, method_info, safe_next, signed_in, tf
from .second_factor import BY_METHOD, MethodInfo
from .users import check_password

pages = Blueprint("login", __name__)


@pages.get("/")
def home() -> Response:
    return redirect(url_for("account.account" if sessions.signed_in_user() else ".login_form"))


@pages.get("/login")
def login_form() -> str:
    return render_template("login.html")


@pages.post("/login")
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
        return redirect(url_for("enrollment.enroll_form"))
    # No method, and the policy doesn't require one: the password is the whole login.
    sessions.complete_login(user.user_id)
    flash("Two-factor verification is off for your account: turn it on below.", "warning")
    return redirect(url_for("account.account"))


@pages.get("/login/verify")
def login_verify_form() -> str | Response:
    user_id = sessions.pending_user()
    if user_id is None:
        return redirect(url_for(".login_form"))
    return render_prompt(user_id, action=url_for(".login_verify"), step_up_for="")


@pages.post("/login/verify")
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
    return redirect(url_for("account.account"))


@pages.get("/step-up")
@signed_in
def step_up_form() -> str:
    user_id = sessions.signed_in_user() or ""
    return render_prompt(
        user_id, action=url_for(".step_up_verify"), step_up_for=safe_next(request.args.get("next"))
    )


@pages.post("/step-up")
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
    return render_template(
        "prompt.html",
        action=action,
        next=step_up_for,
        has_authenticator=Method.METHOD_AUTHENTICATOR in status.enabled_methods,
        # Locked until an operator unlocks: no code logs in, so none is offered.
        sendable=[]
        if status.locked_permanently
        else [SendButton.of(info) for info in enabled if info.contact],
        locked_permanently=status.locked_permanently,
        send_key=uuid.uuid4().hex,  # one per rendered form: a double click sends once
        locked_until=status.locked_until.ToDatetime(datetime.UTC)
        if status.HasField("locked_until")
        else None,
    )


@dataclass(frozen=True)
class SendButton:
    """A "Send me a code by ..." button: off, with its own countdown, until its method's cooldown
    ends (another method's code doesn't hold it: the server's cooldown is per method)."""

    info: MethodInfo
    resend_at: float  # epoch seconds; 0 when the session sent no code by this method
    wait_seconds: int
    sent_to: str  # where this method's last code went, masked; "" if none

    @classmethod
    def of(cls, info: MethodInfo) -> SendButton:
        resend_at = sessions.resend_after(info.slug)
        wait = max(0, int(resend_at - sessions.now() + 0.999))
        return cls(info, resend_at, wait, sessions.code_sent_to(info.slug))


def check_code(user_id: str) -> VerifyResponse | None:
    """Verify the submitted code; None (with a message flashed) unless accepted."""
    try:
        outcome = tf().verify(user_id, request.form.get("code", "").strip())
    except twofactor.InvalidArgument:
        flash("That is not a code: type the digits you were given, or a backup code.", "error")
        return None
    except twofactor.UserLocked as error:
        flash(lockout_message(error.retry_after), "error")
        return None
    if outcome.result == VerifyResult.VERIFY_RESULT_ACCEPTED:
        return outcome
    if outcome.result == VerifyResult.VERIFY_RESULT_LOCKED:
        flash(
            lockout_message(outcome.retry_after.ToTimedelta() if outcome.HasField("retry_after") else None),
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


@pages.post("/send-code")
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
        sessions.note_resend_wait(info.slug, sessions.now() + wait)  # this method's button only
        if error.reason == "RESEND_TOO_SOON":
            flash("A code was sent moments ago: you can ask for another when the button comes back.", "info")
        else:  # an hourly limit (USER_SEND_LIMIT, DESTINATION_SEND_LIMIT)
            flash("Too many codes were sent: use another method or a backup code, or wait a while.", "error")
        return redirect(back)
    except (twofactor.ContactMissing, twofactor.NotEnrolled):
        flash(f"No {info.noun} is set up for your account: use another method.", "error")
        return redirect(back)
    except twofactor.UserLocked as error:
        flash(lockout_message(error.retry_after), "error")
        return redirect(back)
    sessions.note_code_sent(
        info.slug, challenge.masked_destination, challenge.resend_after.ToNanoseconds() / 1e9
    )
    flash(f"We sent a code to {challenge.masked_destination}.", "info")
    return redirect(back)


@pages.post("/logout")
def logout() -> Response:
    sessions.log_out()
    flash("You are signed out.", "info")
    return redirect(url_for(".login_form"))
