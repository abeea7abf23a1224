"""Caller authentication: bearer tokens and scopes on every RPC, open health and reflection, and the
embedded default's development tokens."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import admin_service_pb2_grpc, twofactor_service_pb2_grpc
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, TEST_KEYS, TOKENS, Clock, Harness, ServerFactory
from tests.server.helpers import error_info
from twofactor_server.api.interceptors import ApiInterceptor
from twofactor_server.app import create_server, dev_tokens
from twofactor_server.settings import Settings, SettingsError, TokenSetting

# The scope each service needs, and a configured token that has it. A service missing here fails
# test_every_service_the_server_exposes_is_covered.
SERVICES: dict[descriptor.ServiceDescriptor, str] = {
    pb.DESCRIPTOR.services_by_name["TwoFactorService"]: "app",
    admin_pb.DESCRIPTOR.services_by_name["AdminService"]: "admin",
}
TOKEN_OF_SCOPE = {"app": APP_TOKEN, "admin": ADMIN_TOKEN}
OPEN_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
METHODS = [method for service in SERVICES for method in service.methods]
TIMEOUT = 10.0
# What an authenticated call with an empty request may get: not INTERNAL, UNIMPLEMENTED, or an auth error.
DOMAIN_REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def call(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, metadata: tuple[tuple[str, str], ...]
) -> Any:
    """Call any method with an empty request, whatever its kind (so a streaming RPC is covered too)."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    options = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    request = request_class()
    if method.client_streaming and method.server_streaming:
        return list(
            channel.stream_stream(path, **options)(iter([request]), metadata=metadata, timeout=TIMEOUT)
        )
    if method.client_streaming:
        return channel.stream_unary(path, **options)(iter([request]), metadata=metadata, timeout=TIMEOUT)
    if method.server_streaming:
        return list(channel.unary_stream(path, **options)(request, metadata=metadata, timeout=TIMEOUT))
    return channel.unary_unary(path, **options)(request, metadata=metadata, timeout=TIMEOUT)


def refusal(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, metadata: tuple[tuple[str, str], ...]
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, method, metadata)
    return raised.value


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("method", METHODS, ids=[m.full_name for m in METHODS])
def test_every_rpc_needs_a_token_with_its_scope(
    harness: Harness, method: descriptor.MethodDescriptor
) -> None:
    scope = SERVICES[method.containing_service]
    channel = harness.channel

    for metadata in (
        (),
        (("authorization", ""),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer "),),
        (("x-api-key", TOKEN_OF_SCOPE[scope]),),
    ):
        missing = refusal(channel, method, metadata)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert error_info(missing).reason == "MISSING_TOKEN", metadata

    # A token sent without the Bearer scheme is there but not usable: INVALID_TOKEN, and the
    # message names the scheme the server expects.
    for metadata in (
        (("authorization", f"Basic {TOKEN_OF_SCOPE[scope]}"),),
        (("authorization", f"Token {TOKEN_OF_SCOPE[scope]}"),),
        (("authorization", TOKEN_OF_SCOPE[scope]),),
    ):
        unschemed = refusal(channel, method, metadata)
        assert unschemed.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert error_info(unschemed).reason == "INVALID_TOKEN", metadata
        assert "Bearer" in unschemed.details(), unschemed.details()

    for token in (
        "not-a-token",
        TOKEN_OF_SCOPE[scope].upper(),
        TOKEN_OF_SCOPE[scope] + "x",
        hashlib.sha256(TOKEN_OF_SCOPE[scope].encode()).hexdigest(),
    ):
        unknown = refusal(channel, method, bearer(token))
        assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED, token
        assert error_info(unknown).reason == "INVALID_TOKEN", token

    other_scope = next(s for s in TOKEN_OF_SCOPE if s != scope)
    denied = refusal(channel, method, bearer(TOKEN_OF_SCOPE[other_scope]))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(denied)
    assert info.reason == "SCOPE_REQUIRED" and info.metadata["scope"] == scope

    # With the right token the call gets past authentication: the empty request is answered, or refused
    # for what it holds. (The scheme is case-insensitive, RFC 7235.)
    for metadata in (bearer(TOKEN_OF_SCOPE[scope]), (("authorization", f"bearer {TOKEN_OF_SCOPE[scope]}"),)):
        try:
            call(channel, method, metadata)
        except grpc.RpcError as error:
            assert error.code() in DOMAIN_REFUSALS, (error.code(), error.details())


def test_every_service_the_server_exposes_is_covered(harness: Harness) -> None:
    exposed = set(ProtoReflectionDescriptorDatabase(harness.channel).get_services())
    assert exposed == {s.full_name for s in SERVICES} | OPEN_SERVICES


def test_a_refused_call_changes_nothing(harness: Harness) -> None:
    for metadata in ((), bearer("not-a-token"), harness.admin_metadata):
        with pytest.raises(grpc.RpcError):
            harness.twofactor.SetContact(
                pb.SetContactRequest(user_id="alice", email="alice@example.com"), metadata=metadata
            )
    with pytest.raises(grpc.RpcError) as unknown:
        harness.admin.GetUser(admin_pb.GetUserRequest(user_id="alice"), metadata=harness.admin_metadata)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id="alice", email="alice@example.com"), metadata=harness.app_metadata
    )
    with pytest.raises(grpc.RpcError) as denied:
        harness.admin.UnlockUser(admin_pb.UnlockUserRequest(user_id="alice"), metadata=harness.app_metadata)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    events = harness.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(), metadata=harness.admin_metadata
    ).events
    assert [(e.action, e.actor) for e in events] == [("contact_changed", "backend")]


