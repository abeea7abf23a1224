"""The `twofactor` command as operators run it: start-up checks, SIGTERM draining, the demo."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psycopg
import pyotp
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc

from tests.conftest import APP_TOKEN, POSTGRES_ADMIN_URL, REDIS_URL, TEST_KEYS
from tests.smtp_sink import free_port
from twofactor_server.cli import main

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))


def env_for(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update(
        {"TWOFACTOR_DATA_DIR": str(tmp_path / "data"), **{f"TWOFACTOR_{k}": v for k, v in variables.items()}}
    )
    return env


class Served:
    """`twofactor serve` in a subprocess; reads its start-up lines."""

    def __init__(self, tmp_path: Path, **variables: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [TWOFACTOR, "serve"],
            env=env_for(tmp_path, LISTEN=f"127.0.0.1:{self.port}", **variables),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        # The embedded default prints its development tokens after the address.
        last = "  admin:" if "DATABASE_URL" not in variables else "twofactor listening on"
        self.read_until(last)
        assert any("listening on" in line for line in self.lines), self.lines

    def read_until(self, prefix: str) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # ends if the process exits; pytest-timeout bounds it
            self.lines.append(line)
            if line.startswith(prefix):
                return
        raise AssertionError(f"the server exited before printing {prefix!r}: {self.lines}")

    @property
    def app_token(self) -> str:
        return next(line.split()[-1] for line in self.lines if line.strip().startswith("app:"))

    def finish(self) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=60)
        return self.process.returncode, "".join(self.lines) + out


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_an_sms_class_that_does_not_load_stops_start_up(tmp_path: Path, command: str) -> None:
    result = subprocess.run(
        [TWOFACTOR, command],
        env=env_for(
            tmp_path,
            SMS_PROVIDER="acme_gateway.sms:Sender",
            BROKER_URL=REDIS_URL,
            LISTEN="127.0.0.1:0",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "acme_gateway.sms" in result.stderr and "configuration error" in result.stderr


def test_production_settings_without_keys_refuse_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [TWOFACTOR, "serve"],
        env=env_for(tmp_path, DATABASE_URL=POSTGRES_ADMIN_URL),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "TWOFACTOR_KEYS" in result.stderr


def test_embedded_default_prints_development_tokens_that_work(tmp_path: Path) -> None:
    served = Served(tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        status = stub.GetStatus(
            pb.GetStatusRequest(user_id="x"),
            metadata=(("authorization", f"Bearer {served.app_token}"),),
            timeout=10,
        )
        assert list(status.enabled_methods) == []
    served.process.send_signal(signal.SIGTERM)
    code, _ = served.finish()
    assert code == 0


def test_sigterm_drains_in_flight_calls_then_exits(tmp_path: Path, postgres_url: str) -> None:
    served = Served(
        tmp_path,
        DATABASE_URL=postgres_url,
        KEYS=TEST_KEYS,
        TOKENS=f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
        ALLOW_CONSOLE_DELIVERY="true",
    )
    metadata = (("authorization", f"Bearer {APP_TOKEN}"),)
    with (
        grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel,
        psycopg.connect(postgres_url) as blocker,
    ):
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        stub.SetContact(pb.SetContactRequest(user_id="drain"), metadata=metadata, timeout=10)
        # Hold the user's row lock, so the next call waits inside the server.
        blocker.execute("SELECT 1 FROM users WHERE user_id = 'drain' FOR UPDATE")
        future = stub.SetContact.future(
            pb.SetContactRequest(user_id="drain", email="d@example.com"), metadata=metadata, timeout=60
        )
        wait_until_a_query_waits_on_a_lock(blocker)
        served.process.send_signal(signal.SIGTERM)
        served.read_until("draining")
        assert not future.done()
        blocker.commit()  # the in-flight call can now finish
        response = future.result(timeout=60)
    assert response.masked_email == "d***@example.com"
    code, output = served.finish()
    assert code == 0 and "stopped" in output


def wait_until_a_query_waits_on_a_lock(conn: psycopg.Connection) -> None:  # type: ignore[type-arg]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as observer:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> %s",
                (conn.info.backend_pid,),
            ).fetchone()
            if waiting and waiting[0] > 0:
                return
            time.sleep(0.02)
    raise AssertionError("the call never reached the database")


def test_demo_enrolls_from_the_terminal(tmp_path: Path) -> None:
    served = Served(tmp_path)
    demo = subprocess.Popen(
        [TWOFACTOR, "demo", "--target", f"127.0.0.1:{served.port}", "--user", "terminal-user"],
        env=env_for(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdin is not None and demo.stdout is not None
    seen = []
    secret = None
    for line in demo.stdout:
        seen.append(line)
        found = re.search(r"type in the secret: ([A-Z2-7]+)", line)
        if found:
            secret = found.group(1)
            break
    assert secret, "".join(seen)
    assert any("█" in line for line in seen)  # the QR code, drawn in the terminal
    totp = pyotp.TOTP(secret)
    now = time.time()
    out, err = demo.communicate(f"{totp.at(now)}\n{totp.at(now + 30)}\n", timeout=60)
    assert demo.returncode == 0, err
    assert "Backup codes" in out and "Logged in: terminal-user passed the second factor." in out
    served.process.send_signal(signal.SIGTERM)
    served.finish()


@pytest.mark.parametrize("command", [["serve"], ["migrate"]])
def test_a_database_that_does_not_answer_at_start_is_one_clear_line_not_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    """Nothing listens at the database's address: after the start-up wait the command says which
    database did not answer and what to check, exits 1, and prints no traceback (the password in
    the URL is never printed)."""
    port = free_port()
    result = subprocess.run(
        [TWOFACTOR, *command],
        env=env_for(
            tmp_path,
            DATABASE_URL=f"postgresql://twofactor:s3cret-pw@127.0.0.1:{port}/accounts",
            KEYS=TEST_KEYS,
            TOKENS=f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
            LISTEN=f"127.0.0.1:{free_port()}",
            STORAGE_TIMEOUT_SECONDS="1",
            LOG_FORMAT="text",
            ALLOW_CONSOLE_DELIVERY="true",  # else that setting is refused first, before the database
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stderr + result.stdout
    assert result.returncode == 1, output
    assert "Traceback" not in output and "s3cret-pw" not in output
    assert f"the database at 127.0.0.1:{port}/accounts did not answer" in output
    assert "twofactor: the database can't be reached; retry later" in result.stderr


@pytest.mark.parametrize(
    ("secret", "said"),
    [
        ("JBSWY3DPEHPK3PXP", "--secret is 80 bits; twofactor's secrets are 160"),  # the well-known example
        ("", "--secret is 0 bits"),
        ("not base32!", "--secret is not base32 text"),
    ],
)
def test_code_refuses_a_secret_it_cannot_use_in_one_line(
    capsys: pytest.CaptureFixture[str], secret: str, said: str
) -> None:
    assert main(["code", "--secret", secret]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"twofactor code: {said}"), err
