"""The second-factor step of a login backend, using the twofactor-client SDK.

Your backend has just accepted the user's password. This script does what
comes next and prints the decision:

1. GetStatus: is the user locked out, enrolled, required to enroll?
2. Not enrolled: when the policy requires two-factor verification
   (TWOFACTOR_FORCE_2FA), or with --enroll, enroll in an authenticator app (QR
   code written to a PNG file, otpauth URI printed), confirm with the app's
   first code, show the backup codes. Otherwise the password alone lets the
   user in (LOGIN ALLOWED), as the policy allows, and nothing is enrolled.
3. Enrolled: ask for the app's code; for email/SMS users send a code first
   (with an idempotency key, so retrying after UNAVAILABLE can't send twice).
   A backup code is accepted at the same prompt.
4. With --show-backup-codes: right after the accepted code, show the user's
   backup codes. Sensitive calls (backup codes, disabling or adding a method,
   changing the contacts) need the step-up proof that the accepted Verify
   returned (verification_token); it lasts TWOFACTOR_STEP_UP_SECONDS (5 minutes
   by default), after which the user must type a code again.

    pip install clients/python
    python examples/login_flow.py --target localhost:50051 --token <app token> --user alice

Exit status: 0 when the user may log in, 1 when not, 2 on a service error.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import twofactor
from twofactor import Method, QrCodeFormat, TwoFactorClient, VerifyResult

METHOD_NAMES = {
    Method.METHOD_AUTHENTICATOR: "authenticator app",
    Method.METHOD_EMAIL: "email",
    Method.METHOD_SMS: "SMS",
}
PROMPTS = 3  # wrong codes the user may type before this login attempt gives up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tls = None
    if args.tls or args.ca_file or args.client_cert or args.server_name:
        tls = twofactor.TlsConfig.from_files(
            root_ca=args.ca_file,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
        )
    try:
        with TwoFactorClient(args.target, token=args.token, tls=tls) as client:
            allowed = second_factor(
                client,
                args.user,
                qr_file=args.qr_file,
                enroll=args.enroll,
                show_backup_codes=args.show_backup_codes,
            )
    except twofactor.TwoFactorError as error:
        # Fail closed: if the service can't answer, the login doesn't go through.
        print(f"2FA service error: {error} [request id {error.request_id}]", file=sys.stderr)
        return 2
    print("LOGIN ALLOWED" if allowed else "LOGIN DENIED")
    return 0 if allowed else 1


def second_factor(
    client: TwoFactorClient,
    user_id: str,
    *,
    qr_file: Path | None,
    enroll: bool,
    show_backup_codes: bool = False,
) -> bool:
    status = client.get_status(user_id=user_id)
    if status.locked_permanently:
        print(f"{user_id} is locked out until an operator unlocks them (UnlockUser or ResetUser)")
        return False
    if status.HasField("locked_until"):
        print(f"{user_id} is locked out until {status.locked_until.ToDatetime():%Y-%m-%d %H:%M:%S} UTC")
        return False
    if status.enabled_methods:
        token = verify_login(client, user_id, list(status.enabled_methods))
        if token is not None and show_backup_codes:
            show_codes(client, user_id, token)
        return token is not None
    if status.enrollment_required or enroll:
        return enroll_authenticator(client, user_id, qr_file=qr_file or Path(f"{user_id}-2fa-qr.png"))
    print(f"{user_id} has no second factor and the policy doesn't require one")
    return True


def enroll_authenticator(client: TwoFactorClient, user_id: str, *, qr_file: Path) -> bool:
    start = client.start_enrollment(
        user_id=user_id,
        method=Method.METHOD_AUTHENTICATOR,
        account_name=user_id,
        qr_formats=[QrCodeFormat.QR_CODE_FORMAT_PNG],  # the one image this script writes
    )
    setup = start.authenticator
    qr_file.write_bytes(setup.qr_png)
    print(f"Scan the QR code in {qr_file} with your authenticator app, or open: {setup.otpauth_uri}")
    print(f"secret (for typing in): {setup.secret}")
    for _ in range(PROMPTS):
        code = ask("Code shown by the app: ")
        try:
            confirmation = client.confirm_enrollment(
                user_id=user_id, method=Method.METHOD_AUTHENTICATOR, code=code
            )
        except twofactor.InvalidArgument:
            print("That is not a code: type the 6 digits the app shows.")
            continue
        if confirmation.confirmed:
            print("Authenticator enrolled. Store these backup codes somewhere safe; each works once:")
            for backup_code in confirmation.backup_codes:
                print(f"  {backup_code}")
            return True
        print(f"Wrong code; {confirmation.attempts_left} attempts left before a lockout.")
    return False


def verify_login(client: TwoFactorClient, user_id: str, enabled: list[Method.ValueType]) -> str | None:
    """Ask for a code until one is accepted; return the accepted Verify's verification_token
    (the step-up proof for sensitive calls), or None when the login is denied."""
    if Method.METHOD_AUTHENTICATOR in enabled:
        prompt = "Code from your authenticator app (or a backup code): "
    else:
        method = Method.METHOD_EMAIL if Method.METHOD_EMAIL in enabled else Method.METHOD_SMS
        prompt = f"Code sent by {METHOD_NAMES[method]} (or a backup code): "
        send_login_code(client, user_id, method)
    for _ in range(PROMPTS):
        try:
            outcome = client.verify(user_id=user_id, code=ask(prompt))
        except twofactor.InvalidArgument:
            print("That is not a code.")
            continue
        if outcome.result == VerifyResult.VERIFY_RESULT_ACCEPTED:
            if outcome.matched == twofactor.CodeKind.CODE_KIND_BACKUP_CODE:
                print(f"Backup code used; {outcome.backup_codes_remaining} left. Consider regenerating them.")
            return outcome.verification_token
        if outcome.result == VerifyResult.VERIFY_RESULT_LOCKED:
            if outcome.HasField("retry_after"):
                print(f"Too many wrong codes: try again in {outcome.retry_after.ToTimedelta()}.")
            else:
                print("Too many wrong codes: an administrator must unlock this account.")
            return None
        print(f"Wrong code; {outcome.attempts_left} attempts left before a lockout.")
    return None


def show_codes(client: TwoFactorClient, user_id: str, verification_token: str) -> None:
    """ "Show my backup codes", with the proof of the code the user just typed. Later (after
    TWOFACTOR_STEP_UP_SECONDS) the server answers StepUpRequired: ask for a code again."""
    try:
        shown = client.get_backup_codes(user_id=user_id, verification_token=verification_token)
    except twofactor.StepUpRequired:
        print("Confirm it's you: log in again with a code to see your backup codes.")
        return
    print(f"Your unused backup codes ({len(shown.codes)}):")
    for backup_code in shown.codes:
        print(f"  {backup_code}")


def send_login_code(client: TwoFactorClient, user_id: str, method: Method.ValueType) -> None:
    """SendCode isn't retried by the SDK; retrying with the same idempotency key is safe."""
    key = uuid.uuid4().hex  # one key per login attempt
    for attempt in range(3):
        try:
            challenge = client.send_code(user_id=user_id, method=method, idempotency_key=key).challenge
        except twofactor.Unavailable as error:
            if attempt == 2:
                raise
            delay = error.retry_after.total_seconds() if error.retry_after else 1.0
            time.sleep(delay)
            continue
        except twofactor.RateLimited as error:
            # A code sent moments ago is still valid: let the user type that one.
            wait = f" (a new one can be sent in {error.retry_after})" if error.retry_after else ""
            print(f"A code was sent recently; use it{wait}.")
            return
        except twofactor.ContactMissing as error:
            print(f"No {error.contact} is registered for {user_id}; use a backup code.")
            return
        except twofactor.UserLocked as error:  # locked since GetStatus looked: no code is sent
            wait = f" (try again in {error.retry_after})" if error.retry_after else ""
            print(f"{user_id} is locked out{wait}.")
            return
        print(f"Code sent to {challenge.masked_destination}.")
        return


def ask(prompt: str) -> str:
    return input(prompt).strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="host:port of the twofactor server")
    parser.add_argument("--token", required=True, help="an API token of scope app")
    parser.add_argument("--user", required=True, help="the user whose password was just accepted")
    parser.add_argument("--enroll", action="store_true", help="enroll even if the policy doesn't require it")
    parser.add_argument(
        "--show-backup-codes", action="store_true", help="after the login, show the user's backup codes"
    )
    parser.add_argument(
        "--qr-file", type=Path, help="where to write the QR code PNG (default <user>-2fa-qr.png)"
    )
    tls = parser.add_argument_group("TLS (plaintext when none of these is given)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root CAs")
    tls.add_argument("--ca-file", help="PEM of the CA that signed the server certificate")
    tls.add_argument("--client-cert", help="PEM client certificate, for servers that require mTLS")
    tls.add_argument("--client-key", help="PEM key of the client certificate")
    tls.add_argument("--server-name", help="the name in the server certificate, if not the target's host")
    args = parser.parse_args(argv)
    if bool(args.client_cert) != bool(args.client_key):
        parser.error("--client-cert and --client-key go together")
    return args


if __name__ == "__main__":
    sys.exit(main())
