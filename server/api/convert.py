"""Conversions between twofactor.v1 protobuf messages and domain values."""

from __future__ import annotations

from typing import overload

from google.protobuf import duration_pb2, timestamp_pb2
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import common_pb2 as common_pb
from twofactor.v1 import twofactor_service_pb2 as tf_pb

from twofactor_server.domain import contacts, qr_codes
from twofactor_server.domain.models import (
    AuditEvent,
    ChallengeView,
    CodeKind,
    Confirmation,
    ConfirmResult,
    ContactChange,
    ContactConfirmation,
    UserState,
    VerifyOutcome,
    VerifyResult,
)
from twofactor_server.settings import PolicySettings

METHOD_TO_PROTO: dict[str, common_pb.Method.ValueType] = {
    "authenticator": common_pb.METHOD_AUTHENTICATOR,
    "email": common_pb.METHOD_EMAIL,
    "sms": common_pb.METHOD_SMS,
}
METHOD_FROM_PROTO = {v: k for k, v in METHOD_TO_PROTO.items()}
QR_FORMAT_FROM_PROTO: dict[tf_pb.QrCodeFormat.ValueType, str] = {
    tf_pb.QR_CODE_FORMAT_PNG: qr_codes.PNG,
    tf_pb.QR_CODE_FORMAT_SVG: qr_codes.SVG,
}
DELIVERY_TO_PROTO = {
    "queued": common_pb.DELIVERY_STATUS_QUEUED,
    "sending": common_pb.DELIVERY_STATUS_SENDING,
    "sent": common_pb.DELIVERY_STATUS_SENT,
    "failed": common_pb.DELIVERY_STATUS_FAILED,
    "expired": common_pb.DELIVERY_STATUS_EXPIRED,
}
RESULT_TO_PROTO = {
    VerifyResult.ACCEPTED: tf_pb.VERIFY_RESULT_ACCEPTED,
    VerifyResult.REJECTED: tf_pb.VERIFY_RESULT_REJECTED,
    VerifyResult.LOCKED: tf_pb.VERIFY_RESULT_LOCKED,
}
CONFIRM_TO_PROTO = {
    ConfirmResult.CONFIRMED: tf_pb.CONFIRM_RESULT_CONFIRMED,
    ConfirmResult.REJECTED: tf_pb.CONFIRM_RESULT_REJECTED,
    ConfirmResult.LOCKED: tf_pb.CONFIRM_RESULT_LOCKED,
}
KIND_TO_PROTO = {
    CodeKind.AUTHENTICATOR: tf_pb.CODE_KIND_AUTHENTICATOR,
    CodeKind.EMAIL: tf_pb.CODE_KIND_EMAIL,
    CodeKind.SMS: tf_pb.CODE_KIND_SMS,
    CodeKind.BACKUP_CODE: tf_pb.CODE_KIND_BACKUP_CODE,
}


def methods(names: tuple[str, ...]) -> list[common_pb.Method.ValueType]:
    return [METHOD_TO_PROTO[n] for n in names]


@overload
def timestamp(ms: int) -> timestamp_pb2.Timestamp: ...
@overload
def timestamp(ms: None) -> None: ...
@overload
def timestamp(ms: int | None) -> timestamp_pb2.Timestamp | None: ...
def timestamp(ms: int | None) -> timestamp_pb2.Timestamp | None:
    if ms is None:
        return None
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)


def duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def mask(method: str, destination: str) -> str:
    return contacts.mask_email(destination) if method == "email" else contacts.mask_phone(destination)


def challenge(view: ChallengeView) -> common_pb.Challenge:
    return common_pb.Challenge(
        challenge_id=view.challenge_id,
        method=METHOD_TO_PROTO[view.method],
        masked_destination=mask(view.method, view.destination),
        expires_at=timestamp(view.expires_at_ms),
        resend_after=timestamp(view.resend_after_ms),
        delivery_status=DELIVERY_TO_PROTO[view.delivery_status],
        provider_message_id=view.provider_message_id,
        failure_reason=view.failure_reason,
        delivery_attempts=view.delivery_attempts,
    )


