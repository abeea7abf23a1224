"""`twofactor demo` driven through a pseudo-terminal, as a person types: bad input is asked again,
a wrong code may be retried, end of input stops quietly, an enrolled user proves it first, the
development tokens are found from another directory; never a traceback."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pyotp
import pytest

from tests.server.test_cli import TWOFACTOR, Served, env_for

WAIT = 60.0
CHECKOUT = Path(__file__).resolve().parents[2]


class Terminal:
    """A process on a pseudo-terminal: read what it shows, type lines."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        controller, terminal = pty.openpty()
        self.process = subprocess.Popen(
            args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, cwd=cwd, close_fds=True
        )
        os.close(terminal)
        self._fd = controller
        self.screen = ""

    def expect(self, pattern: str) -> re.Match[str]:
        """Wait (bounded) until the screen shows `pattern` after what was already matched."""
        deadline = time.monotonic() + WAIT
        while True:
            found = re.search(pattern, self.screen)
            if found:
                self.screen = self.screen[found.end() :]
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} never appeared; the screen shows:\n{self.screen}"
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self._fd, 4096)
                except OSError:  # the process exited and the terminal closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{pattern!r} never appeared before exit:\n{self.screen}")
                self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")

    def type(self, line: str) -> None:
        os.write(self._fd, line.encode() + b"\n")

    def end_of_input(self) -> None:
        os.write(self._fd, b"\x04")  # Ctrl-D on an empty line

    def rest(self) -> str:
        """Everything shown until the process exits, and its status."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self._fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")
            elif self.process.poll() is not None:
                break
        try:
            self.process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=WAIT)
            raise AssertionError(f"the demo did not exit; the screen shows:\n{self.screen}") from None
        finally:
            os.close(self._fd)
        return self.screen


def demo(served: Served, tmp_path: Path, user: str, *, cwd: Path, data_dir: bool = True) -> Terminal:
    env = env_for(tmp_path)
    if not data_dir:
        env.pop("TWOFACTOR_DATA_DIR")
    return Terminal([TWOFACTOR, "demo", "--target", f"127.0.0.1:{served.port}", "--user", user], env, cwd)


def test_bad_input_wrong_codes_and_end_of_input(tmp_path: Path) -> None:
    served = Served(tmp_path)
    try:
        term = demo(served, tmp_path, "pat", cwd=tmp_path)
        secret = term.expect(r"type in the secret: ([A-Z2-7]+)").group(1)
        term.expect("Code shown by the app: ")
        term.type("abc")
        term.expect(r"That is not a code: type the 6 digits\.")
        term.expect("Code shown by the app: ")
        right = pyotp.TOTP(secret).now()
        term.type("000000" if right != "000000" else "111111")
        term.expect(r"That code did not match; 4 more before a lockout\.")
        term.type(pyotp.TOTP(secret).now())
        term.expect("Backup codes")
        term.expect("The app's next code: ")
        term.end_of_input()
        shown = term.rest()
        assert term.process.returncode == 130
        assert "twofactor demo: stopped" in shown and "Traceback" not in shown
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.finish()


def test_an_enrolled_user_proves_it_first(tmp_path: Path) -> None:
    served = Served(tmp_path)
    try:
        term = demo(served, tmp_path, "ron", cwd=tmp_path)
        secret = term.expect(r"type in the secret: ([A-Z2-7]+)").group(1)
        term.expect("Code shown by the app: ")
        term.type(pyotp.TOTP(secret).now())
        term.expect("The app's next code: ")
        term.end_of_input()  # enrolled; the login step is not needed here
        term.rest()

        again = demo(served, tmp_path, "ron", cwd=tmp_path)
        again.expect("ron already has two-factor verification: prove it's you")
        again.expect(r"A current code from the app \(or a backup code\): ")
        again.end_of_input()
        shown = again.rest()
        assert again.process.returncode == 130
        assert "twofactor demo: stopped" in shown and "Traceback" not in shown
        assert "type in the secret" not in shown, "no new secret before the user proved it"
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.finish()


def test_the_tokens_are_found_from_a_directory_below(tmp_path: Path) -> None:
    served = Served(tmp_path, DATA_DIR=str(tmp_path / ".twofactor"))
    try:
        below = tmp_path / "some" / "project"
        below.mkdir(parents=True)
        term = demo(served, tmp_path, "sam", cwd=below, data_dir=False)
        term.expect(r"type in the secret: ([A-Z2-7]+)")
        term.expect("Code shown by the app: ")
        term.end_of_input()
        term.rest()
        assert term.process.returncode == 130
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.finish()


def test_missing_tokens_are_said_in_one_line_and_never_created(tmp_path: Path) -> None:
    if (CHECKOUT / ".twofactor" / "dev-secrets.json").exists():
        pytest.skip("this checkout runs its own embedded server (make serve): the demo finds its tokens")
    served = Served(tmp_path, DATA_DIR=str(tmp_path / ".twofactor"))
    try:
        elsewhere = Path("/")
        lost = demo(served, tmp_path, "sam", cwd=elsewhere, data_dir=False)
        shown = lost.rest()
        assert lost.process.returncode == 2
        assert "no development tokens found" in shown and "pass --token" in shown
        assert "Traceback" not in shown
        assert not (elsewhere / ".twofactor").exists(), "the demo never creates secrets of its own"
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.finish()