def test_a_token_with_both_scopes_calls_both_services(start_server: ServerFactory) -> None:
    both = "test-both-token"
    h = start_server(
        tokens=(
            *TOKENS,
            TokenSetting("ops-bot", frozenset({"app", "admin"}), hashlib.sha256(both.encode()).digest()),
        )
    )
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="bob", email="bob@example.com"), metadata=bearer(both)
    )
    user = h.admin.GetUser(admin_pb.GetUserRequest(user_id="bob"), metadata=bearer(both)).user
    assert user.masked_email == "b***@example.com"
    events = h.admin.ListAuditEvents(admin_pb.ListAuditEventsRequest(), metadata=bearer(both)).events
    assert [e.actor for e in events] == ["ops-bot"]


def test_health_and_reflection_need_no_token(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", *(s.full_name for s in SERVICES)):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    services = ProtoReflectionDescriptorDatabase(harness.channel).get_services()
    assert "twofactor.v1.AdminService" in services


class _Aborted(Exception):
    """Raised by _Context's abort, with the status code."""


class _Context:
    """What ApiInterceptor uses of a grpc.ServicerContext: the metadata, code() and abort."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:
        return None

    def abort_with_status(self, status: grpc.Status) -> None:
        raise _Aborted(status.code)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_the_caller_check_also_guards_streaming_handlers() -> None:
    """No twofactor.v1 RPC streams yet; one added later must not be served without a token."""
    served: list[str] = []

    def stream(request: Any, context: Any) -> Iterator[str]:
        served.append("stream")
        yield "secret data"

    interceptor = ApiInterceptor(TOKENS)
    original = grpc.unary_stream_rpc_method_handler(stream)
    details = _Details("/twofactor.v1.AdminService/WatchUsers")
    handler = interceptor.intercept_service(lambda _details: original, details)
    assert handler.unary_stream is not None
    for metadata in ((), bearer("not-a-token"), bearer(APP_TOKEN)):
        with pytest.raises(_Aborted):
            list(handler.unary_stream(None, _Context(metadata)))
    assert served == []
    assert list(handler.unary_stream(None, _Context(bearer(ADMIN_TOKEN)))) == ["secret data"] and served == [
        "stream"
    ]


def test_a_unary_request_is_decoded_only_for_an_authenticated_caller() -> None:
    """The request's bytes reach the deserializer after the token is checked: a caller without
    a valid token has nothing of its parsed, and bytes that don't decode are INVALID_ARGUMENT."""
    decoded: list[bytes] = []

    def deserialize(raw: bytes) -> pb.VerifyRequest:
        decoded.append(raw)
        return pb.VerifyRequest.FromString(raw)

    original = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request.user_id, request_deserializer=deserialize
    )
    details = _Details("/twofactor.v1.TwoFactorService/Verify")
    handler = ApiInterceptor(TOKENS).intercept_service(lambda _details: original, details)
    assert handler.unary_unary is not None and handler.request_deserializer is None  # bytes to us
    raw = pb.VerifyRequest(user_id="alice", code="123456").SerializeToString()
    for metadata in ((), bearer("not-a-token"), bearer(ADMIN_TOKEN)):  # none, wrong, wrong scope
        with pytest.raises(_Aborted):
            handler.unary_unary(raw, _Context(metadata))
    assert decoded == []
    assert handler.unary_unary(raw, _Context(bearer(APP_TOKEN))) == "alice" and decoded == [raw]
    with pytest.raises(_Aborted) as refused:
        handler.unary_unary(b"\xff\xff\xff\xff", _Context(bearer(APP_TOKEN)))
    assert refused.value.args == (grpc.StatusCode.INVALID_ARGUMENT,)


