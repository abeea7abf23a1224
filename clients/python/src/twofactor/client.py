"""Blocking clients for TwoFactorService and AdminService."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator, Sequence
from functools import cached_property
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message

from twofactor._channel import (
    DEFAULT_TIMEOUT,
    ChannelSettings,
    RetryPolicy,
    TlsConfig,
    audit_events_request,
    request_id_to_send,
)
from twofactor.errors import UsageError, error_from_rpc_error
from twofactor.v1 import admin_service_pb2 as admin
from twofactor.v1 import admin_service_pb2_grpc as admin_grpc
from twofactor.v1 import common_pb2 as common
from twofactor.v1 import twofactor_service_pb2 as tf
from twofactor.v1 import twofactor_service_pb2_grpc as tf_grpc

__all__ = ["AdminClient", "TwoFactorClient"]

_Request = TypeVar("_Request", bound=Message)
_Response = TypeVar("_Response", bound=Message)


class _Client:
    """A channel with the token, deadline and retry policy every call uses."""

    _SERVICE = ""  # the service full name, for the retried methods

    def __init__(
        self,
        target: str,
        *,
        token: str,
        tls: TlsConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 (frozen dataclass)
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Open a channel to `target` ("host:port").

        token: sent as `authorization: Bearer <token>` on every call.
        tls: None for a plaintext channel, else the TLS (or mTLS) settings.
        timeout: the default deadline of each call, in seconds.
        retry: how the safe calls retry after UNAVAILABLE; None turns retries off.
        options: extra gRPC channel options, applied last.
        """
        self._settings = ChannelSettings(target, token, tls, timeout, retry, tuple(options))
        channel_options = self._settings.channel_options()
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=channel_options)
        self._closed = False

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, e.g. to watch its connectivity."""
        return self._channel

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled, later calls raise UsageError."""
        self._closed = True
        self._channel.close()

    def _open_channel(self) -> grpc.Channel:
        """The channel, for a call about to use it; UsageError once the client is closed.

        Nothing may touch a closed grpcio channel: a stub built on one crashes the process
        when called (grpcio 1.85), and a call through an older stub raises a bare ValueError.
        """
        if self._closed:
            raise UsageError(
                f"this {type(self).__name__} is closed (close() or the end of its with block): "
                "create a new client to make more calls"
            )
        return self._channel

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
        request_id: str | None,
    ) -> _Response:
        request_id = request_id_to_send(request_id)
        give_up = time.monotonic() + self._settings.deadline(timeout)
        attempt = 1
        while True:
            self._open_channel()  # also before a repeat: close() may have come during the wait
            try:
                return rpc(
                    request,
                    timeout=max(give_up - time.monotonic(), 0.001),
                    metadata=self._settings.metadata(request_id),
                )
            except ValueError:
                # grpcio's "Cannot invoke RPC on closed channel!": close() raced this call.
                self._open_channel()
                raise
            except grpc.RpcError as exc:
                wait = self._settings.retry_wait(
                    self._SERVICE, request, exc, attempt, give_up - time.monotonic()
                )
                if wait is None:
                    raise error_from_rpc_error(exc, request_id=request_id) from exc
            time.sleep(wait)  # the server's UNAVAILABLE, repeated with the same request id
            attempt += 1


