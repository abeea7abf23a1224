"""What the SDK puts on the wire: metadata, deadlines, retry policy, TLS.

These run against a real gRPC server on port 0 that serves every
twofactor.v1 method generically and records each attempt it receives, so the
tests can count attempts, which the real service can't show. The behaviour of
the service itself is tested through the SDK in test_sdk_against_server.py.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import twofactor
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import any_pb2, duration_pb2, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from twofactor import _channel
from twofactor.v1 import admin_service_pb2, twofactor_service_pb2

TOKEN = "tf_test_token_0123456789"
SERVICES = {
    "twofactor.v1.TwoFactorService": twofactor_service_pb2.DESCRIPTOR.services_by_name["TwoFactorService"],
    "twofactor.v1.AdminService": admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
}
WAIT = 10.0  # the bound on every wait in this module, in seconds


@dataclass
class Attempt:
    method: str
    metadata: dict[str, str]
    time_remaining: float | None


# What a method does on an attempt: None answers an empty response; a
# grpc.Status aborts with it.
Behaviour = Callable[[int], grpc.Status | None]


def unavailable(attempt: int) -> grpc.Status | None:
    return _plain_status(grpc.StatusCode.UNAVAILABLE, "try again")


class _PlainStatus(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = ()


def _plain_status(code: grpc.StatusCode, details: str) -> grpc.Status:
    return _PlainStatus(code, details)


@dataclass
class Recorder(grpc.GenericRpcHandler):
    """Serves any twofactor.v1 method: records the attempt, then behaves as told."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # As the twofactor server does: response headers (x-request-id) before any answer, so gRPC's
    # own retries stop there and an UNAVAILABLE it answers is the client's to repeat.
    headers_first: bool = False

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service_name, _, method_name = handler_call_details.method.lstrip("/").partition("/")
        if service_name not in SERVICES:
            return None
        method = SERVICES[service_name].methods_by_name[method_name]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)

        def handle(request: Message, context: grpc.ServicerContext) -> Message:
            with self.lock:
                self.attempts.append(
                    Attempt(
                        method_name,
                        {key: str(value) for key, value in context.invocation_metadata()},
                        context.time_remaining(),
                    )
                )
                number = sum(1 for a in self.attempts if a.method == method_name)
            if self.headers_first:
                context.send_initial_metadata((("x-request-id", f"answer-{number}"),))
            behaviour = self.behaviours.get(method_name)
            status = behaviour(number) if behaviour else None
            if status is not None:
                context.abort_with_status(status)
            return response_class()

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=request_class.FromString,
            response_serializer=lambda message: message.SerializeToString(),
        )

    def of(self, method: str) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.method == method]


def serve(
    recorder: Recorder, port: int = 0, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[recorder])
    address = f"127.0.0.1:{port}"
    bound = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    server.start()
    return server, bound


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def target(recorder: Recorder) -> Iterator[str]:
    server, port = serve(recorder)
    yield f"127.0.0.1:{port}"
    server.stop(None)


FAST_RETRY = twofactor.RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)

