"""Health Watch streams need no token: what one caller's Watches may leave behind is bounded.

A Watch of a name no service has stays open (the health protocol's SERVICE_UNKNOWN, then an
update if the name is ever set). Its name was kept in the servicer's table after the stream
ended, whatever its length: a caller without a token could grow the server's memory for good,
a 64 KiB name per call. Here a name leaves the table with its last watcher, a name longer than
any service's is answered and ended at once, the open Watches are capped per process, and a
stop ends the Watches of unknown names too (they held the drain for the whole grace period).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.helpers import wait_until
from twofactor_server.health import MAX_SERVICE_NAME, HealthServicer

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.fixture
def served() -> Iterator[tuple[HealthServicer, health_pb2_grpc.HealthStub]]:
    """Our health servicer, at most three open Watches, on a real gRPC server."""
    servicer = HealthServicer(2, max_watches=3)
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, health_pb2_grpc.HealthStub(channel)
    finally:
        channel.close()
        server.stop(None).wait(30)
        servicer.close()


def test_a_name_leaves_the_table_with_its_last_watcher(
    served: tuple[HealthServicer, health_pb2_grpc.HealthStub],
) -> None:
    servicer, stub = served
    for round_ in range(5):
        names = [f"no.such.Service{round_}x{i}" for i in range(3)]
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=name)) for name in names]
        assert [next(w).status for w in watches] == [SERVICE_UNKNOWN] * 3
        assert set(names) <= servicer.watched_names()
        for w in watches:
            w.cancel()
        wait_until(lambda: not servicer.watched_names(), "the ended Watches' names forgotten", bound=30.0)


def test_a_name_longer_than_any_service_is_answered_and_ended(
    served: tuple[HealthServicer, health_pb2_grpc.HealthStub],
) -> None:
    servicer, stub = served
    too_long = health_pb2.HealthCheckRequest(service="x" * (MAX_SERVICE_NAME + 1))
    answers = list(stub.Watch(too_long, timeout=30))
    assert [a.status for a in answers] == [SERVICE_UNKNOWN]  # then the stream ended, OK
    assert not servicer.watched_names()
    name = "y" * MAX_SERVICE_NAME  # the longest that is kept open
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=name))
    assert next(watch).status == SERVICE_UNKNOWN
    assert servicer.watched_names() == {name}
    watch.cancel()


def test_open_watches_are_capped_and_a_slot_comes_back_when_one_ends(
    served: tuple[HealthServicer, health_pb2_grpc.HealthStub],
) -> None:
    servicer, stub = served
    servicer.set("", SERVING)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(3)]
    assert [next(w).status for w in watches] == [SERVING] * 3
    refused = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    with pytest.raises(grpc.RpcError) as caught:
        next(refused)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "3 health Watches are open" in str(caught.value.details())
    # Check is never refused
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING
    watches.pop().cancel()

    def another_watch_answers() -> bool:
        try:
            w = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            ok = next(w).status == SERVING
        except grpc.RpcError:
            return False
        watches.append(w)
        return ok

    wait_until(another_watch_answers, "a Watch taking the slot an ended one left", bound=30.0)
    for w in watches:
        w.cancel()


def test_a_watch_of_an_unknown_name_ends_at_sigterm_and_holds_no_drain(tmp_path: Path) -> None:
    """A Watch of a known name ended at SIGTERM (test_health.py); one of a name no service has
    was left open, and the stop waited the whole TWOFACTOR_GRACE_SECONDS for it."""
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
                request = health_pb2.HealthCheckRequest(service="no.such.Service")
                try:
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
        assert statuses == [SERVICE_UNKNOWN]
        assert stopped_after < 15, f"the stop waited {stopped_after:.1f} s of its 20 s grace for the watch"
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        server.stdout.close()