class TwoFactorClient(_Client):
    """TwoFactorService: enrollment in, and verification of, the second factor.

    Every method takes `timeout` (seconds; default the client's) and
    `request_id` (sent as x-request-id; default a new UUID), returns the
    response message and raises a twofactor.errors.TwoFactorError subclass.
    """

    _SERVICE = "twofactor.v1.TwoFactorService"

    @cached_property
    def _stub(self) -> tf_grpc.TwoFactorServiceStub:
        return tf_grpc.TwoFactorServiceStub(self._open_channel())

    def get_status(
        self, *, user_id: str, timeout: float | None = None, request_id: str | None = None
    ) -> tf.GetStatusResponse:
        """What the user has enrolled in and what the login must do next."""
        return self._call(self._stub.GetStatus, tf.GetStatusRequest(user_id=user_id), timeout, request_id)

    def set_contact(
        self,
        *,
        user_id: str,
        email: str | None = None,
        phone: str | None = None,
        verification_token: str = "",
        locale: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.SetContactResponse:
        """Register the email address and/or E.164 mobile number; None leaves one as is, "" removes it.
        Once the user has a method enabled, pass a verification_token from verify() (step-up).
        A new address for an enabled email or SMS method gets a code (the response's
        email_confirmation / phone_confirmation) and is in force only after confirm_contact()."""
        request = tf.SetContactRequest(
            user_id=user_id, email=email, phone=phone, verification_token=verification_token, locale=locale
        )
        return self._call(self._stub.SetContact, request, timeout, request_id)

    def confirm_contact(
        self,
        *,
        user_id: str,
        method: common.Method.ValueType,
        code: str,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.ConfirmContactResponse:
        """Put a new email address (METHOD_EMAIL) or mobile number (METHOD_SMS) in force with the
        code set_contact() sent to it. A wrong code is an answer (result REJECTED or LOCKED)."""
        request = tf.ConfirmContactRequest(user_id=user_id, method=method, code=code)
        return self._call(self._stub.ConfirmContact, request, timeout, request_id)

    def start_enrollment(
        self,
        *,
        user_id: str,
        method: common.Method.ValueType,
        account_name: str = "",
        locale: str = "",
        verification_token: str = "",
        qr_formats: Sequence[tf.QrCodeFormat.ValueType] = (),
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.StartEnrollmentResponse:
        """Begin enrolling a method: an authenticator secret and its otpauth URI, or a sent
        confirmation code. `qr_formats` names the QR code images to draw (QrCodeFormat.QR_CODE_FORMAT_PNG
        fills authenticator.qr_png, _SVG qr_svg); by default none: draw your own from otpauth_uri.
        Once the user has a method enabled, pass a verification_token from verify() (step-up)."""
        request = tf.StartEnrollmentRequest(
            user_id=user_id,
            method=method,
            account_name=account_name,
            locale=locale,
            verification_token=verification_token,
            qr_formats=qr_formats,
        )
        return self._call(self._stub.StartEnrollment, request, timeout, request_id)

    def confirm_enrollment(
        self,
        *,
        user_id: str,
        method: common.Method.ValueType,
        code: str,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.ConfirmEnrollmentResponse:
        """Complete a pending enrollment with a code from the app, email or SMS."""
        request = tf.ConfirmEnrollmentRequest(user_id=user_id, method=method, code=code)
        return self._call(self._stub.ConfirmEnrollment, request, timeout, request_id)

    def disable_method(
        self,
        *,
        user_id: str,
        method: common.Method.ValueType,
        verification_token: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.DisableMethodResponse:
        """Turn a method off. Needs a verification_token from verify() (step-up)."""
        request = tf.DisableMethodRequest(
            user_id=user_id, method=method, verification_token=verification_token
        )
        return self._call(self._stub.DisableMethod, request, timeout, request_id)

    def send_code(
        self,
        *,
        user_id: str,
        method: common.Method.ValueType,
        idempotency_key: str = "",
        locale: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.SendCodeResponse:
        """Send a login code by email or SMS. Not retried automatically: pass an
        idempotency_key and repeat the call with it to retry safely."""
        request = tf.SendCodeRequest(
            user_id=user_id, method=method, idempotency_key=idempotency_key, locale=locale
        )
        return self._call(self._stub.SendCode, request, timeout, request_id)

    def get_challenge(
        self,
        *,
        user_id: str,
        challenge_id: str,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.GetChallengeResponse:
        """The delivery status of a sent code."""
        request = tf.GetChallengeRequest(user_id=user_id, challenge_id=challenge_id)
        return self._call(self._stub.GetChallenge, request, timeout, request_id)

    def verify(
        self, *, user_id: str, code: str, timeout: float | None = None, request_id: str | None = None
    ) -> tf.VerifyResponse:
        """Check an authenticator, emailed or texted code, or a backup code. A wrong
        code is VERIFY_RESULT_REJECTED, not an exception."""
        return self._call(
            self._stub.Verify, tf.VerifyRequest(user_id=user_id, code=code), timeout, request_id
        )

    def get_backup_codes(
        self,
        *,
        user_id: str,
        verification_token: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.GetBackupCodesResponse:
        """The user's unused backup codes. Needs a verification_token from verify() or an
        enabling confirm_enrollment() (step-up); without one: StepUpRequired."""
        request = tf.GetBackupCodesRequest(user_id=user_id, verification_token=verification_token)
        return self._call(self._stub.GetBackupCodes, request, timeout, request_id)

    def regenerate_backup_codes(
        self,
        *,
        user_id: str,
        verification_token: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> tf.RegenerateBackupCodesResponse:
        """Replace the user's backup codes; the old ones stop working. Needs a verification_token
        from verify() (step-up), which this call retires."""
        request = tf.RegenerateBackupCodesRequest(user_id=user_id, verification_token=verification_token)
        return self._call(self._stub.RegenerateBackupCodes, request, timeout, request_id)


class AdminClient(_Client):
    """AdminService: operator tools. Needs a token of scope `admin`.

    Methods take `timeout` and `request_id` like TwoFactorClient's.
    """

    _SERVICE = "twofactor.v1.AdminService"

    @cached_property
    def _stub(self) -> admin_grpc.AdminServiceStub:
        return admin_grpc.AdminServiceStub(self._open_channel())

    def get_user(
        self, *, user_id: str, timeout: float | None = None, request_id: str | None = None
    ) -> admin.GetUserResponse:
        """One user's second-factor state."""
        return self._call(self._stub.GetUser, admin.GetUserRequest(user_id=user_id), timeout, request_id)

    def list_users(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        filter: admin.UserFilter.ValueType = admin.USER_FILTER_UNSPECIFIED,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> admin.ListUsersResponse:
        """One page of users in user_id order."""
        request = admin.ListUsersRequest(page_size=page_size, page_token=page_token, filter=filter)
        return self._call(self._stub.ListUsers, request, timeout, request_id)

    def iter_users(
        self,
        *,
        page_size: int = 0,
        filter: admin.UserFilter.ValueType = admin.USER_FILTER_UNSPECIFIED,
        timeout: float | None = None,
    ) -> Iterator[admin.User]:
        """Every user, fetching pages as needed (`timeout` applies to each page)."""
        page_token = ""
        while True:
            page = self.list_users(page_size=page_size, page_token=page_token, filter=filter, timeout=timeout)
            yield from page.users
            page_token = page.next_page_token
            if not page_token:
                return

    def reset_user(
        self, *, user_id: str, reason: str, timeout: float | None = None, request_id: str | None = None
    ) -> admin.ResetUserResponse:
        """Clear the user's methods, secrets, codes and lockout; `reason` goes to the audit log."""
        request = admin.ResetUserRequest(user_id=user_id, reason=reason)
        return self._call(self._stub.ResetUser, request, timeout, request_id)

    def unlock_user(
        self, *, user_id: str, timeout: float | None = None, request_id: str | None = None
    ) -> admin.UnlockUserResponse:
        """End a lockout and clear the failure count."""
        return self._call(
            self._stub.UnlockUser, admin.UnlockUserRequest(user_id=user_id), timeout, request_id
        )

    def get_policy(
        self, *, timeout: float | None = None, request_id: str | None = None
    ) -> admin.GetPolicyResponse:
        """The policy in force."""
        return self._call(self._stub.GetPolicy, admin.GetPolicyRequest(), timeout, request_id)

    def list_audit_events(
        self,
        *,
        user_id: str = "",
        actions: Sequence[str] = (),
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> admin.ListAuditEventsResponse:
        """One page of audit events, newest first: of one user (`user_id`), of some `actions`,
        in [`since`, `until`) (a naive datetime is UTC); every event by default."""
        request = audit_events_request(
            user_id=user_id,
            actions=actions,
            since=since,
            until=until,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(self._stub.ListAuditEvents, request, timeout, request_id)

    def iter_audit_events(
        self,
        *,
        user_id: str = "",
        actions: Sequence[str] = (),
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[admin.AuditEvent]:
        """Every audit event that list_audit_events' filters select, newest first, fetching pages
        as needed (`timeout` applies to each page)."""
        request = audit_events_request(  # built once; each page changes its token only
            user_id=user_id, actions=actions, since=since, until=until, page_size=page_size, page_token=""
        )
        while True:
            page = self._call(self._stub.ListAuditEvents, request, timeout, None)
            yield from page.events
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token