# Every RPC with the keyword arguments that make a valid call.
TWOFACTOR_CALLS: dict[str, tuple[str, dict[str, Any]]] = {
    "GetStatus": ("get_status", {"user_id": "alice"}),
    "SetContact": ("set_contact", {"user_id": "alice", "email": "alice@example.com"}),
    "StartEnrollment": ("start_enrollment", {"user_id": "alice", "method": twofactor.Method.METHOD_EMAIL}),
    "ConfirmEnrollment": (
        "confirm_enrollment",
        {"user_id": "alice", "method": twofactor.Method.METHOD_EMAIL, "code": "123456"},
    ),
    "ConfirmContact": (
        "confirm_contact",
        {"user_id": "alice", "method": twofactor.Method.METHOD_EMAIL, "code": "123456"},
    ),
    "DisableMethod": ("disable_method", {"user_id": "alice", "method": twofactor.Method.METHOD_SMS}),
    "SendCode": ("send_code", {"user_id": "alice", "method": twofactor.Method.METHOD_EMAIL}),
    "GetChallenge": ("get_challenge", {"user_id": "alice", "challenge_id": "c1"}),
    "Verify": ("verify", {"user_id": "alice", "code": "123456"}),
    "GetBackupCodes": ("get_backup_codes", {"user_id": "alice"}),
    "RegenerateBackupCodes": ("regenerate_backup_codes", {"user_id": "alice"}),
}
ADMIN_CALLS: dict[str, tuple[str, dict[str, Any]]] = {
    "GetUser": ("get_user", {"user_id": "alice"}),
    "ListUsers": ("list_users", {}),
    "ResetUser": ("reset_user", {"user_id": "alice", "reason": "lost phone"}),
    "UnlockUser": ("unlock_user", {"user_id": "alice"}),
    "GetPolicy": ("get_policy", {}),
    "ListAuditEvents": ("list_audit_events", {}),
}
RETRIED = {
    "GetStatus",
    "GetChallenge",
    "GetBackupCodes",
    "DisableMethod",
    "GetUser",
    "ListUsers",
    "GetPolicy",
    "ListAuditEvents",
    "ResetUser",
    "UnlockUser",
}
# Writes the server may answer UNAVAILABLE after it committed them: repeated only by gRPC, when
# no server answered (no response headers).
NOT_REPEATED_AFTER_AN_ANSWER = {"DisableMethod", "GetBackupCodes", "ResetUser", "UnlockUser"}
ALL_CALLS = [(rpc, False, *call) for rpc, call in TWOFACTOR_CALLS.items()] + [
    (rpc, True, *call) for rpc, call in ADMIN_CALLS.items()
]


def client_for(admin: bool, target: str, **options: Any) -> twofactor.TwoFactorClient | twofactor.AdminClient:
    cls = twofactor.AdminClient if admin else twofactor.TwoFactorClient
    return cls(target, token=TOKEN, **options)


def assert_deadline(attempt: Attempt, seconds: float) -> None:
    """The server saw a deadline of about `seconds` (gRPC rounds the header up a little)."""
    assert attempt.time_remaining is not None
    assert seconds - 2 < attempt.time_remaining <= seconds + 0.1


def test_the_retried_set_is_what_the_sdk_documents() -> None:
    assert {m for methods in _channel.RETRIED_METHODS.values() for m in methods} == RETRIED


@pytest.mark.parametrize(("rpc", "admin", "method", "kwargs"), ALL_CALLS)
def test_every_call_sends_token_request_id_and_default_deadline(
    recorder: Recorder, target: str, rpc: str, admin: bool, method: str, kwargs: dict[str, Any]
) -> None:
    with client_for(admin, target) as client:
        getattr(client, method)(**kwargs)
        getattr(client, method)(**kwargs, request_id="caller-chosen-id", timeout=30)

    first, second = recorder.of(rpc)
    assert first.metadata["authorization"] == f"Bearer {TOKEN}"
    assert uuid.UUID(first.metadata["x-request-id"]).version == 4
    assert_deadline(first, twofactor.DEFAULT_TIMEOUT)
    assert second.metadata["x-request-id"] == "caller-chosen-id"
    assert_deadline(second, 30)


def test_request_ids_differ_between_calls(recorder: Recorder, target: str) -> None:
    with twofactor.TwoFactorClient(target, token=TOKEN) as client:
        for _ in range(3):
            client.get_status(user_id="alice")

    assert len({a.metadata["x-request-id"] for a in recorder.of("GetStatus")}) == 3


def test_client_timeout_sets_the_default_deadline(recorder: Recorder, target: str) -> None:
    with twofactor.TwoFactorClient(target, token=TOKEN, timeout=60) as client:
        client.get_status(user_id="alice")

    (attempt,) = recorder.of("GetStatus")
    assert_deadline(attempt, 60)


