"""Health Watch streams need no token: what one caller's Watches may leave behind is bounded.

A Watch of a name no service has stays open (the health protocol's SERVICE_UNKNOWN, then an
update if the name is ever set). Its name was kept in the servicer's table after the stream
ended, whatever its length: a caller without a token could grow the server's memory for good,
a 64 KiB name per call. Here a name leaves the table with its last watcher, a name longer than
any service's is answered and ended at once, and the open Watches are capped per process (a
stop ending them: test_health.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.helpers import wait_until
from twofactor_server.health import MAX_SERVICE_NAME, HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
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
