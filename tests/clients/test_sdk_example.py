"""examples/login_flow.py, run as a user would, against the real server."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyotp
import pytest
import twofactor

from tests.clients.test_sdk_against_server import SMS_PROVIDER, CapturingSms, next_sms_code
from tests.conftest import APP_TOKEN, Clock, Harness, ServerFactory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "login_flow.py"
RUN_LIMIT = 30.0  # seconds one run of the example may take before it is killed


class Run:
    """The example in a subprocess: read its output line by line, answer its prompts."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(EXAMPLE), *args],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Bounds every read below: a hung example is killed and its pipes close.
        self.watchdog = threading.Timer(RUN_LIMIT, self.proc.kill)
        self.watchdog.start()
        self.lines: list[str] = []

    def read_until(self, text: str) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the example ended before printing {text!r}:\n{''.join(self.lines)}")

    def answer(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str, str]:
        stdout, stderr = self.proc.communicate(timeout=RUN_LIMIT)
        self.watchdog.cancel()
        return self.proc.returncode, "".join(self.lines) + stdout, stderr

    def close(self) -> None:
        """After a failed test too: no process or pipe outlives the test."""
        self.watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=RUN_LIMIT)


def decision(out: str) -> str:
    """The last line, after any prompt (input() prints no newline when stdin is a pipe)."""
    return out.splitlines()[-1].rpartition(": ")[2]


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start examples/login_flow.py with these arguments, in tmp_path."""
    runs: list[Run] = []

    def start(*args: str) -> Run:
        runs.append(Run(tmp_path, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.close()


@pytest.fixture
def server(start_server: ServerFactory) -> Iterator[Harness]:
    while not CapturingSms.outbox.empty():
        CapturingSms.outbox.get_nowait()
    yield start_server(sms_provider=SMS_PROVIDER)


def test_enroll_then_log_in_with_app_code_or_backup_code(
    server: Harness, clock: Clock, tmp_path: Path, example: Callable[..., Run]
) -> None:
    args = ("--target", server.target, "--token", APP_TOKEN, "--user", "alice")

    enroll = example(*args, "--enroll", "--qr-file", "qr.png")
    secret = enroll.read_until("secret (for typing in):").rsplit(":", 1)[1].strip()
    enroll.answer(pyotp.TOTP(secret).at(clock.now))
    code, out, err = enroll.finish()
    assert code == 0, out + err
    assert "LOGIN ALLOWED" in out
    assert (tmp_path / "qr.png").read_bytes().startswith(b"\x89PNG")
    assert "otpauth://totp/" in out
    backup_codes = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(backup_codes) == 10

    clock.advance(30)
    app_login = example(*args, "--show-backup-codes")
    app_login.answer(pyotp.TOTP(secret).at(clock.now))
    code, out, err = app_login.finish()
    assert (code, decision(out)) == (0, "LOGIN ALLOWED"), out + err
    # Right after the login the step-up proof shows the backup codes.
    assert "Your unused backup codes (10):" in out, out + err
    shown = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert sorted(shown) == sorted(backup_codes)

    backup_login = example(*args)
    backup_login.answer("000000")
    backup_login.read_until("Wrong code; 4 attempts left")
    backup_login.answer(backup_codes[0])
    code, out, err = backup_login.finish()
    assert code == 0, out + err
    assert "Backup code used; 9 left" in out

    denied = example(*args)
    for _ in range(3):
        denied.answer("000000")
    code, out, err = denied.finish()
    assert (code, decision(out)) == (1, "LOGIN DENIED"), out + err


def test_sms_login(server: Harness, clock: Clock, example: Callable[..., Run]) -> None:
    with twofactor.TwoFactorClient(server.target, token=APP_TOKEN) as client:
        client.set_contact(user_id="bob", phone="+14155550199")
        client.start_enrollment(user_id="bob", method=twofactor.Method.METHOD_SMS)
        client.confirm_enrollment(
            user_id="bob", method=twofactor.Method.METHOD_SMS, code=next_sms_code("+14155550199")
        )
    clock.advance(60)

    login = example("--target", server.target, "--token", APP_TOKEN, "--user", "bob")
    assert "0199" in login.read_until("Code sent to")
    login.answer(next_sms_code("+14155550199"))
    code, out, err = login.finish()

    assert (code, decision(out)) == (0, "LOGIN ALLOWED"), out + err


def test_service_error_fails_closed(server: Harness, example: Callable[..., Run]) -> None:
    run = example("--target", server.target, "--token", "not-the-token", "--user", "alice")
    code, out, err = run.finish()

    assert code == 2
    assert "UNAUTHENTICATED" in err
    assert "LOGIN ALLOWED" not in out


def test_a_user_without_a_second_factor_is_let_in_only_when_the_policy_allows(
    start_server: ServerFactory, example: Callable[..., Run]
) -> None:
    """What the docstring says: no enrollment unless the policy forces it (or --enroll)."""
    relaxed = start_server()
    run = example("--target", relaxed.target, "--token", APP_TOKEN, "--user", "nia")
    code, out, err = run.finish()
    assert (code, decision(out)) == (0, "LOGIN ALLOWED"), out + err
    assert "nia has no second factor and the policy doesn't require one" in out
    assert "secret (for typing in):" not in out

    forced = start_server(policy={"force_two_factor": True})
    enroll = example("--target", forced.target, "--token", APP_TOKEN, "--user", "nia")
    assert enroll.read_until("secret (for typing in):")
