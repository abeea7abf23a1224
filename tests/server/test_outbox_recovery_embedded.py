"""Outbox recovery in the embedded default (in-process delivery, SQLite): a server killed
between commit and publish, and retries dropped at shutdown, are delivered after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.server.helpers import EMAIL
from tests.server.serve_process import APP_METADATA, ServeProcess, serve_env
from tests.smtp_sink import SmtpSink, code_in, running_sink


def wait_until_sent(server: ServeProcess, user_id: str, challenge_id: str) -> common_pb2.Challenge:
    deadline = time.monotonic() + 60
    while True:
        challenge = server.twofactor.GetChallenge(
            pb.GetChallengeRequest(user_id=user_id, challenge_id=challenge_id), metadata=APP_METADATA
        ).challenge
        if challenge.delivery_status == common_pb2.DELIVERY_STATUS_SENT:
            return challenge
        assert time.monotonic() < deadline, f"delivery stayed {challenge.delivery_status}"
        time.sleep(0.05)


def confirmed(server: ServeProcess, user_id: str, code: str) -> bool:
    return bool(
        server.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id=user_id, method=EMAIL, code=code), metadata=APP_METADATA
        ).confirmed
    )


def test_embedded_server_killed_between_commit_and_publish_delivers_after_restart(tmp_path: Path) -> None:
    with running_sink(SmtpSink()) as sink:
        env = serve_env(tmp_path / "data", "", sink, OUTBOX_RECOVERY_SECONDS="1")
        dying = ServeProcess(env, dying=True)
        dying.twofactor.SetContact(
            pb.SetContactRequest(user_id="ida", email="ida@example.com"), metadata=APP_METADATA
        )
        with pytest.raises(grpc.RpcError) as raised:  # the caller gets no answer
            dying.twofactor.StartEnrollment(
                pb.StartEnrollmentRequest(user_id="ida", method=EMAIL), metadata=APP_METADATA
            )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dying.wait() == -9  # SIGKILL after the commit, before the publish
        dying.stop()
        assert sink.messages == []

        server = ServeProcess(env)  # recovery runs at start
        try:
            code = code_in(sink.wait_for_messages(1, timeout=60)[0])
            assert confirmed(server, "ida", code)
            assert len(sink.messages) == 1
        finally:
            server.stop()


def test_retries_dropped_at_shutdown_are_delivered_after_restart(tmp_path: Path) -> None:
    with running_sink(SmtpSink(data_replies=["451 4.3.0 Try again later"])) as sink:
        env = serve_env(
            tmp_path / "data", "", sink, OUTBOX_RECOVERY_SECONDS="1", DELIVERY_RETRY_BASE_SECONDS="30"
        )
        first = ServeProcess(env)
        first.twofactor.SetContact(
            pb.SetContactRequest(user_id="jon", email="jon@example.com"), metadata=APP_METADATA
        )
        started = first.twofactor.StartEnrollment(
            pb.StartEnrollmentRequest(user_id="jon", method=EMAIL), metadata=APP_METADATA
        )
        deadline = time.monotonic() + 60
        while sink.refused < 1:  # the first attempt met a 451; its retry waits 15-30 s on a timer
            assert time.monotonic() < deadline, "the first attempt never reached the SMTP server"
            time.sleep(0.05)
        first.stop()  # the timer is cancelled: the retry lives only in the outbox now

        second = ServeProcess(env)
        try:
            sent = wait_until_sent(second, "jon", started.challenge.challenge_id)
            assert sent.delivery_attempts == 2
            assert confirmed(second, "jon", code_in(sink.messages[0]))
            assert len(sink.messages) == 1
        finally:
            second.stop()
