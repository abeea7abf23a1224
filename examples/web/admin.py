"""The operators' page: users, "reset 2FA" (when the policy allows it), the audit log."""

from __future__ import annotations

import twofactor
from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from . import step_up
from .access import admin_only, current_user, signed_in, tf

pages = Blueprint("admin", __name__)


@pages.get("/admin")
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


@pages.get("/admin/users/<user_id>/reset")
@signed_in
@admin_only
@step_up.required_always
def reset_form(user_id: str) -> str:
    return render_template("reset.html", user_id=user_id, policy=tf().policy())


@pages.post("/admin/users/<user_id>/reset")
@signed_in
@admin_only
@step_up.required_always
def reset(user_id: str) -> Response:
    reason = request.form.get("reason", "").strip() or "reset from the admin page"
    try:
        tf().reset_user(user_id, f"{reason} (by {current_user().user_id})")
    except twofactor.AdminResetDisabled:
        flash("The policy doesn't allow resets.", "error")
        return redirect(url_for(".admin"))
    # What happens next depends on the policy: only a forced one makes them enroll again.
    if tf().policy().force_two_factor:
        flash(f"{user_id}'s two-factor setup is cleared: they enroll again at their next login.", "info")
    else:
        flash(
            f"{user_id}'s two-factor setup is cleared: two-factor verification is optional, so they "
            "sign in with their password alone until they turn it on again.",
            "info",
        )
    return redirect(url_for(".admin", user=user_id))
