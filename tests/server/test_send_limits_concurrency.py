"""The hourly per-destination limit holds exactly under concurrency, across two server
processes, on both stores: 40 users who share one email address ask for a code at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.server.helpers import EMAIL, error_info
from tests.server.serve_process import APP_METADATA, ServeProcess, serve_env
from tests.smtp_sink import SmtpSink, code_in

SHARED = "family@example.com"
LIMIT = 10  # the default TWOFACTOR_SENDS_PER_DESTINATION_PER_HOUR


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("postgres_url")) if backend == "postgres" else ""


def test_forty_users_sharing_an_address_get_exactly_the_limit_from_two_servers(
    sink: SmtpSink, database_url: str, tmp_path: Path
) -> None:
    # Senders queue on locks: a generous storage deadline keeps a loaded machine from turning
    # a long wait into UNAVAILABLE, which is not what this test is about.
    env = serve_env(tmp_path / "data", database_url, sink, STORAGE_TIMEOUT_SECONDS="60")
    servers = [ServeProcess(env), ServeProcess(env)]  # one database, two processes
    try:
        users = [f"user{n:02d}" for n in range(40)]
        for n, user in enumerate(users):
            servers[n % 2].twofactor.SetContact(
                pb.SetContactRequest(user_id=user, email=SHARED), metadata=APP_METADATA
            )

        def enroll(n: int) -> tuple[str, str]:
            try:
                started = servers[n % 2].twofactor.StartEnrollment(
                    pb.StartEnrollmentRequest(user_id=users[n], method=EMAIL), metadata=APP_METADATA
                )
            except grpc.RpcError as error:
                return "refused", error_info(error).reason
            return "sent", started.challenge.challenge_id

        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(enroll, range(40)))
        sent = [(n, value) for n, (kind, value) in enumerate(results) if kind == "sent"]
        refused = {value for kind, value in results if kind == "refused"}
        assert len(sent) == LIMIT and refused == {"DESTINATION_SEND_LIMIT"}, results

        # Exactly that many codes reach the address: wait until each accepted one is delivered.
        deadline = time.monotonic() + 90
        for n, challenge_id in sent:
            while True:
                status = (
                    servers[0]
                    .twofactor.GetChallenge(
                        pb.GetChallengeRequest(user_id=users[n], challenge_id=challenge_id),
                        metadata=APP_METADATA,
                    )
                    .challenge.delivery_status
                )
                if status == common_pb2.DELIVERY_STATUS_SENT:
                    break
                assert time.monotonic() < deadline, f"{users[n]}'s code was not delivered"
                time.sleep(0.05)
        assert len(sink.messages) == LIMIT
        assert {m["To"] for m in sink.messages} == {SHARED}
    finally:
        for server in servers:
            server.stop()


def test_twenty_concurrent_sends_to_one_user_get_exactly_the_user_limit_from_two_servers(
    sink: SmtpSink, database_url: str, tmp_path: Path
) -> None:
    env = serve_env(
        tmp_path / "data",
        database_url,
        sink,
        RESEND_COOLDOWN_SECONDS="0",
        SENDS_PER_USER_PER_HOUR="5",
        STORAGE_TIMEOUT_SECONDS="60",  # as above: lock waits, not deadlines, are under test
    )
    servers = [ServeProcess(env), ServeProcess(env)]
    try:
        first = servers[0].twofactor
        first.SetContact(pb.SetContactRequest(user_id="una", email="una@example.com"), metadata=APP_METADATA)
        first.StartEnrollment(pb.StartEnrollmentRequest(user_id="una", method=EMAIL), metadata=APP_METADATA)
        code = code_in(sink.wait_for_messages(1)[0])
        confirm = first.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="una", method=EMAIL, code=code), metadata=APP_METADATA
        )
        assert confirm.confirmed

        def send(n: int) -> str:
            try:
                servers[n % 2].twofactor.SendCode(
                    pb.SendCodeRequest(user_id="una", method=EMAIL), metadata=APP_METADATA
                )
            except grpc.RpcError as error:
                return error_info(error).reason
            return "sent"

        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(send, range(20)))
        # The enrollment code was the first of the five. The clock is read once the locks are
        # held, so with no cooldown no send is refused as too soon: only the hourly limit refuses.
        assert results.count("sent") == 4, results
        assert set(results) == {"sent", "USER_SEND_LIMIT"}, results
    finally:
        for server in servers:
            server.stop()
