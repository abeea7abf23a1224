"""Delivery over a real Redis broker by real Celery worker processes (`twofactor worker`),
to a real SMTP server, with the faults the service must survive."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import redis
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import REDIS_URL, TEST_KEYS, Harness, ServerFactory, require_service
from tests.server.helpers import EMAIL, error_info, verify
from tests.smtp_sink import SmtpSink, code_in, free_port, running_sink

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))


@pytest.fixture
def backend() -> str:
    return "postgres"  # worker processes and the server share one database


@pytest.fixture
def clock() -> Callable[[], float]:
    return time.time  # the workers run on the real clock; so does this server


@pytest.fixture(scope="session")
def redis_available() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        require_service("Redis at 127.0.0.1:6379", error)


@pytest.fixture
def queue(redis_available: None) -> str:
    return f"twofactor-test-{uuid.uuid4().hex[:8]}"  # each test has its own queue


class Workers:
    """`twofactor worker` processes started by a test, stopped at its end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, concurrency: int = 1) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"worker-{len(self.processes)}.log", "wb")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            [TWOFACTOR, "worker", "--concurrency", str(concurrency), "--loglevel", "INFO"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes.append(process)
        return process

    def children(self, process: subprocess.Popen[bytes]) -> list[int]:
        """The pool processes of a worker (the ones that run tasks)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = subprocess.run(
                ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
            ).stdout.split()
            if found:
                return [int(pid) for pid in found]
            time.sleep(0.05)
        raise AssertionError("the worker started no pool process")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with running_sink(SmtpSink()) as running:
        yield running


def worker_env(h: Harness) -> dict[str, str]:
    s = h.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update(
        {
            "TWOFACTOR_DATABASE_URL": s.database_url,
            "TWOFACTOR_BROKER_URL": s.broker_url,
            "TWOFACTOR_KEYS": TEST_KEYS,
            "TWOFACTOR_DELIVERY_QUEUE": s.delivery_queue,
            "TWOFACTOR_DELIVERY_RETRY_BASE_SECONDS": str(s.delivery_retry_base_seconds),
            "TWOFACTOR_EMAIL_PROVIDER": "smtp",
            "TWOFACTOR_SMTP_HOST": s.smtp.host,
            "TWOFACTOR_SMTP_PORT": str(s.smtp.port),
            "TWOFACTOR_SMTP_SECURITY": "none",
            "TWOFACTOR_SMTP_FROM": s.smtp.from_address,
            "TWOFACTOR_LOG_LEVEL": "INFO",
            "TWOFACTOR_ALLOW_CONSOLE_DELIVERY": "true",  # SMS stays on the console provider
        }
    )
    return env


@pytest.fixture
def workers_for(tmp_path: Path) -> Iterator[Callable[[Harness], Workers]]:
    made: list[Workers] = []

    def make(h: Harness) -> Workers:
        workers = Workers(worker_env(h), tmp_path)
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop()


def celery_server(start_server: ServerFactory, sink: SmtpSink, queue: str, **overrides: object) -> Harness:
    return start_server(
        broker_url=overrides.pop("broker_url", REDIS_URL),
        delivery_queue=queue,
        email_provider="smtp",
        smtp=sink.settings(),
        delivery_retry_base_seconds=0.2,
        **overrides,
    )


def register(h: Harness, user_id: str) -> None:
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id=user_id, email=f"{user_id}@example.com"), metadata=h.app_metadata
    )


def start_email_enrollment(h: Harness, user_id: str) -> common_pb2.Challenge:
    register(h, user_id)
    return h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id=user_id, method=EMAIL), metadata=h.app_metadata
    ).challenge


def challenge_status(h: Harness, user_id: str, challenge_id: str) -> common_pb2.Challenge:
    return h.twofactor.GetChallenge(
        pb.GetChallengeRequest(user_id=user_id, challenge_id=challenge_id), metadata=h.app_metadata
    ).challenge


def wait_for_status(h: Harness, user_id: str, challenge_id: str, status: int) -> common_pb2.Challenge:
    deadline = time.monotonic() + 90
    while True:
        challenge = challenge_status(h, user_id, challenge_id)
        if challenge.delivery_status == status:
            return challenge
        assert time.monotonic() < deadline, (
            f"delivery stayed {common_pb2.DeliveryStatus.Name(challenge.delivery_status)}"
        )
        time.sleep(0.05)


def redis_contents(url: str) -> bytes:
    """Every key and value in the broker's database, whatever their type."""
    client = redis.Redis.from_url(url)
    dump = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        dump.append(key)
        if kind == b"string":
            dump.append(client.get(key) or b"")
        elif kind == b"list":
            dump.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                dump.extend((field, value))
        elif kind == b"set":
            dump.extend(client.smembers(key))
        elif kind == b"zset":
            dump.extend(member for member, _ in client.zrange(key, 0, -1, withscores=True))
    client.close()
    return b"\n".join(dump)


def test_email_code_through_redis_and_a_celery_worker(
    sink: SmtpSink, start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    # The server runs on the real clock here: no resend cooldown, so the login code can follow at once.
    h = celery_server(start_server, sink, queue, policy={"resend_cooldown_seconds": 0})
    challenge = start_email_enrollment(h, "amy")
    assert challenge.delivery_status == common_pb2.DELIVERY_STATUS_QUEUED
    queued = redis_contents(REDIS_URL)
    assert (
        queue.encode() in queued and challenge.challenge_id.encode() in queued
    )  # the task is waiting in Redis

    workers = workers_for(h)
    workers.start()
    message = sink.wait_for_messages(1)[0]
    code = code_in(message)
    assert message["To"] == "amy@example.com"
    sent = wait_for_status(h, "amy", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert sent.provider_message_id == message["Message-ID"] and sent.delivery_attempts == 1
    # Redis never held the code: not in the queued task, not afterwards.
    assert code.encode() not in queued
    assert code.encode() not in redis_contents(REDIS_URL)

    confirm = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="amy", method=EMAIL, code=code), metadata=h.app_metadata
    )
    assert confirm.confirmed
    # And a login code, verified once.
    sent_login = h.twofactor.SendCode(
        pb.SendCodeRequest(user_id="amy", method=EMAIL), metadata=h.app_metadata
    )
    login_code = code_in(sink.wait_for_messages(2)[-1])
    wait_for_status(h, "amy", sent_login.challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
    assert verify(h, "amy", login_code).result == pb.VERIFY_RESULT_ACCEPTED
    assert verify(h, "amy", login_code).result == pb.VERIFY_RESULT_REJECTED
    assert "Traceback" not in workers.logs()
    assert code not in workers.logs() and login_code not in workers.logs()


def test_broker_down_answers_unavailable_and_leaves_no_valid_challenge(
    sink: SmtpSink,
    start_server: ServerFactory,
    queue: str,
    tmp_path: Path,
    workers_for: Callable[[Harness], Workers],
) -> None:
    port = free_port()
    redis_server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)
        h = celery_server(start_server, sink, queue, broker_url=url, policy={"resend_cooldown_seconds": 0})
        # Enroll by email while the broker is up.
        workers = workers_for(h)
        workers.start()
        enrollment = start_email_enrollment(h, "bob")
        code = code_in(sink.wait_for_messages(1)[0])
        wait_for_status(h, "bob", enrollment.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        confirm = h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="bob", method=EMAIL, code=code), metadata=h.app_metadata
        )
        assert confirm.confirmed
        workers.stop()
        client.shutdown(nosave=True)
        redis_server.wait(timeout=30)
        client.close()

        with pytest.raises(grpc.RpcError) as raised:
            # The deadline is the requirement: UNAVAILABLE within 2 s, not DEADLINE_EXCEEDED.
            h.twofactor.SendCode(
                pb.SendCodeRequest(user_id="bob", method=EMAIL), metadata=h.app_metadata, timeout=2
            )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(raised.value).reason == "BROKER_UNAVAILABLE"
        with psycopg.connect(h.settings.database_url) as conn:
            rows = conn.execute(
                "SELECT delivery_status, code_ciphertext FROM challenges "
                "WHERE user_id = 'bob' AND purpose = 'login'"
            ).fetchall()
        assert rows == [("failed", None)]  # nothing valid, nothing to send
    finally:
        if redis_server.poll() is None:
            redis_server.kill()
            redis_server.wait(timeout=30)