# ---- the embedded default -------------------------------------------------------------------------


def embedded_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(listen="127.0.0.1:0", data_dir=data_dir, **overrides)


def test_the_embedded_default_makes_development_tokens_that_authenticate(
    tmp_path: Path, clock: Clock
) -> None:
    settings = embedded_settings(tmp_path / "data")
    server, port = create_server(settings, clock=clock)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        tokens = dev_tokens(settings)
        assert tokens["app"] != tokens["admin"]
        app_stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        admin_stub = admin_service_pb2_grpc.AdminServiceStub(channel)
        app_stub.SetContact(
            pb.SetContactRequest(user_id="carol", email="carol@example.com"),
            metadata=bearer(tokens["app"]),
            timeout=TIMEOUT,
        )
        user = admin_stub.GetUser(
            admin_pb.GetUserRequest(user_id="carol"), metadata=bearer(tokens["admin"]), timeout=TIMEOUT
        ).user
        assert user.masked_email == "c***@example.com"
        events = admin_stub.ListAuditEvents(
            admin_pb.ListAuditEventsRequest(), metadata=bearer(tokens["admin"]), timeout=TIMEOUT
        ).events
        assert [e.actor for e in events] == ["dev-app"]
        # Not open: no token, or a token of the wrong scope, is refused.
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(tokens["admin"]), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                app_stub.GetStatus(pb.GetStatusRequest(user_id="carol"), metadata=metadata, timeout=TIMEOUT)
            assert refused.value.code() == code
    finally:
        channel.close()
        server.stop(grace=None)
    secrets_file = tmp_path / "data" / "dev-secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600

    # A restart on the same data directory keeps the tokens (and the data).
    assert dev_tokens(settings) == tokens
    server, port = create_server(settings, clock=clock)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel).GetStatus(
                pb.GetStatusRequest(user_id="carol"), metadata=bearer(tokens["app"]), timeout=TIMEOUT
            )
        assert status.email_registered
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ({"keys": TEST_KEYS}, "TWOFACTOR_TOKENS"),
        ({"tokens": TOKENS}, "TWOFACTOR_KEYS"),
        ({}, "TWOFACTOR_"),
    ],
    ids=["no tokens", "no keys", "neither"],
)
def test_with_a_database_url_tokens_and_keys_are_required(
    tmp_path: Path, overrides: dict[str, Any], missing: str
) -> None:
    # Refused before the database is touched: the URL points nowhere.
    settings = embedded_settings(
        tmp_path / "data", database_url="postgresql://nowhere.invalid/db", **overrides
    )
    with pytest.raises(SettingsError, match=missing):
        create_server(settings)
    assert not (tmp_path / "data" / "dev-secrets.json").exists()
