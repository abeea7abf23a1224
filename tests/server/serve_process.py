"""`twofactor serve` (or the fault-injecting tests/workers/dying_server.py) in a subprocess,
configured by TWOFACTOR_* variables, with a channel and an app-scope stub to it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from twofactor.v1 import twofactor_service_pb2_grpc

from tests.conftest import APP_TOKEN, TEST_KEYS
from tests.smtp_sink import SmtpSink, free_port

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))
DYING_SERVER = str(Path(__file__).resolve().parent.parent / "workers" / "dying_server.py")
APP_METADATA = (("authorization", f"Bearer {APP_TOKEN}"),)


def serve_env(data_dir: Path, database_url: str, sink: SmtpSink, **variables: str) -> dict[str, str]:
    """A production-like configuration: the test's keys and token, email through the sink."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update(
        {
            "TWOFACTOR_DATA_DIR": str(data_dir),
            "TWOFACTOR_DATABASE_URL": database_url,
            "TWOFACTOR_KEYS": TEST_KEYS,
            "TWOFACTOR_TOKENS": f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
            "TWOFACTOR_EMAIL_PROVIDER": "smtp",
            "TWOFACTOR_SMTP_HOST": "127.0.0.1",
            "TWOFACTOR_SMTP_PORT": str(sink.port),
            "TWOFACTOR_SMTP_SECURITY": "none",
            "TWOFACTOR_SMTP_FROM": "twofactor@example.com",
            "TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true",  # SMS stays on the console provider
            # As in tests/conftest.py's TEST_POLICY: the tests count the codes reaching the sink,
            # and a notice (say, "a method was added" after ConfirmEnrollment) would race them.
            "TWOFACTOR_NOTIFY_USERS": "false",
            **{f"TWOFACTOR_{k}": v for k, v in variables.items()},
        }
    )
    return env


class ServeProcess:
    def __init__(self, env: dict[str, str], *, dying: bool = False) -> None:
        self.port = free_port()
        command = [sys.executable, DYING_SERVER] if dying else [TWOFACTOR, "serve"]
        self.process = subprocess.Popen(
            command,
            env={**env, "TWOFACTOR_LISTEN": f"127.0.0.1:{self.port}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()  # ends if the process exits; pytest-timeout bounds it
        assert str(self.port) in first, f"the server did not start: {first!r}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.twofactor = twofactor_service_pb2_grpc.TwoFactorServiceStub(self.channel)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()