@pytest.mark.parametrize("headers_first", [False, True], ids=["no-headers", "headers-first"])
@pytest.mark.parametrize(("rpc", "admin", "method", "kwargs"), ALL_CALLS)
def test_safe_calls_are_retried_on_unavailable_and_unsafe_ones_are_not(
    recorder: Recorder,
    target: str,
    rpc: str,
    admin: bool,
    method: str,
    kwargs: dict[str, Any],
    headers_first: bool,
) -> None:
    """Whether the server sent response headers before its UNAVAILABLE (as the twofactor server
    does: gRPC's own retry stops there, and the client repeats the call) or not (gRPC retries)."""
    recorder.headers_first = headers_first
    recorder.behaviours[rpc] = lambda n: unavailable(n) if n <= 2 else None
    # A write answered UNAVAILABLE by a server that may have committed it is not repeated (a
    # spent step-up token, another audit event, another email); with no answer gRPC retries it.
    retried = rpc in RETRIED and not (headers_first and rpc in NOT_REPEATED_AFTER_AN_ANSWER)

    with client_for(admin, target, retry=FAST_RETRY) as client:
        if retried:
            getattr(client, method)(**kwargs)
        else:
            with pytest.raises(twofactor.Unavailable):
                getattr(client, method)(**kwargs)

    attempts = recorder.of(rpc)
    assert len(attempts) == (3 if retried else 1)
    # Every attempt of one call carries the call's request id.
    assert len({a.metadata["x-request-id"] for a in attempts}) == 1


WRITES_NOT_REPEATED = [
    (rpc, admin, method, kwargs)
    for rpc, admin, method, kwargs in ALL_CALLS
    if rpc in NOT_REPEATED_AFTER_AN_ANSWER
]


@pytest.mark.parametrize(("rpc", "admin", "method", "kwargs"), WRITES_NOT_REPEATED)
def test_a_write_the_server_answered_unavailable_is_sent_once(
    recorder: Recorder, target: str, rpc: str, admin: bool, method: str, kwargs: dict[str, Any]
) -> None:
    """The server's own UNAVAILABLE (after its headers) may follow a commit: ResetUser,
    UnlockUser and GetBackupCodes would write another audit event (and reset / GetBackupCodes
    email the user again), DisableMethod would find its step-up token spent. Sync and async."""
    recorder.headers_first = True
    recorder.behaviours[rpc] = unavailable

    with client_for(admin, target, retry=FAST_RETRY) as client, pytest.raises(twofactor.Unavailable):
        getattr(client, method)(**kwargs)

    async def call_async() -> None:
        cls = twofactor.AsyncAdminClient if admin else twofactor.AsyncTwoFactorClient
        async with cls(target, token=TOKEN, retry=FAST_RETRY) as client:
            with pytest.raises(twofactor.Unavailable):
                await getattr(client, method)(**kwargs)

    asyncio.run(call_async())

    assert len(recorder.of(rpc)) == 2  # one attempt per client


def test_the_readme_lists_the_calls_repeated_after_the_servers_unavailable() -> None:
    readme = (Path(__file__).parents[2] / "clients/python/README.md").read_text()
    repeated = re.search(r"repeated after the server's UNAVAILABLE:\n(.*?);", readme, re.DOTALL)
    not_repeated = re.search(r"retried when no server answered only:(.*?)\n- ", readme, re.DOTALL)
    assert repeated is not None and not_repeated is not None
    rpcs = set(TWOFACTOR_CALLS) | set(ADMIN_CALLS)
    assert set(re.findall(r"\w+", repeated[1])) == RETRIED - NOT_REPEATED_AFTER_AN_ANSWER
    assert set(re.findall(r"\w+", not_repeated[1])) & rpcs == NOT_REPEATED_AFTER_AN_ANSWER


@pytest.mark.parametrize("headers_first", [False, True], ids=["no-headers", "headers-first"])
def test_retries_stop_after_max_attempts(recorder: Recorder, target: str, headers_first: bool) -> None:
    recorder.headers_first = headers_first
    recorder.behaviours["GetStatus"] = unavailable
    policy = twofactor.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)

    with (
        twofactor.TwoFactorClient(target, token=TOKEN, retry=policy) as client,
        pytest.raises(twofactor.Unavailable),
    ):
        client.get_status(user_id="alice")

    assert len(recorder.of("GetStatus")) == 3


@pytest.mark.parametrize("headers_first", [False, True], ids=["no-headers", "headers-first"])
def test_no_retry_policy_means_one_attempt(recorder: Recorder, target: str, headers_first: bool) -> None:
    recorder.headers_first = headers_first
    recorder.behaviours["GetStatus"] = unavailable

    with (
        twofactor.TwoFactorClient(target, token=TOKEN, retry=None) as client,
        pytest.raises(twofactor.Unavailable),
    ):
        client.get_status(user_id="alice")

    assert len(recorder.of("GetStatus")) == 1


