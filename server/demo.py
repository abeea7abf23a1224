"""`twofactor demo`: enroll a user in an authenticator app from the terminal, against a running server."""

from __future__ import annotations

import grpc
from twofactor.v1 import common_pb2, twofactor_service_pb2, twofactor_service_pb2_grpc

from twofactor_server.domain.qr_codes import qr_terminal
from twofactor_server.settings import Settings


def run_demo(settings: Settings, *, target: str, token: str | None, user_id: str) -> int:
    if token is None:
        from twofactor_server.app import dev_tokens

        token = dev_tokens(settings)["app"]
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(target) as channel:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        start = stub.StartEnrollment(
            twofactor_service_pb2.StartEnrollmentRequest(
                user_id=user_id, method=common_pb2.METHOD_AUTHENTICATOR, account_name=user_id
            ),
            metadata=metadata,
            timeout=10,
        )
        setup = start.authenticator
        print(qr_terminal(setup.otpauth_uri))
        print(f"Scan the QR code with Google Authenticator, or type in the secret: {setup.secret}")
        print(f"({setup.otpauth_uri})")
        while True:
            code = input("Code shown by the app: ").strip()
            confirmation = stub.ConfirmEnrollment(
                twofactor_service_pb2.ConfirmEnrollmentRequest(
                    user_id=user_id, method=common_pb2.METHOD_AUTHENTICATOR, code=code
                ),
                metadata=metadata,
                timeout=10,
            )
            if confirmation.confirmed:
                break
            print(f"That code did not match; {confirmation.attempts_left} attempts left before a lockout.")
        print(f"Enrolled {user_id}. Backup codes (each works once):")
        for backup in confirmation.backup_codes:
            print(f"  {backup}")
        code = input("Now log in: the app's next code: ").strip()
        result = stub.Verify(
            twofactor_service_pb2.VerifyRequest(user_id=user_id, code=code), metadata=metadata
        )
        print(f"Verify: {twofactor_service_pb2.VerifyResult.Name(result.result)}")
    return 0
