"""TwoFactorService: validate the request, call the domain, convert the result."""

from __future__ import annotations

import grpc
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc as pb_grpc

from twofactor_server.api import convert, requests
from twofactor_server.api.interceptors import current_caller
from twofactor_server.settings import PolicySettings
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.profiles import UserProfiles
from twofactor_server.usecases.verification import Verification


class TwoFactorServicer(pb_grpc.TwoFactorServiceServicer):
    def __init__(
        self,
        *,
        profiles: UserProfiles,
        enrollment: Enrollment,
        challenges: Challenges,
        verification: Verification,
        backup_codes: BackupCodes,
        policy: PolicySettings,
    ) -> None:
        self._profiles = profiles
        self._enrollment = enrollment
        self._challenges = challenges
        self._verification = verification
        self._backup_codes = backup_codes
        self._policy = policy

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        state = self._profiles.get_status(requests.user_id(request.user_id))
        return convert.status(state, self._policy)

    def SetContact(
        self, request: pb.SetContactRequest, context: grpc.ServicerContext
    ) -> pb.SetContactResponse:
        change = self._profiles.set_contact(
            requests.user_id(request.user_id),
            email=request.email if request.HasField("email") else None,
            phone=request.phone if request.HasField("phone") else None,
            locale=_locale(request.locale),
            verification_token=requests.verification_token(request.verification_token),
            caller=current_caller.get(),
        )
        return convert.contact_change(change)

    def ConfirmContact(
        self, request: pb.ConfirmContactRequest, context: grpc.ServicerContext
    ) -> pb.ConfirmContactResponse:
        confirmation = self._profiles.confirm_contact(
            requests.user_id(request.user_id),
            requests.method(request.method),
            requests.code(request.code),
            caller=current_caller.get(),
        )
        return convert.contact_confirmation(confirmation)

    def StartEnrollment(
        self, request: pb.StartEnrollmentRequest, context: grpc.ServicerContext
    ) -> pb.StartEnrollmentResponse:
        start = self._enrollment.start_enrollment(
            requests.user_id(request.user_id),
            requests.method(request.method),
            account_name=requests.account_name(request.account_name),
            locale=_locale(request.locale),
            verification_token=requests.verification_token(request.verification_token),
            caller=current_caller.get(),
            qr_formats=requests.qr_formats(request.qr_formats),
        )
        response = pb.StartEnrollmentResponse(method=convert.METHOD_TO_PROTO[start.method])
        if start.authenticator is not None:
            setup = start.authenticator
            response.authenticator.CopyFrom(
                pb.AuthenticatorSetup(
                    secret=setup.secret_base32,
                    otpauth_uri=setup.otpauth_uri,
                    qr_png=setup.qr_png,
                    qr_svg=setup.qr_svg,
                )
            )
        if start.challenge is not None:
            response.challenge.CopyFrom(convert.challenge(start.challenge))
        return response

    def ConfirmEnrollment(
        self, request: pb.ConfirmEnrollmentRequest, context: grpc.ServicerContext
    ) -> pb.ConfirmEnrollmentResponse:
        confirmation = self._enrollment.confirm_enrollment(
            requests.user_id(request.user_id),
            requests.method(request.method),
            requests.code(request.code),
            caller=current_caller.get(),
        )
        return convert.confirmation(confirmation)

    def DisableMethod(
        self, request: pb.DisableMethodRequest, context: grpc.ServicerContext
    ) -> pb.DisableMethodResponse:
        remaining = self._enrollment.disable_method(
            requests.user_id(request.user_id),
            requests.method(request.method),
            verification_token=requests.verification_token(request.verification_token),
            caller=current_caller.get(),
        )
        return pb.DisableMethodResponse(enabled_methods=convert.methods(remaining))

    def SendCode(self, request: pb.SendCodeRequest, context: grpc.ServicerContext) -> pb.SendCodeResponse:
        view = self._challenges.send_code(
            requests.user_id(request.user_id),
            requests.method(request.method),
            idempotency_key=requests.bounded(
                request.idempotency_key,
                field="idempotency_key",
                reason="INVALID_IDEMPOTENCY_KEY",
                max_bytes=requests.MAX_IDEMPOTENCY_KEY_BYTES,
            ),
            locale=_locale(request.locale),
            caller=current_caller.get(),
        )
        return pb.SendCodeResponse(challenge=convert.challenge(view))

    def GetChallenge(
        self, request: pb.GetChallengeRequest, context: grpc.ServicerContext
    ) -> pb.GetChallengeResponse:
        view = self._challenges.get_challenge(
            requests.user_id(request.user_id),
            requests.bounded(
                request.challenge_id,
                field="challenge_id",
                reason="INVALID_CHALLENGE_ID",
                max_bytes=requests.MAX_CHALLENGE_ID_BYTES,
                required=True,
            ),
        )
        return pb.GetChallengeResponse(challenge=convert.challenge(view))

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        outcome = self._verification.verify(
            requests.user_id(request.user_id), requests.code(request.code), caller=current_caller.get()
        )
        return convert.verify(outcome)

    def GetBackupCodes(
        self, request: pb.GetBackupCodesRequest, context: grpc.ServicerContext
    ) -> pb.GetBackupCodesResponse:
        codes = self._backup_codes.get_backup_codes(
            requests.user_id(request.user_id),
            verification_token=requests.verification_token(request.verification_token),
            caller=current_caller.get(),
        )
        return pb.GetBackupCodesResponse(
            codes=codes.codes, generated_at=convert.timestamp(codes.generated_at_ms)
        )

    def RegenerateBackupCodes(
        self, request: pb.RegenerateBackupCodesRequest, context: grpc.ServicerContext
    ) -> pb.RegenerateBackupCodesResponse:
        codes = self._backup_codes.regenerate_backup_codes(
            requests.user_id(request.user_id),
            verification_token=requests.verification_token(request.verification_token),
            caller=current_caller.get(),
        )
        return pb.RegenerateBackupCodesResponse(
            codes=codes.codes, generated_at=convert.timestamp(codes.generated_at_ms)
        )


def _locale(value: str) -> str:
    return requests.bounded(
        value, field="locale", reason="INVALID_LOCALE", max_bytes=requests.MAX_LOCALE_BYTES
    )