def test_other_codes_are_not_retried(recorder: Recorder, target: str) -> None:
    recorder.behaviours["GetStatus"] = lambda n: _plain_status(grpc.StatusCode.INTERNAL, "bug")

    with (
        twofactor.TwoFactorClient(target, token=TOKEN, retry=FAST_RETRY) as client,
        pytest.raises(twofactor.TwoFactorError) as raised,
    ):
        client.get_status(user_id="alice")

    assert type(raised.value) is twofactor.TwoFactorError
    assert raised.value.code is grpc.StatusCode.INTERNAL
    assert len(recorder.of("GetStatus")) == 1


def rate_limited(attempt: int) -> grpc.Status:
    info, retry = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="RESEND_TOO_SOON", domain="twofactor.v1"))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=17)))
    status = status_pb2.Status(code=8, message="wait", details=[info, retry])
    return rpc_status.to_status(status)


def test_rich_error_reaches_the_caller(recorder: Recorder, target: str) -> None:
    recorder.behaviours["SendCode"] = rate_limited

    with (
        twofactor.TwoFactorClient(target, token=TOKEN) as client,
        pytest.raises(twofactor.RateLimited) as raised,
    ):
        client.send_code(user_id="alice", method=twofactor.Method.METHOD_EMAIL, request_id="r-1")

    error = raised.value
    assert (error.code, error.message, error.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "wait",
        "RESEND_TOO_SOON",
    )
    assert error.retry_after == datetime.timedelta(seconds=17)
    assert error.request_id == "r-1"
    assert isinstance(error.__cause__, grpc.RpcError)


def test_deadline_exceeded(recorder: Recorder, target: str) -> None:
    release = threading.Event()

    def block(attempt: int) -> None:
        release.wait(WAIT)

    recorder.behaviours["Verify"] = block
    try:
        with (
            twofactor.TwoFactorClient(target, token=TOKEN) as client,
            pytest.raises(twofactor.DeadlineExceeded) as raised,
        ):
            client.verify(user_id="alice", code="123456", timeout=0.2)
    finally:
        release.set()

    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


CLOSED = "is closed .*: create a new client"


@pytest.mark.parametrize("admin", [False, True], ids=["TwoFactorClient", "AdminClient"])
def test_a_client_closed_before_its_first_call_raises_usage_error(target: str, admin: bool) -> None:
    """A grpcio stub built on a closed channel crashes the process when called: the call runs in
    a child process, so such a crash fails this test instead of the test run."""
    script = textwrap.dedent(
        f"""
        import twofactor
        client = twofactor.{"AdminClient" if admin else "TwoFactorClient"}({target!r}, token={TOKEN!r})
        client.close()
        try:
            client.{"get_user" if admin else "get_status"}(user_id="alice")
        except twofactor.UsageError as error:
            print("raised", type(error).__name__, error.code.name, error)
        """
    )

    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr}"
    assert re.fullmatch(f"raised UsageError FAILED_PRECONDITION .*{CLOSED}.*\n", child.stdout)


@pytest.mark.parametrize("admin", [False, True], ids=["TwoFactorClient", "AdminClient"])
def test_a_client_closed_after_a_call_raises_usage_error(
    recorder: Recorder, target: str, admin: bool
) -> None:
    method, kwargs = ADMIN_CALLS["GetUser"] if admin else TWOFACTOR_CALLS["GetStatus"]
    with client_for(admin, target) as client:
        getattr(client, method)(**kwargs)

    with pytest.raises(twofactor.UsageError, match=CLOSED) as raised:
        getattr(client, method)(**kwargs)

    assert isinstance(raised.value, twofactor.TwoFactorError)
    assert len(recorder.attempts) == 1


@pytest.mark.parametrize("called_before", [False, True], ids=["before-first-call", "after-a-call"])
@pytest.mark.parametrize("admin", [False, True], ids=["AsyncTwoFactorClient", "AsyncAdminClient"])
def test_a_closed_async_client_raises_usage_error(
    recorder: Recorder, target: str, admin: bool, called_before: bool
) -> None:
    method, kwargs = ADMIN_CALLS["GetUser"] if admin else TWOFACTOR_CALLS["GetStatus"]

    async def scenario() -> None:
        cls = twofactor.AsyncAdminClient if admin else twofactor.AsyncTwoFactorClient
        client = cls(target, token=TOKEN)
        if called_before:
            await getattr(client, method)(**kwargs)
        await client.close()
        await getattr(client, method)(**kwargs)

    with pytest.raises(twofactor.UsageError, match=CLOSED):
        asyncio.run(scenario())

    assert len(recorder.attempts) == (1 if called_before else 0)


