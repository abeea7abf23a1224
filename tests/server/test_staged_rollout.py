"""The staged rollout of a new key: two `twofactor serve` processes on one PostgreSQL, one with
key 2 deployed decrypt-only (TWOFACTOR_ACTIVE_KEY_VERSION=1), one with key 2 active. Each
reads what the other writes, so they serve the same users with zero failures."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pyotp
import pytest
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc

from tests.conftest import APP_TOKEN, TEST_KEYS
from tests.server.helpers import AUTHENTICATOR
from tests.server.stored_rows import query
from tests.smtp_sink import free_port
from twofactor_server.domain.keyring import Keyring, version_of
from twofactor_server.settings import Settings

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))
KEY_2 = Keyring.new_key_spec(2)
METADATA = (("authorization", f"Bearer {APP_TOKEN}"),)
ACCEPTED = pb.VERIFY_RESULT_ACCEPTED


class ServerProcess:
    """`twofactor serve` in a subprocess, with a stub on a channel to it."""

    def __init__(self, tmp_path: Path, postgres_url: str, **variables: str) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
        env.update(
            {
                "TWOFACTOR_DATABASE_URL": postgres_url,
                "TWOFACTOR_DATA_DIR": str(tmp_path / "data"),
                "TWOFACTOR_LISTEN": f"127.0.0.1:{port}",
                "TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true",  # codes go to the console provider
                "TWOFACTOR_TOKENS": f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
                **{f"TWOFACTOR_{k}": v for k, v in variables.items()},
            }
        )
        self.process = subprocess.Popen(
            [TWOFACTOR, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # ends if the process exits; pytest-timeout bounds it
            if line.startswith("twofactor listening on"):
                break
        else:
            raise AssertionError(f"the server exited with {self.process.wait(60)} before listening")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(self.channel)

    def stop(self) -> int:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)
        return self.process.returncode


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    both = f"{TEST_KEYS},{KEY_2}"
    staged = ServerProcess(tmp_path, postgres_url, KEYS=both, ACTIVE_KEY_VERSION="1")
    activated = ServerProcess(tmp_path, postgres_url, KEYS=both)
    try:
        yield staged, activated
    finally:
        assert staged.stop() == 0 and activated.stop() == 0


def one_user_across_the_fleet(user_id: str, first: ServerProcess, second: ServerProcess) -> list[str]:
    """Every step on the other server than the one before; returns what went wrong."""
    failures = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(f"{user_id}: {what}")

    try:
        start = first.stub.StartEnrollment(
            pb.StartEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR), metadata=METADATA, timeout=30
        )
        totp = pyotp.TOTP(start.authenticator.secret)
        now = time.time()
        confirm = second.stub.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id=user_id, method=AUTHENTICATOR, code=totp.at(now)),
            metadata=METADATA,
            timeout=30,
        )
        expect(confirm.confirmed, "the enrollment was not confirmed")
        codes = list(confirm.backup_codes)
        for server, code, what in (
            (first, totp.at(now + 30), "authenticator code"),
            (first, codes[0], "first backup code"),
            (second, codes[1], "second backup code"),
        ):
            result = server.stub.Verify(
                pb.VerifyRequest(user_id=user_id, code=code), metadata=METADATA, timeout=30
            )
            expect(result.result == ACCEPTED, f"{what} answered {result.result}")
        for writer, reader in ((first, second), (second, first)):
            # A step-up token from one server works on the other, whichever key made it.
            proof = reader.stub.Verify(
                pb.VerifyRequest(user_id=user_id, code=codes.pop()), metadata=METADATA, timeout=30
            )
            expect(proof.result == ACCEPTED, f"a backup code answered {proof.result}")
            fresh = writer.stub.RegenerateBackupCodes(
                pb.RegenerateBackupCodesRequest(user_id=user_id, verification_token=proof.verification_token),
                metadata=METADATA,
                timeout=30,
            ).codes
            used = writer.stub.Verify(
                pb.VerifyRequest(user_id=user_id, code=fresh[0]), metadata=METADATA, timeout=30
            )
            expect(used.result == ACCEPTED, f"a regenerated backup code answered {used.result}")
            shown = reader.stub.GetBackupCodes(
                pb.GetBackupCodesRequest(user_id=user_id, verification_token=used.verification_token),
                metadata=METADATA,
                timeout=30,
            ).codes
            expect(list(shown) == list(fresh[1:]), "the other server shows other backup codes")
            codes = list(shown)
    except grpc.RpcError as error:
        failures.append(f"{user_id}: {error.code()} {error.details()}")  # type: ignore[attr-defined]
    return failures


def test_a_staged_rollout_serves_the_same_users_with_zero_failures(
    fleet: tuple[ServerProcess, ServerProcess], postgres_url: str
) -> None:
    staged, activated = fleet
    pairs = [(staged, activated) if i % 2 else (activated, staged) for i in range(12)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: one_user_across_the_fleet(f"user-{i}", *pairs[i]), range(12)))
    assert [failure for found in results for failure in found] == []
    # Both servers wrote: the staged one under key 1, the activated one under key 2.
    stored = query(Settings(database_url=postgres_url), "SELECT secret, pending_secret FROM methods")
    assert {version_of(bytes(row["secret"])) for row in stored} == {1, 2}
    hashes = query(Settings(database_url=postgres_url), "SELECT code_hash FROM backup_codes")
    assert {version_of(bytes(row["code_hash"])) for row in hashes} == {1, 2}