def status(state: UserState | None, policy: PolicySettings) -> tf_pb.GetStatusResponse:
    allowed = methods(policy.allowed_methods)
    if state is None:
        return tf_pb.GetStatusResponse(enrollment_required=policy.force_two_factor, allowed_methods=allowed)
    # What the user can use: a method the policy no longer allows verifies nothing, and its
    # pending enrollment can't be confirmed (METHOD_NOT_ALLOWED).
    enabled = tuple(m for m in state.enabled_methods if m in policy.allowed_methods)
    pending = tuple(m for m in state.pending_methods if m in policy.allowed_methods)
    return tf_pb.GetStatusResponse(
        enabled_methods=methods(enabled),
        enrollment_required=policy.force_two_factor and not enabled,
        pending_methods=methods(pending),
        backup_codes_remaining=state.backup_codes_remaining,
        locked_until=timestamp(state.lock.until_ms) if state.lock else None,
        email_registered=bool(state.email),
        phone_registered=bool(state.phone),
        allowed_methods=allowed,
        pending_contact_changes=[challenge(view) for view in state.contact_changes],
        locked_permanently=bool(state.lock and state.lock.permanent),
    )


def verify(outcome: VerifyOutcome) -> tf_pb.VerifyResponse:
    response = tf_pb.VerifyResponse(
        result=RESULT_TO_PROTO[outcome.result],
        matched=KIND_TO_PROTO[outcome.matched] if outcome.matched else tf_pb.CODE_KIND_UNSPECIFIED,
        attempts_left=outcome.attempts_left,
        backup_codes_remaining=outcome.backup_codes_remaining,
        verification_token=outcome.verification_token,
    )
    if outcome.lock is not None and outcome.lock.until_ms is not None:
        response.locked_until.CopyFrom(timestamp(outcome.lock.until_ms))
        response.retry_after.CopyFrom(duration((outcome.lock.until_ms - outcome.now_ms) / 1000))
    return response


def confirmation(result: Confirmation) -> tf_pb.ConfirmEnrollmentResponse:
    return tf_pb.ConfirmEnrollmentResponse(
        confirmed=result.confirmed,
        result=CONFIRM_TO_PROTO[result.result],
        enabled_methods=methods(result.enabled_methods),
        backup_codes=result.backup_codes,
        attempts_left=result.attempts_left,
        verification_token=result.verification_token,
    )


def contact_change(change: ContactChange) -> tf_pb.SetContactResponse:
    response = tf_pb.SetContactResponse(
        masked_email=contacts.mask_email(change.state.email),
        masked_phone=contacts.mask_phone(change.state.phone),
    )
    for view in change.confirmations:
        target = response.email_confirmation if view.method == "email" else response.phone_confirmation
        target.CopyFrom(challenge(view))
    return response


def contact_confirmation(result: ContactConfirmation) -> tf_pb.ConfirmContactResponse:
    return tf_pb.ConfirmContactResponse(
        result=CONFIRM_TO_PROTO[result.result],
        attempts_left=result.attempts_left,
        masked_email=contacts.mask_email(result.state.email),
        masked_phone=contacts.mask_phone(result.state.phone),
        verification_token=result.verification_token,
    )


def user(state: UserState) -> admin_pb.User:
    return admin_pb.User(
        user_id=state.user_id,
        enabled_methods=methods(state.enabled_methods),
        pending_methods=methods(state.pending_methods),
        masked_email=contacts.mask_email(state.email),
        masked_phone=contacts.mask_phone(state.phone),
        backup_codes_remaining=state.backup_codes_remaining,
        failed_attempts=state.failed_attempts,
        locked_until=timestamp(state.lock.until_ms) if state.lock else None,
        locked_permanently=bool(state.lock and state.lock.permanent),
        created_at=timestamp(state.created_at_ms),
        last_verified_at=timestamp(state.last_verified_at_ms),
    )


def policy(settings: PolicySettings) -> common_pb.Policy:
    return common_pb.Policy(
        allowed_methods=methods(settings.allowed_methods),
        force_two_factor=settings.force_two_factor,
        allow_admin_reset=settings.allow_admin_reset,
        issuer=settings.issuer,
        backup_code_count=settings.backup_code_count,
        code_length=settings.code_length,
        code_ttl=duration(settings.code_ttl_seconds),
        max_attempts_per_code=settings.max_attempts_per_code,
        resend_cooldown=duration(settings.resend_cooldown_seconds),
        lockout_threshold=settings.lockout_threshold,
        lockout_base=duration(settings.lockout_base_seconds),
        max_consecutive_failures=settings.max_consecutive_failures,
    )


def audit_event(event: AuditEvent) -> admin_pb.AuditEvent:
    return admin_pb.AuditEvent(
        event_id=event.event_id,
        time=timestamp(event.at),
        actor=event.actor,
        user_id=event.user_id,
        action=event.action,
        request_id=event.request_id,
        outcome=event.outcome,
        detail=event.detail,
    )