def test_iterators_follow_page_tokens(recorder: Recorder) -> None:
    """iter_users / iter_audit_events request pages until next_page_token is empty."""
    pages = {"": ("a", "next-1"), "next-1": ("b", "next-2"), "next-2": ("c", "")}

    class Paging(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if details.method.endswith("/ListUsers"):

                def list_users(
                    request: admin_service_pb2.ListUsersRequest, context: grpc.ServicerContext
                ) -> admin_service_pb2.ListUsersResponse:
                    assert request.page_size == 2
                    assert request.filter == twofactor.UserFilter.USER_FILTER_ENABLED
                    user_id, token = pages[request.page_token]
                    return admin_service_pb2.ListUsersResponse(
                        users=[admin_service_pb2.User(user_id=user_id)], next_page_token=token
                    )

                return grpc.unary_unary_rpc_method_handler(
                    list_users,
                    request_deserializer=admin_service_pb2.ListUsersRequest.FromString,
                    response_serializer=admin_service_pb2.ListUsersResponse.SerializeToString,
                )
            if details.method.endswith("/ListAuditEvents"):

                def list_events(
                    request: admin_service_pb2.ListAuditEventsRequest, context: grpc.ServicerContext
                ) -> admin_service_pb2.ListAuditEventsResponse:
                    assert request.user_id == "alice"
                    user_id, token = pages[request.page_token]
                    return admin_service_pb2.ListAuditEventsResponse(
                        events=[admin_service_pb2.AuditEvent(action=user_id)], next_page_token=token
                    )

                return grpc.unary_unary_rpc_method_handler(
                    list_events,
                    request_deserializer=admin_service_pb2.ListAuditEventsRequest.FromString,
                    response_serializer=admin_service_pb2.ListAuditEventsResponse.SerializeToString,
                )
            return None

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Paging()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with twofactor.AdminClient(f"127.0.0.1:{port}", token=TOKEN) as admin:
            users = [
                u.user_id
                for u in admin.iter_users(page_size=2, filter=twofactor.UserFilter.USER_FILTER_ENABLED)
            ]
            events = [e.action for e in admin.iter_audit_events(user_id="alice")]

        async def collect() -> tuple[list[str], list[str]]:
            async with twofactor.AsyncAdminClient(f"127.0.0.1:{port}", token=TOKEN) as aadmin:
                users = [
                    u.user_id
                    async for u in aadmin.iter_users(
                        page_size=2, filter=twofactor.UserFilter.USER_FILTER_ENABLED
                    )
                ]
                events = [e.action async for e in aadmin.iter_audit_events(user_id="alice")]
                return users, events

        async_users, async_events = asyncio.run(collect())
    finally:
        server.stop(None)

    assert users == events == async_users == async_events == ["a", "b", "c"]


@pytest.mark.parametrize("retried", [True, False])
def test_retry_carries_a_call_across_a_server_restart(retried: bool) -> None:
    """The first attempt finds no server; a new server on the same port answers a retry.

    Without a retry policy the same call fails, which shows the first attempt did fail.
    """
    first, second = Recorder(), Recorder()
    server, port = serve(first)
    servers = [server]
    # Slow retries (gRPC's backoff is random in [0, cap]) against a fast
    # reconnect, so some attempt lands after the new server is up.
    policy = twofactor.RetryPolicy(max_attempts=5, initial_backoff=2, max_backoff=10, backoff_multiplier=2)
    reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    failed = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            failed.set()

    def restart() -> None:
        # Start the new server only once the client has failed to connect.
        if failed.wait(WAIT):
            servers.append(serve(second, port)[0])

    restarter = threading.Thread(target=restart)
    with twofactor.TwoFactorClient(
        f"127.0.0.1:{port}", token=TOKEN, retry=policy if retried else None, options=reconnect
    ) as client:
        client.get_status(user_id="alice")  # connected
        server.stop(None).wait(WAIT)
        client.channel.subscribe(watch)
        restarter.start()
        try:
            if retried:
                client.get_status(user_id="bob", timeout=40)
            else:
                with pytest.raises(twofactor.Unavailable):
                    client.get_status(user_id="bob", timeout=40)
        finally:
            restarter.join(WAIT)
            client.channel.unsubscribe(watch)
            for s in servers:
                s.stop(None)

    assert failed.is_set()
    assert len(servers) == 2
    assert len(first.of("GetStatus")) == 1
    assert len(second.of("GetStatus")) == (1 if retried else 0)


# --- the async client -------------------------------------------------------------


@pytest.mark.parametrize("headers_first", [False, True], ids=["no-headers", "headers-first"])
def test_async_client_sends_metadata_retries_and_raises(
    recorder: Recorder, target: str, headers_first: bool
) -> None:
    recorder.headers_first = headers_first
    recorder.behaviours["GetStatus"] = lambda n: unavailable(n) if n == 1 else None
    recorder.behaviours["SendCode"] = rate_limited

    async def scenario() -> twofactor.RateLimited:
        async with twofactor.AsyncTwoFactorClient(target, token=TOKEN, retry=FAST_RETRY) as client:
            await client.get_status(user_id="alice", request_id="async-1")
            await client.verify(user_id="alice", code="123456", timeout=30)
            with pytest.raises(twofactor.RateLimited) as raised:
                await client.send_code(user_id="alice", method=twofactor.Method.METHOD_SMS)
            return raised.value

    error = asyncio.run(scenario())

    status_attempts = recorder.of("GetStatus")
    assert len(status_attempts) == 2
    assert {a.metadata["x-request-id"] for a in status_attempts} == {"async-1"}
    assert all(a.metadata["authorization"] == f"Bearer {TOKEN}" for a in recorder.attempts)
    (verify,) = recorder.of("Verify")
    assert_deadline(verify, 30)
    assert error.retry_after == datetime.timedelta(seconds=17)
    assert error.request_id == recorder.of("SendCode")[0].metadata["x-request-id"]


@pytest.mark.parametrize(("rpc", "admin", "method", "kwargs"), ALL_CALLS)
def test_async_clients_cover_every_call(
    recorder: Recorder, target: str, rpc: str, admin: bool, method: str, kwargs: dict[str, Any]
) -> None:
    async def call() -> Message:
        cls = twofactor.AsyncAdminClient if admin else twofactor.AsyncTwoFactorClient
        async with cls(target, token=TOKEN) as client:
            response: Message = await getattr(client, method)(**kwargs)
            return response

    response = asyncio.run(call())

    assert response.DESCRIPTOR.name == f"{rpc}Response"
    assert len(recorder.of(rpc)) == 1


def test_async_deadline_exceeded(recorder: Recorder, target: str) -> None:
    release = threading.Event()

    def block(attempt: int) -> None:
        release.wait(WAIT)

    recorder.behaviours["GetStatus"] = block

    async def scenario() -> None:
        async with twofactor.AsyncTwoFactorClient(target, token=TOKEN) as client:
            await client.get_status(user_id="alice", timeout=0.2)

    try:
        with pytest.raises(twofactor.DeadlineExceeded):
            asyncio.run(scenario())
    finally:
        release.set()


def test_an_async_client_built_outside_an_event_loop_works_inside_one(
    recorder: Recorder, target: str
) -> None:
    """The common module-level client: its channel opens in the loop of its first call."""
    client = twofactor.AsyncTwoFactorClient(target, token=TOKEN)

    async def use() -> None:
        async with client:
            await client.get_status(user_id="alice")

    asyncio.run(use())

    assert len(recorder.of("GetStatus")) == 1


def test_an_async_client_built_in_one_event_loop_works_in_another(recorder: Recorder, target: str) -> None:
    async def build() -> twofactor.AsyncTwoFactorClient:
        return twofactor.AsyncTwoFactorClient(target, token=TOKEN)

    client = asyncio.run(build())

    async def use() -> None:
        async with client:
            await client.get_status(user_id="alice")

    asyncio.run(use())

    assert len(recorder.of("GetStatus")) == 1


def test_an_async_client_used_in_a_second_event_loop_raises_usage_error(
    recorder: Recorder, target: str
) -> None:
    client = twofactor.AsyncTwoFactorClient(target, token=TOKEN)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(client.get_status(user_id="alice"))
        with pytest.raises(twofactor.UsageError, match=r"another event loop.*one client per event loop"):
            second.run_until_complete(client.get_status(user_id="bob"))
        with pytest.raises(twofactor.UsageError, match="another event loop"):
            second.run_until_complete(client.close())
        first.run_until_complete(client.close())  # still open: closed in its own loop
    finally:
        first.close()
        second.close()

    assert len(recorder.of("GetStatus")) == 1


# --- construction ---------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["", "two words", "line\nbreak", "tab\there", "na\u00efve", "del\x7f", "nul\x00"]
)
@pytest.mark.parametrize("cls", [twofactor.TwoFactorClient, twofactor.AsyncAdminClient])
def test_rejects_malformed_tokens(token: str, cls: type[Any]) -> None:
    """Only visible ASCII goes into a metadata value as is: anything else would fail every call."""
    with pytest.raises(ValueError, match="token must be a non-empty string of visible ASCII"):
        cls("localhost:1", token=token)


