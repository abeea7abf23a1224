"""The account panel: methods on and off, contacts, the backup-codes dialog."""

from __future__ import annotations

import twofactor
from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from . import sessions, step_up
from .access import current_user, lockout_message, method_info, signed_in, tf, time_left_locked
from .second_factor import BY_METHOD, METHODS

pages = Blueprint("account", __name__)


@pages.get("/account")
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
    waiting = [(BY_METHOD[c.method], c.masked_destination) for c in status.pending_contact_changes]
    return render_template(
        "account.html", status=status, methods=methods, waiting=waiting, fresh=step_up.is_fresh()
    )


@pages.get("/contacts")
@signed_in
@step_up.required
def contacts_form() -> str:
    return render_template("contacts.html", status=tf().status(current_user().user_id))


@pages.post("/contacts")
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
    except twofactor.ContactInUse as error:
        noun = "email codes" if error.contact == "email" else "text message codes"
        flash(f"Your {noun} go there: turn them off before removing it.", "error")
        return redirect(url_for(".contacts_form"))
    except twofactor.RateLimited as error:
        flash(f"A code was sent moments ago: try again in {error.retry_after or 'a minute'}.", "error")
        return redirect(url_for(".contacts_form"))
    except twofactor.UserLocked as error:  # a code to the new address could not be confirmed yet
        flash(lockout_message(error.retry_after), "error")
        return redirect(url_for(".account"))
    # A new address for a method that is on is in force only once the code sent to it comes back.
    for slug, field in (("email", "email_confirmation"), ("sms", "phone_confirmation")):
        if result.HasField(field):
            sent = getattr(result, field)
            return render_template(
                "contact_confirm.html", info=METHODS[slug], sent_to=sent.masked_destination
            )
    flash(f"Saved. Email: {result.masked_email or 'none'}; phone: {result.masked_phone or 'none'}.", "info")
    return redirect(url_for(".account"))


@pages.get("/contacts/<slug>/confirm")
@signed_in
def confirm_contact_form(slug: str) -> Response | str:
    """Back to a change that waits for its code (the account page links here): the server says
    where the code went (GetStatus's pending_contact_changes), so no second code is sent."""
    info = method_info(slug)
    status = tf().status(current_user().user_id)
    waiting = [c for c in status.pending_contact_changes if c.method == info.method]
    if not waiting:
        flash("That change has expired or was replaced: make it again.", "error")
        return redirect(url_for(".contacts_form"))
    return render_template("contact_confirm.html", info=info, sent_to=waiting[0].masked_destination)


@pages.post("/contacts/<slug>/confirm")
@signed_in
def confirm_contact(slug: str) -> Response | str:
    info = method_info(slug)
    try:
        result = tf().confirm_contact(
            current_user().user_id, info.method, request.form.get("code", "").strip()
        )
    except twofactor.InvalidArgument:
        flash("That is not a code: type the digits you were given.", "error")
        return render_template("contact_confirm.html", info=info)
    except twofactor.NoPendingContactChange:
        flash("That change has expired or was replaced: make it again.", "error")
        return redirect(url_for(".contacts_form"))
    except twofactor.UserLocked as error:  # locked by earlier wrong codes
        flash(lockout_message(error.retry_after), "error")
        return redirect(url_for(".account"))
    if result.result == twofactor.ConfirmResult.CONFIRM_RESULT_LOCKED:  # this wrong code locked them
        flash(lockout_message(time_left_locked(current_user().user_id)), "error")
        return redirect(url_for(".account"))
    if result.result != twofactor.ConfirmResult.CONFIRM_RESULT_CONFIRMED:
        flash(f"Wrong code. {result.attempts_left} attempts left before a lockout.", "error")
        return render_template("contact_confirm.html", info=info)
    step_up.record(result)  # the code proved the new address: a fresh check
    new = result.masked_email if info.contact == "email" else result.masked_phone
    flash(f"Your {info.contact} is now {new}.", "info")
    return redirect(url_for(".account"))


@pages.get("/methods/<slug>/disable")
@signed_in
@step_up.required
def disable_form(slug: str) -> str:
    return render_template("disable.html", info=method_info(slug))


@pages.post("/methods/<slug>/disable")
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


@pages.get("/backup-codes")
@signed_in
@step_up.required
def backup_codes() -> str | Response:
    if sessions.from_another_site():
        flash("Open your backup codes from this page.", "info")
        return redirect(url_for(".account"))
    codes = tf().backup_codes(current_user().user_id, token=step_up.token())
    return render_template("backup_codes.html", codes=codes, fresh_set=False)


@pages.post("/backup-codes")
@signed_in
@step_up.required
def regenerate_backup_codes() -> str:
    # Rendered from the response, not redirected: the new set is in hand, and on a server
    # with step-up tokens the regeneration has made the session's token stale.
    codes = tf().regenerate_backup_codes(current_user().user_id, token=step_up.token())
    flash("New backup codes: the old ones no longer work.", "info")
    return render_template("backup_codes.html", codes=codes, fresh_set=True)
