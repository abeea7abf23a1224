"""Turning a method on: the QR code and key, or a code sent by email or SMS, then the first code."""

from __future__ import annotations

import base64
import datetime

import twofactor
from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from . import sessions, step_up
from .access import current_user, lockout_message, may_enroll, method_info, tf, time_left_locked
from .second_factor import BY_METHOD, METHODS

pages = Blueprint("enrollment", __name__)


@pages.get("/enroll")
@may_enroll
@step_up.required
def enroll_form() -> str:
    status = tf().status(current_user().user_id)
    offered = [BY_METHOD[m] for m in status.allowed_methods if m not in status.enabled_methods]
    return render_template("enroll.html", offered=offered, status=status)


@pages.post("/enroll/authenticator")
@may_enroll
@step_up.required_back_to("enrollment.enroll_form")
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


@pages.post("/enroll/<slug>")
@may_enroll
@step_up.required_back_to("enrollment.enroll_form")
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
    except twofactor.UserLocked as error:  # the code could not be confirmed until the lock ends
        flash(lockout_message(error.retry_after), "error")
        return redirect(url_for(".enroll_form"))
    return render_template(
        "enroll_confirm.html",
        info=info,
        sent_to=challenge.masked_destination,
        expires_at=challenge.expires_at.ToDatetime(datetime.UTC),
    )


@pages.post("/enroll/<slug>/confirm")
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
    except twofactor.UserLocked as error:  # locked by earlier wrong codes, here or at a login
        flash(lockout_message(error.retry_after), "error")
        return render_template("enroll_confirm.html", info=info)
    if result.result == twofactor.ConfirmResult.CONFIRM_RESULT_LOCKED:  # this wrong code locked them
        flash(lockout_message(time_left_locked(user_id)), "error")
        return render_template("enroll_confirm.html", info=info)
    if not result.confirmed:
        flash(f"Wrong code. {result.attempts_left} attempts left before a lockout.", "error")
        return render_template("enroll_confirm.html", info=info)
    if sessions.signed_in_user() is None:
        sessions.complete_login(user_id)  # enrolling was this login's second factor
    step_up.record(result)
    flash(f"{info.label} is on.", "info")
    if result.backup_codes:  # the first method: the only time the codes come with the response
        return render_template("backup_codes.html", codes=list(result.backup_codes), fresh_set=True)
    return redirect(url_for("account.account"))
