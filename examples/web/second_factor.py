"""Every call the site makes to twofactor, through the SDK (`import twofactor`) only.

The views never touch the SDK directly: they ask this module for what a page
needs, and get the SDK's response messages or plain values back. Errors are
the SDK's exceptions (twofactor.RateLimited, twofactor.ContactMissing, ...);
the views catch the ones the user can act on.

The calls that change a user's second factor pass the step-up token (see
step_up.py) when the server's contract has that field.
"""

from __future__ import annotations

from dataclasses import dataclass

from twofactor import AdminClient, Method, QrCodeFormat, TwoFactorClient
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import common_pb2 as common_pb
from twofactor.v1 import twofactor_service_pb2 as tf_pb

from . import step_up
from .settings import SiteSettings
from .users import User


@dataclass(frozen=True)
class MethodInfo:
    slug: str  # in URLs and forms
    method: Method.ValueType
    label: str  # as a heading
    noun: str  # within a sentence
    contact: str  # "email" or "phone": where its codes go; "" for the authenticator app


METHODS = {
    info.slug: info
    for info in (
        MethodInfo(
            "authenticator", Method.METHOD_AUTHENTICATOR, "Authenticator app", "authenticator app", ""
        ),
        MethodInfo("email", Method.METHOD_EMAIL, "Email", "email", "email"),
        MethodInfo("sms", Method.METHOD_SMS, "Text message (SMS)", "SMS", "phone"),
    )
}
BY_METHOD = {info.method: info for info in METHODS.values()}


class SecondFactor:
    """A TwoFactorClient (scope app) for the user pages and an AdminClient (scope admin) for /admin."""

    def __init__(self, app: TwoFactorClient, admin: AdminClient) -> None:
        self._app = app
        self._admin = admin

    @classmethod
    def connect(cls, settings: SiteSettings) -> SecondFactor:
        # Plaintext is for the local development server; in production pass tls=twofactor.TlsConfig(...).
        return cls(
            TwoFactorClient(settings.twofactor_target, token=settings.app_token),
            AdminClient(settings.twofactor_target, token=settings.admin_token),
        )

    def close(self) -> None:
        self._app.close()
        self._admin.close()

    # -- login -----------------------------------------------------------------------------------

    def status(self, user_id: str) -> tf_pb.GetStatusResponse:
        return self._app.get_status(user_id=user_id)

    def verify(self, user_id: str, code: str) -> tf_pb.VerifyResponse:
        return self._app.verify(user_id=user_id, code=code)

    def send_code(self, user_id: str, method: Method.ValueType, idempotency_key: str) -> common_pb.Challenge:
        # The key comes with the rendered form: a double click sends one code, not two.
        return self._app.send_code(user_id=user_id, method=method, idempotency_key=idempotency_key).challenge

    # -- enrollment ------------------------------------------------------------------------------

    def start_authenticator(self, user: User, token: str) -> tf_pb.AuthenticatorSetup:
        call = self._app.start_enrollment
        extra = step_up.token_argument(tf_pb.StartEnrollmentRequest, call, token)
        # The page shows the PNG only: ask for that one (drawing an image is most of the call's cost).
        return call(
            user_id=user.user_id,
            method=Method.METHOD_AUTHENTICATOR,
            account_name=user.email,
            qr_formats=[QrCodeFormat.QR_CODE_FORMAT_PNG],
            **extra,
        ).authenticator

    def start_code_enrollment(
        self, user_id: str, method: Method.ValueType, token: str
    ) -> common_pb.Challenge:
        call = self._app.start_enrollment
        extra = step_up.token_argument(tf_pb.StartEnrollmentRequest, call, token)
        return call(user_id=user_id, method=method, **extra).challenge

    def confirm_enrollment(
        self, user_id: str, method: Method.ValueType, code: str
    ) -> tf_pb.ConfirmEnrollmentResponse:
        return self._app.confirm_enrollment(user_id=user_id, method=method, code=code)

    def disable_method(self, user_id: str, method: Method.ValueType, token: str) -> list[Method.ValueType]:
        call = self._app.disable_method
        extra = step_up.token_argument(tf_pb.DisableMethodRequest, call, token)
        return list(call(user_id=user_id, method=method, **extra).enabled_methods)

    def set_contact(
        self, user_id: str, *, email: str | None, phone: str | None, token: str
    ) -> tf_pb.SetContactResponse:
        call = self._app.set_contact
        extra = step_up.token_argument(tf_pb.SetContactRequest, call, token)
        return call(user_id=user_id, email=email, phone=phone, **extra)

    def confirm_contact(
        self, user_id: str, method: Method.ValueType, code: str
    ) -> tf_pb.ConfirmContactResponse:
        return self._app.confirm_contact(user_id=user_id, method=method, code=code)

    # -- backup codes ----------------------------------------------------------------------------

    def backup_codes(self, user_id: str, token: str) -> list[str]:
        call = self._app.get_backup_codes
        extra = step_up.token_argument(tf_pb.GetBackupCodesRequest, call, token)
        return list(call(user_id=user_id, **extra).codes)

    def regenerate_backup_codes(self, user_id: str, token: str) -> list[str]:
        call = self._app.regenerate_backup_codes
        extra = step_up.token_argument(tf_pb.RegenerateBackupCodesRequest, call, token)
        return list(call(user_id=user_id, **extra).codes)

    # -- operators -------------------------------------------------------------------------------

    def policy(self) -> common_pb.Policy:
        return self._admin.get_policy().policy

    def users(self, limit: int = 500) -> list[admin_pb.User]:
        users: list[admin_pb.User] = []
        for user in self._admin.iter_users(page_size=100):
            users.append(user)
            if len(users) == limit:
                break
        return users

    def reset_user(self, user_id: str, reason: str) -> admin_pb.User:
        return self._admin.reset_user(user_id=user_id, reason=reason).user

    def audit_events(self, user_id: str = "", limit: int = 50) -> list[admin_pb.AuditEvent]:
        return list(self._admin.list_audit_events(user_id=user_id, page_size=limit).events)
