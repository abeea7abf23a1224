"""`twofactor health` for container probes, and the broker reported apart (twofactor.v1.Delivery)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness, ServerFactory
from tests.server.helpers import wait_until
from tests.smtp_sink import free_port

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def backend() -> str:
    return "sqlite"  # health of storage is tested with the storage; here: the probe and the broker


def health_cli(*args: str, listen: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    if listen:
        env["TWOFACTOR_LISTEN"] = listen
    return subprocess.run([TWOFACTOR, "health", *args], env=env, capture_output=True, text=True, timeout=120)


def status_of(h: Harness, service: str) -> int:
    return int(
        health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest(service=service)).status
    )


def test_health_exits_0_when_serving_and_1_otherwise(start_server: ServerFactory) -> None:
    h = start_server()
    served = health_cli(listen=f"0.0.0.0:{h.port}")  # the default target: TWOFACTOR_LISTEN, on loopback
    assert served.returncode == 0 and served.stdout == f'127.0.0.1:{h.port} "": SERVING\n', served
    delivery = health_cli("--target", h.target, "--service", "twofactor.v1.Delivery")
    assert delivery.returncode == 0, delivery.stderr
    unknown = health_cli("--target", h.target, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    closed = health_cli("--target", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert closed.returncode == 1 and closed.stderr.count("\n") == 1 and "Traceback" not in closed.stderr


def test_the_broker_is_reported_apart_and_never_takes_the_server_down(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    h = start_server(broker_url=f"redis://:pw-in-url@127.0.0.1:{port}/0", broker_timeout_seconds=0.5)
    assert status_of(h, "twofactor.v1.Delivery") == NOT_SERVING
    # One line that says what failed, where, what it means and what to do; no password.
    (said,) = [r.getMessage() for r in caplog.records if "delivery broker" in r.getMessage()]
    assert said.startswith(f"the delivery broker at redis://:****@127.0.0.1:{port}/0 does not answer (")
    assert "BROKER_UNAVAILABLE" in said and "TWOFACTOR_BROKER_URL" in said and "pw-in-url" not in said
    assert status_of(h, "") == SERVING
    assert status_of(h, "twofactor.v1.TwoFactorService") == SERVING
    assert health_cli("--target", h.target, "--service", "twofactor.v1.Delivery").returncode == 1
    assert health_cli("--target", h.target).returncode == 0

    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the check runs every few seconds: SERVING once the broker answers
            if status_of(h, "twofactor.v1.Delivery") == SERVING:
                break
            assert time.monotonic() < deadline, "twofactor.v1.Delivery never became SERVING"
            time.sleep(0.1)
        redis.Redis(port=port).ping()
    finally:
        server.terminate()
        server.wait(30)


NOBODY = pb.GetStatusRequest(user_id="nobody")


def held_open(stop: threading.Event) -> Iterator[reflection_pb2.ServerReflectionRequest]:
    """A reflection client that asks once, then keeps its stream open until `stop`."""
    yield reflection_pb2.ServerReflectionRequest(list_services="")
    stop.wait(60)


def test_open_streams_without_a_token_cant_take_the_threads_logins_need(start_server: ServerFactory) -> None:
    """A reflection stream holds a handler thread while open and needs no token: as many idle
    streams as threads froze every call, logins included. A quarter of the threads at most serve
    such streams (one here, of four); one more is RESOURCE_EXHAUSTED at once, and a stream's
    place comes back when its client goes."""
    h = start_server(max_workers=4)
    reflection = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    health = health_pb2_grpc.HealthStub(h.channel)
    stop = threading.Event()
    deadline = time.monotonic() + 30
    try:
        for _ in range(5):  # each closed stream gives its place back
            first = reflection.ServerReflectionInfo(held_open(stop))
            while True:  # the place of the stream closed a moment ago comes back when its handler ends
                try:
                    assert next(first).list_services_response.service
                    break
                except grpc.RpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "a closed stream never gave its place back"
                    time.sleep(0.05)  # polling a condition
                    first = reflection.ServerReflectionInfo(held_open(stop))
            second = reflection.ServerReflectionInfo(held_open(stop))
            with pytest.raises(grpc.RpcError) as refused:
                next(second)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The threads the logins need are there: calls answer well within their deadline.
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING
            status = h.twofactor.GetStatus(
                pb.GetStatusRequest(user_id="nobody"), metadata=h.app_metadata, timeout=10
            )
            assert not status.enabled_methods
            first.cancel()
    finally:
        stop.set()


def test_health_watches_hold_no_thread_nor_a_stream_slot(start_server: ServerFactory) -> None:
    """grpc_health answers Watch from callbacks, holding no thread; wrapped by the monitoring
    interceptor it kept a thread each, and a cap on them broke gRPC's client-side health
    checking, which keeps one Watch per client connection. Six Watches on two threads: every
    call still answers."""
    h = start_server(max_workers=2)
    health = health_pb2_grpc.HealthStub(h.channel)
    watch = health_pb2.HealthCheckRequest(service="")
    watches = [health.Watch(watch) for _ in range(6)]
    try:
        assert [next(w).status for w in watches] == [SERVING] * 6
        assert health.Check(watch, timeout=10).status == SERVING
        status = h.twofactor.GetStatus(
            pb.GetStatusRequest(user_id="nobody"), metadata=h.app_metadata, timeout=10
        )
        assert not status.enabled_methods
    finally:
        for w in watches:
            w.cancel()


def test_statuses_go_out_while_watchers_come_and_go(start_server: ServerFactory) -> None:
    """A status set while gRPC ends a Watch whose client left: grpc_health's servicer sent under
    the lock that ending the Watch takes, and the server froze for good (seen as a stop that
    never returned). Here the statuses keep going out, round after round, and the server stops."""
    h = start_server(max_workers=4)
    servicer = h.server.health
    stop = threading.Event()
    sets = [0]

    def flip() -> None:
        while not stop.is_set():
            servicer.set("flipping", (SERVING, NOT_SERVING)[sets[0] % 2])
            sets[0] += 1

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    stub = health_pb2_grpc.HealthStub(h.channel)
    try:
        for _ in range(100):
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service="flipping")) for _ in range(4)]
            for watch in watches:
                assert next(watch).status in (SERVING, NOT_SERVING)
            for watch in watches:
                watch.cancel()
            before, deadline = sets[0], time.monotonic() + 10
            while sets[0] == before:  # the flipper is not stuck in a send
                assert time.monotonic() < deadline, f"no status set for 10 s after {before} sets"
                time.sleep(0.001)
    finally:
        stop.set()
        flipper.join(10)
    assert not flipper.is_alive()
    assert (
        health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == SERVING
    )


def test_health_list_answers_every_status_and_logs_no_error(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """grpc.health.v1's List, as reflection advertises it (the base class raised: UNIMPLEMENTED,
    and an ERROR with a traceback for every caller, no token needed)."""
    h = start_server()
    with caplog.at_level(logging.ERROR):
        answer = health_pb2_grpc.HealthStub(h.channel).List(health_pb2.HealthListRequest(), timeout=10)
    statuses = {name: response.status for name, response in answer.statuses.items()}
    assert statuses[""] == statuses["twofactor.v1.TwoFactorService"] == health_pb2.HealthCheckResponse.SERVING
    assert statuses == {name: status_of(h, name) for name in statuses}  # what Check answers each
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("service", "statuses_seen"),
    [("", [SERVING, NOT_SERVING]), ("no.such.Service", [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN])],
)
def test_an_open_watch_ends_at_sigterm_and_holds_no_drain(
    tmp_path: Path, service: str, statuses_seen: list[int]
) -> None:
    """Client-side health checking (gRPC's healthCheckConfig, Envoy) keeps a Watch open for good.
    SIGTERM sends it NOT_SERVING and then ends it, so the drain waits for calls in flight only,
    not for the whole TWOFACTOR_GRACE_SECONDS (20 here; before, the stop took all of them). A
    Watch of a name no service has (SERVICE_UNKNOWN, kept open by the health protocol) just
    ends: it was left open, and held the stop for the whole grace period."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env |= {
        "TWOFACTOR_DATA_DIR": str(tmp_path / "data"),
        "TWOFACTOR_LISTEN": "127.0.0.1:0",
        "TWOFACTOR_GRACE_SECONDS": "20",
    }
    server = subprocess.Popen(
        [TWOFACTOR, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert server.stdout is not None
    try:
        line = ""
        while "listening on" not in line:
            line = server.stdout.readline()
            assert line, "the server exited before listening"
        port = line.split()[3].rpartition(":")[2]
        statuses: list[int] = []
        ended = threading.Event()

        def watch() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    request = health_pb2.HealthCheckRequest(service=service)
                    for answer in health_pb2_grpc.HealthStub(channel).Watch(request):
                        statuses.append(answer.status)
                except grpc.RpcError:
                    pass
            ended.set()

        threading.Thread(target=watch, daemon=True).start()
        wait_until(lambda: bool(statuses), "the watch's first answer", bound=30.0, interval=0.05)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        stopped_after = time.monotonic() - started
        assert ended.wait(30)
        assert statuses == statuses_seen
        assert stopped_after < 15, f"the stop waited {stopped_after:.1f} s of its 20 s grace for the watch"
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()


def test_a_broker_that_answers_but_refuses_writes_is_not_serving(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PING answers while Redis refuses writes (too few replicas here; out of memory, a failed
    snapshot, a read-only replica after a failover alike), and every publish is refused: the
    Delivery health says so, with one line, and comes back when writes are taken again."""
    port = free_port()
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        wait_until(lambda: _answers(client), bound=30, what="the private redis-server to answer")
        h = start_server(broker_url=f"redis://127.0.0.1:{port}/0", broker_timeout_seconds=2.0)
        assert status_of(h, "twofactor.v1.Delivery") == SERVING
        client.config_set("min-replicas-to-write", 1)  # no replica: every write is refused (NOREPLICAS)
        wait_until(
            lambda: status_of(h, "twofactor.v1.Delivery") == NOT_SERVING,
            bound=60,
            what="twofactor.v1.Delivery to become NOT_SERVING",
        )
        (said,) = [r.getMessage() for r in caplog.records if "refuses writes" in r.getMessage()]
        assert said.startswith(
            f"the delivery broker at redis://127.0.0.1:{port}/0 refuses writes (NOREPLICAS"
        )
        assert "BROKER_UNAVAILABLE" in said and "TWOFACTOR_BROKER_URL" in said
        assert status_of(h, "") == SERVING
        client.config_set("min-replicas-to-write", 0)
        wait_until(
            lambda: status_of(h, "twofactor.v1.Delivery") == SERVING,
            bound=60,
            what="twofactor.v1.Delivery to become SERVING again",
        )
        client.close()
    finally:
        server.terminate()
        server.wait(30)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
