"""Helpers for the delivery tests over a real Redis broker, real `twofactor worker` processes
and a real SMTP sink; private redis-server and PostgreSQL instances for the tests that stop them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import redis
from twofactor.v1 import common_pb2
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import REDIS_URL, TEST_KEYS, Harness, ServerFactory
from tests.server.helpers import EMAIL
from tests.smtp_sink import SmtpSink, free_port

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))
ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """`twofactor worker` processes started by a test, stopped at its end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, concurrency: int = 1, *celery_options: str) -> subprocess.Popen[bytes]:
        """A `twofactor worker`; `celery_options` go to `celery worker` (after --)."""
        log = open(self.log_dir / f"worker-{len(self.processes)}.log", "wb")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            [
                TWOFACTOR,
                "worker",
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "INFO",
                *(["--", *celery_options] if celery_options else []),
            ],
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

    def text_through(self, class_name: str, log: Path) -> None:
        """Workers started after this text through a class of tests/workers/custom_sms.py, which
        notes each text in `log` (TEST_SMS_LOG)."""
        self.env.update(
            {
                "TWOFACTOR_SMS_PROVIDER": f"tests.workers.custom_sms:{class_name}",
                "TEST_SMS_LOG": str(log),
                "PYTHONPATH": str(ROOT),  # where the worker imports tests.workers.custom_sms from
            }
        )


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
            "TWOFACTOR_OUTBOX_RECOVERY_SECONDS": str(s.outbox_recovery_seconds),
            "TWOFACTOR_DELIVERY_LEASE_SECONDS": str(s.delivery_lease_seconds),
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


def celery_server(start_server: ServerFactory, sink: SmtpSink, queue: str, **overrides: object) -> Harness:
    return start_server(
        broker_url=overrides.pop("broker_url", REDIS_URL),
        delivery_queue=queue,
        email_provider="smtp",
        smtp=sink.settings(),
        delivery_retry_base_seconds=0.2,
        # A lost delivery is found within a second or two; a dead worker's claim lasts 10 s.
        outbox_recovery_seconds=overrides.pop("outbox_recovery_seconds", 1.0),
        delivery_lease_seconds=overrides.pop("delivery_lease_seconds", 10.0),
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
    """Poll GetChallenge (bounded); UNAVAILABLE, as after a database restart, means "ask again"."""
    deadline = time.monotonic() + 90
    seen = "no answer"
    while True:
        try:
            challenge = challenge_status(h, user_id, challenge_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                raise
        else:
            if challenge.delivery_status == status:
                return challenge
            seen = common_pb2.DeliveryStatus.Name(challenge.delivery_status)
        assert time.monotonic() < deadline, f"delivery stayed {seen}"
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


def remove_queue_keys(url: str, queue: str) -> None:
    """Delete what kombu keeps in Redis for one queue, and nothing of any other queue.

    The keys named after the queue: its lists (one per priority), `_kombu.binding.<queue>` and
    `_kombu.binding_permanent.<queue>` (the publisher and the workers declare the queue on an
    exchange of the same name). Also its members in kombu's shared bookkeeping, should a worker
    have left any: the binding deadlines and unacknowledged messages routed to this queue.
    """
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{queue}*", count=1000))
        if keys:
            client.delete(*keys)
        client.zrem("_kombu.binding_deadlines", queue)
        for tag, payload in client.hgetall("unacked").items():
            if queue.encode() in payload:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    finally:
        client.close()


def messages_left(url: str, queue: str) -> int:
    """Task messages of one queue still in Redis: waiting (any priority) or unacknowledged."""
    client = redis.Redis.from_url(url)
    try:
        waiting = sum(
            client.llen(key)
            for key in client.scan_iter(match=f"{queue}*", count=1000)
            if client.type(key) == b"list"
        )
        unacked = sum(queue.encode() in payload for payload in client.hvals("unacked"))
        return int(waiting) + unacked
    finally:
        client.close()


class PrivateRedis:
    """A redis-server of the test's own (no persistence), to stop and start again on one port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "private redis-server did not start"
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Shut down without saving: whatever was queued is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def queue_length(self, queue: str) -> int:
        client = redis.Redis.from_url(self.url)
        try:
            return int(client.llen(queue))
        finally:
            client.close()


@contextmanager
def private_redis(directory: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