BAD_REQUEST_IDS = ["two words", "caf\u00e9", "line\nbreak", "x" * 129]


@pytest.mark.parametrize("request_id", BAD_REQUEST_IDS)
def test_a_request_id_metadata_cant_carry_is_a_value_error_and_sends_nothing(
    recorder: Recorder, target: str, request_id: str
) -> None:
    """Sync and async alike: a ValueError naming request_id, not a raw gRPC error, and no call."""

    async def scenario() -> None:
        async with twofactor.AsyncTwoFactorClient(target, token=TOKEN) as client:
            await client.get_status(user_id="alice", request_id=request_id)

    refused = pytest.raises(ValueError, match="request_id must be 1 to 128 visible ASCII characters")
    with twofactor.TwoFactorClient(target, token=TOKEN) as client, refused:
        client.get_status(user_id="alice", request_id=request_id)
    with pytest.raises(ValueError, match="request_id must be 1 to 128 visible ASCII characters"):
        asyncio.run(scenario())
    assert recorder.attempts == []

    longest = "r" * 128  # the longest the server keeps whole
    with twofactor.TwoFactorClient(target, token=TOKEN) as client:
        client.get_status(user_id="alice", request_id=longest)
    assert [a.metadata["x-request-id"] for a in recorder.attempts] == [longest]


