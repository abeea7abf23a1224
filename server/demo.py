"""`twofactor demo`: enroll a user in an authenticator app from the terminal, against a running server.

It talks to the server through the SDK, as any backend would: the QR code in the
terminal, the first code to confirm, the backup codes, then one login. A user who
is already enrolled proves it with a current code first (the server asks a fresh
second factor before a new method is added). Bad input is asked again, a wrong
code may be retried as long as the lockout allows, Ctrl-C or end of input stops
quietly, and a failed call is one line, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import twofactor
from twofactor import ConfirmResult, Method, TwoFactorClient, VerifyResult

from twofactor_server.domain.qr_codes import qr_terminal

DEV_SECRETS = Path(".twofactor") / "dev-secrets.json"
EXIT_INTERRUPTED = 130


class Stop(Exception):
    """End the demo with this one-line message and exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def run_demo(*, target: str, token: str | None, user_id: str, data_dir: Path) -> int:
    try:
        app_token = token or development_token(data_dir)
        with TwoFactorClient(target, token=app_token) as client:
            enroll_and_log_in(client, user_id, ask=ask)
    except Stop as stop:
        print(f"twofactor demo: {stop}", file=sys.stderr)
        return stop.status
    except (KeyboardInterrupt, EOFError):
        print("\ntwofactor demo: stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except twofactor.Unavailable:
        print(
            f"twofactor demo: no server answers at {target}: is `twofactor serve` running?", file=sys.stderr
        )
        return 2
    except twofactor.TwoFactorError as error:
        reason = f" [{error.reason}]" if error.reason else ""
        print(f"twofactor demo: {error.message}{reason}", file=sys.stderr)
        return 2
    return 0


def ask(prompt: str) -> str:
    return input(prompt).strip()


def enroll_and_log_in(client: TwoFactorClient, user_id: str, *, ask: Callable[[str], str]) -> None:
    status = client.get_status(user_id=user_id)
    proof = ""
    if status.enabled_methods:
        print(f"{user_id} already has two-factor verification: prove it's you before enrolling again.")
        proof = log_in(client, user_id, ask, "A current code from the app (or a backup code): ")
    start = client.start_enrollment(
        user_id=user_id,
        method=Method.METHOD_AUTHENTICATOR,
        account_name=user_id,
        verification_token=proof,
    )
    setup = start.authenticator
    print(qr_terminal(setup.otpauth_uri))
    print(f"Scan the QR code with Google Authenticator, or type in the secret: {setup.secret}")
    print(f"({setup.otpauth_uri})")
    while True:
        code = ask_code(ask, "Code shown by the app: ")
        try:
            confirmation = client.confirm_enrollment(
                user_id=user_id, method=Method.METHOD_AUTHENTICATOR, code=code
            )
        except twofactor.UserLocked as locked:
            raise Stop(f"too many wrong codes: {user_id} is locked{retry_hint(locked)}", 1) from None
        if confirmation.result == ConfirmResult.CONFIRM_RESULT_CONFIRMED:
            break
        if confirmation.result == ConfirmResult.CONFIRM_RESULT_LOCKED:
            raise Stop(f"too many wrong codes: {user_id} is locked", 1)
        print(f"That code did not match; {confirmation.attempts_left} more before a lockout.")
    print(f"Enrolled {user_id}. Backup codes (each works once; keep them somewhere safe):")
    for backup in confirmation.backup_codes:
        print(f"  {backup}")
    print("Now log in. Each code works once: wait for the app to show the next one.")
    log_in(client, user_id, ask, "The app's next code: ")
    print(f"Logged in: {user_id} passed the second factor.")


def log_in(client: TwoFactorClient, user_id: str, ask: Callable[[str], str], prompt: str) -> str:
    """Ask for codes until one is accepted (return its verification_token) or the user is locked."""
    while True:
        code = ask_code(ask, prompt, backup_codes=True)
        outcome = client.verify(user_id=user_id, code=code)
        if outcome.result == VerifyResult.VERIFY_RESULT_ACCEPTED:
            return outcome.verification_token
        if outcome.result == VerifyResult.VERIFY_RESULT_LOCKED:
            wait = (
                f"; try again in {outcome.retry_after.seconds} s" if outcome.HasField("retry_after") else ""
            )
            raise Stop(f"too many wrong codes: {user_id} is locked{wait}", 1)
        print(f"That code was not accepted; {outcome.attempts_left} more before a lockout.")


def ask_code(ask: Callable[[str], str], prompt: str, *, backup_codes: bool = False) -> str:
    """A line that looks like a code; anything else is asked again, before it costs an attempt."""
    while True:
        typed = ask(prompt)
        digits = typed.replace(" ", "")
        if digits.isdigit() and 6 <= len(digits) <= 10:
            return digits
        if backup_codes and len(typed.replace("-", "").replace(" ", "")) == 10:
            return typed
        what = "6 digits, or a backup code like k7m2q-x9p4w" if backup_codes else "the 6 digits"
        print(f"That is not a code: type {what}.")


def retry_hint(error: twofactor.TwoFactorError) -> str:
    return f"; try again in {int(error.retry_after.total_seconds())} s" if error.retry_after else ""


def development_token(data_dir: Path) -> str:
    """The app token of a server running on the embedded default, read where it keeps it; never created."""
    candidates = dev_secret_candidates(data_dir)
    for path in candidates:
        if path.is_file():
            try:
                return str(json.loads(path.read_text())["app_token"])
            except (OSError, ValueError, KeyError):
                raise Stop(f"{path} is not readable development secrets; pass --token", 2) from None
    looked = ", ".join(str(p) for p in candidates)
    raise Stop(
        f"no development tokens found (looked in {looked}); pass --token with the app token that "
        "`twofactor serve` printed, or run the demo where the server runs",
        2,
    )


def dev_secret_candidates(data_dir: Path) -> list[Path]:
    """Where `twofactor serve` on the embedded default keeps its tokens: the configured data
    directory (TWOFACTOR_DATA_DIR), then .twofactor in every directory above this one, and in
    the checkout this package was installed from (where `make serve` runs)."""
    here = Path.cwd()
    checkout = Path(__file__).resolve().parents[1]
    places = [data_dir.resolve() / DEV_SECRETS.name]
    places += [place / DEV_SECRETS for place in (*here.parents, checkout)]
    return list(dict.fromkeys(places))
