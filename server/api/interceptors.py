"""The server interceptor: caller authentication, request ids, and error mapping.

It wraps unary-unary handlers (every twofactor.v1 RPC is unary) and guards any
streaming handler too, so nothing is served open. The caller found by
authentication travels to the servicer in a context variable, since a handler
runs start to end on one thread.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import uuid
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from twofactor_server.api.errors import abort_for
from twofactor_server.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from twofactor_server.domain.models import Caller
from twofactor_server.observability import logs
from twofactor_server.settings import TokenSetting

# Caller is immutable (a NamedTuple), so one shared default is safe.
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "current_caller",
    default=Caller(),  # noqa: B039
)

# The scope each service needs; services not listed (health, reflection) are open.
SCOPES = {"twofactor.v1.TwoFactorService": "app", "twofactor.v1.AdminService": "admin"}
MAX_REQUEST_ID = 128


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs


_STREAMING_KINDS = (
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def _wrap_streaming(handler: Handler, guard: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Handler:
    """The streaming handler run through `guard` when its call starts (a streaming response is
    iterated after the guard returns)."""
    for kind, make_handler in _STREAMING_KINDS:
        inner = getattr(handler, kind)
        if inner is not None:
            return make_handler(
                guard(inner),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ApiInterceptor(grpc.ServerInterceptor):
    """For every twofactor.v1 RPC: authenticate the caller, then map any failure to its status.

    Checks `authorization: Bearer <token>` against the configured token digests;
    health and reflection pass untouched. Wrapped handlers are built once per
    method, so a call pays only for its own checks.
    """

    def __init__(self, tokens: tuple[TokenSetting, ...]) -> None:
        self._tokens = tokens
        self._wrapped: dict[str, Handler | None] = {}

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        scope = SCOPES.get(method.lstrip("/").rpartition("/")[0])
        if handler is None or scope is None:
            return handler  # unknown methods (not cached: their names are the caller's) and open services
        if handler.unary_unary is None:
            # No twofactor.v1 RPC streams today; one added later must not be served without a token.
            wrapped = _wrap_streaming(handler, lambda inner: self._guarded(scope, method, inner, None))
        else:
            # grpcio hands the handler the request's bytes (no deserializer): they are decoded
            # after authentication, where a decode error can be answered INVALID_ARGUMENT
            # (grpcio's own decoding would answer INTERNAL).
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._guarded(scope, method, handler.unary_unary, handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        self._wrapped[method] = wrapped
        return wrapped

    def _guarded(
        self,
        scope: str,
        method: str,
        inner: Callable[[Any, grpc.ServicerContext], Any],
        deserialize: Callable[[bytes], Any] | None,
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        """`inner` behind the caller check and the error mapping: one call of ours around the
        servicer's, the hot path of every login. `deserialize` decodes a unary request's bytes
        once the caller is known (None: grpcio decoded the request, as for a streaming RPC)."""

        def handle(raw: Any, context: grpc.ServicerContext) -> Any:
            try:
                caller = self._caller(context, scope)
                try:
                    request = raw if deserialize is None else deserialize(raw)
                except DecodeError:
                    raise InvalidArgument(
                        "MALFORMED_REQUEST", "the request bytes are not a valid message"
                    ) from None
                token = current_caller.set(caller)
                # Into MonitoringInterceptor's scope for this call, so its closing line names the token too.
                logs.bind_more(token=caller.actor)
                try:
                    return inner(request, context)
                finally:
                    current_caller.reset(token)
            except Exception as exc:
                if context.code() is not None:  # type: ignore[attr-defined]  # already aborted by the handler
                    raise
                abort_for(exc, context, method)

        return handle

    def _caller(self, context: grpc.ServicerContext, scope: str) -> Caller:
        """The authenticated caller of this call, with its request id."""
        metadata = dict(context.invocation_metadata() or ())
        request_id = (  # MonitoringInterceptor bound it, and sent it back to the caller
            logs.bound().get("request_id")
            or str(metadata.get("x-request-id", ""))[:MAX_REQUEST_ID]
            or uuid.uuid4().hex
        )
        return self._authenticate(str(metadata.get("authorization", "")), scope, request_id)

    def _authenticate(self, header: str, scope: str | None, request_id: str) -> Caller:
        kind, _, presented = header.strip().partition(" ")
        bearer = kind.lower() == "bearer"
        presented = presented.strip()
        if not kind or (bearer and not presented):
            raise Unauthenticated("MISSING_TOKEN", "send `authorization: Bearer <token>` metadata")
        if not bearer:
            # A token was sent, but not as a bearer token (another scheme, or none at all).
            raise Unauthenticated(
                "INVALID_TOKEN", "the authorization metadata must use the Bearer scheme: `Bearer <token>`"
            )
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for token in self._tokens:  # check them all: the time taken doesn't say which matched
            if hmac.compare_digest(digest, token.sha256):
                found = token
        if found is None:
            raise Unauthenticated("INVALID_TOKEN", "the token is not valid")
        if scope not in found.scopes:
            raise PermissionDenied(
                "SCOPE_REQUIRED", f"this token lacks the {scope} scope", metadata={"scope": str(scope)}
            )
        return Caller(found.name, request_id)  # (actor, request_id)