async def attempts_reach(recorder: Recorder, method: str, count: int) -> None:
    """Until the server has seen `count` attempts of `method` (bounded by WAIT)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while len(recorder.of(method)) < count:
        assert asyncio.get_running_loop().time() < deadline, "the call never reached the server"
        await asyncio.sleep(0.01)


def test_an_async_client_closed_during_a_call_raises_cancelled_as_the_sync_one_does(
    recorder: Recorder, target: str
) -> None:
    """close() cancels the calls in flight: their callers get a TwoFactorError CANCELLED (not
    asyncio.CancelledError, which would read as their own task being cancelled)."""
    release = threading.Event()

    def held(_attempt: int) -> None:
        release.wait(WAIT)  # the answer waits until the test lets it go (bounded)

    recorder.behaviours["GetStatus"] = held

    async def scenario() -> twofactor.TwoFactorError:
        client = twofactor.AsyncTwoFactorClient(target, token=TOKEN)
        call = asyncio.ensure_future(client.get_status(user_id="alice", request_id="in-flight"))
        await attempts_reach(recorder, "GetStatus", 1)
        await client.close()
        with pytest.raises(twofactor.TwoFactorError) as raised:
            await call
        return raised.value

    try:
        error = asyncio.run(scenario())
    finally:
        release.set()
    assert error.code is grpc.StatusCode.CANCELLED and not isinstance(error, twofactor.UsageError)
    assert error.request_id == "in-flight"

    async def cancelled_by_its_caller() -> None:
        """The caller's own cancellation stays asyncio's."""
        release.clear()
        async with twofactor.AsyncTwoFactorClient(target, token=TOKEN) as client:
            call = asyncio.ensure_future(client.get_status(user_id="bob"))
            await attempts_reach(recorder, "GetStatus", 2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    try:
        asyncio.run(cancelled_by_its_caller())
    finally:
        release.set()


def test_a_retry_policy_is_one_grpc_accepts(recorder: Recorder, target: str) -> None:
    """A backoff below a millisecond would fail every call of the channel (gRPC refuses the service
    config): refused where the policy is made. The smallest one makes a working channel."""
    with pytest.raises(ValueError, match=r"at least 0\.001 s"):
        twofactor.RetryPolicy(initial_backoff=1e-5)
    smallest = twofactor.RetryPolicy(initial_backoff=0.001, max_backoff=0.001)
    with twofactor.TwoFactorClient(target, token=TOKEN, retry=smallest) as client:
        client.get_status(user_id="alice")
    assert len(recorder.of("GetStatus")) == 1


def test_rejects_a_client_cert_without_key() -> None:
    with pytest.raises(ValueError, match="client_cert and client_key"):
        twofactor.TlsConfig(client_cert=b"pem")


def test_service_config_names_only_the_safe_methods() -> None:
    import json

    config = json.loads(_channel.service_config(twofactor.RetryPolicy()))
    (method_config,) = config["methodConfig"]
    assert {n["method"] for n in method_config["name"]} == RETRIED
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert json.loads(_channel.service_config(None)) == {}


# --- TLS --------------------------------------------------------------------------


@dataclass
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    dns: str | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twofactor test CA")])
    ca = _issue("twofactor test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("twofactor.test", server_key, ca_name, ca_key, dns="twofactor.test")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("login-backend", client_key, ca_name, ca_key)
    pem = serialization.Encoding.PEM
    return Pki(
        ca.public_bytes(pem),
        server.public_bytes(pem),
        _key_pem(server_key),
        client.public_bytes(pem),
        _key_pem(client_key),
    )


def test_tls_with_server_name_override(pki: Pki, recorder: Recorder) -> None:
    credentials = grpc.ssl_server_credentials([(pki.server_key, pki.server_cert)])
    server, port = serve(recorder, credentials=credentials)
    tls = twofactor.TlsConfig(root_ca=pki.ca, server_name="twofactor.test")
    try:
        with twofactor.TwoFactorClient(f"127.0.0.1:{port}", token=TOKEN, tls=tls) as client:
            client.get_status(user_id="alice")
    finally:
        server.stop(None)

    assert len(recorder.of("GetStatus")) == 1


def test_mtls_needs_the_client_certificate(pki: Pki, recorder: Recorder, tmp_path: Path) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key, pki.server_cert)], root_certificates=pki.ca, require_client_auth=True
    )
    server, port = serve(recorder, credentials=credentials)
    for name in ("ca", "client_cert", "client_key"):
        (tmp_path / f"{name}.pem").write_bytes(getattr(pki, name))
    with_cert = twofactor.TlsConfig.from_files(
        root_ca=tmp_path / "ca.pem",
        client_cert=tmp_path / "client_cert.pem",
        client_key=tmp_path / "client_key.pem",
        server_name="twofactor.test",
    )
    without_cert = twofactor.TlsConfig(root_ca=pki.ca, server_name="twofactor.test")
    target = f"127.0.0.1:{port}"
    try:
        with twofactor.TwoFactorClient(target, token=TOKEN, tls=with_cert) as client:
            client.get_status(user_id="alice")
        with (
            twofactor.TwoFactorClient(target, token=TOKEN, tls=without_cert, retry=None) as client,
            pytest.raises(twofactor.Unavailable),
        ):
            client.get_status(user_id="alice")
    finally:
        server.stop(None)

    assert len(recorder.of("GetStatus")) == 1


def test_the_channel_settings_never_show_the_token_or_the_client_key() -> None:
    """An error tracker records the locals of a failing frame by their repr: the SDK's settings
    are among them, and the bearer token and the client key must not be."""
    from twofactor._channel import ChannelSettings

    tls = twofactor.TlsConfig(client_cert=b"client-cert-pem", client_key=b"client-key-secret")
    settings = ChannelSettings("127.0.0.1:50051", "app-token-secret", tls, 5.0, None, ())
    shown = repr(settings)
    assert "app-token-secret" not in shown and "client-key-secret" not in shown
    assert "127.0.0.1:50051" in shown and "client-cert-pem" in shown