def test_worker_killed_mid_send_is_delivered_exactly_once(
    start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    with running_sink(SmtpSink(hold_first_recipient=True)) as sink:
        h = celery_server(start_server, sink, queue)
        workers = workers_for(h)
        first = workers.start(concurrency=1)
        challenge = start_email_enrollment(h, "cat")
        assert sink.recipient_held.wait(90), "the worker never reached the SMTP server"
        for pid in workers.children(first):
            os.kill(pid, signal.SIGKILL)  # the pool process dies mid-transaction
        workers.start(concurrency=1)  # another worker is there to take over
        sink.release.set()
        sent = wait_for_status(h, "cat", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        assert len(sink.messages) == 1
        assert sent.delivery_attempts == 2
        code = code_in(sink.messages[0])
        confirm = h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="cat", method=EMAIL, code=code), metadata=h.app_metadata
        )
        assert confirm.confirmed


def test_smtp_451_twice_then_delivered_once_with_retries_visible(
    start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    with running_sink(SmtpSink(data_replies=["451 4.3.0 Try again later"] * 2)) as sink:
        h = celery_server(start_server, sink, queue)
        workers = workers_for(h)
        workers.start()
        challenge = start_email_enrollment(h, "dee")
        sent = wait_for_status(h, "dee", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)
        assert sink.refused == 2 and len(sink.messages) == 1
        assert sent.delivery_attempts == 3
        assert sent.failure_reason == ""  # cleared once delivered


def test_permanent_smtp_failure_marks_the_delivery_failed(
    start_server: ServerFactory, queue: str, workers_for: Callable[[Harness], Workers]
) -> None:
    with running_sink(SmtpSink(data_replies=["550 5.1.1 No such user"])) as sink:
        h = celery_server(start_server, sink, queue)
        workers_for(h).start()
        challenge = start_email_enrollment(h, "eli")
        failed = wait_for_status(h, "eli", challenge.challenge_id, common_pb2.DELIVERY_STATUS_FAILED)
        assert "550" in failed.failure_reason and failed.delivery_attempts == 1
        assert sink.messages == []
