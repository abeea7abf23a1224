"""The outer server interceptor: a request id, log context and go-grpc-prometheus metrics for every call.

It runs before ApiInterceptor (authentication, error mapping), so it sees the
final status of every call, including refused ones, and the request id is
bound for every log line the call writes. The id is the caller's
`x-request-id` metadata (bounded), or a new one; it goes back to the caller in
the response's initial metadata.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from twofactor_server.observability import logs, metrics

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128
REQUEST_ID_HEADER = "x-request-id"

_KINDS = (
    ("unary_unary", "unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", "server_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", "client_stream", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", "bidi_stream", grpc.stream_stream_rpc_method_handler),
)


def request_id_of(context: grpc.ServicerContext) -> str:
    """The caller's x-request-id (printable ASCII, at most 128 characters), or a new random one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            cleaned = "".join(c for c in value if 32 < ord(c) < 127)[:MAX_REQUEST_ID]
            if cleaned:
                return cleaned
    return uuid.uuid4().hex


def _code_of(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    # Set by abort() or set_code(); None when the handler just returned. (Not in the type stubs.)
    code = context.code()  # type: ignore[attr-defined]
    if isinstance(code, grpc.StatusCode):
        return code
    if failed and not context.is_active():
        # The client left (cancelled, or its deadline passed): a stream's request iterator then
        # raises in the handler. Not a bug, so not Unknown, which the alert on bugs counts.
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _final_code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """A stream's code once the call is over (in a callback of context.add_callback). grpcio has no
    public word for "the client cancelled": its server's state for the call says so
    (grpc/_server.py, _receive_close_on_server; tests/server/test_metrics.py pins it)."""
    code = context.code()  # type: ignore[attr-defined]  # set by abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    if getattr(getattr(context, "_state", None), "client", None) == "cancelled":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class MonitoringInterceptor(grpc.ServerInterceptor):
    """Request ids, log context and the grpc_server_* metrics, for every service (health too);
    and a cap on the streams that hold a thread.

    A blocking stream (reflection) holds one of the server's handler threads for as long as its
    client keeps it open, and needs no token: eight idle streams took every thread, and logins
    waited out their deadlines. At most `max_streams` run at once; one more is answered
    RESOURCE_EXHAUSTED at once. A non-blocking one (health Watch: health.py sends its answers
    from callbacks) holds no thread, stays so when wrapped here, and is not counted: clients
    with gRPC's client-side health checking keep one open per connection."""

    def __init__(self, max_streams: int = 2) -> None:
        self._wrapped: dict[str, Any] = {}
        self._cap = _StreamCap(max_streams)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpcio answers UNIMPLEMENTED (not cached: the name is the caller's)
        service, _, name = method.lstrip("/").rpartition("/")
        for attribute, grpc_type, make_handler in _KINDS:
            inner = getattr(handler, attribute)
            if inner is not None:
                labels = (grpc_type, service, name)
                if grpc_type in ("unary", "client_stream"):
                    around = _unary(inner, method, labels)
                elif getattr(inner, "experimental_non_blocking", False):
                    around = _non_blocking(inner, method, labels)
                else:
                    around = _streaming(inner, method, labels, self._cap)
                wrapped = make_handler(
                    around,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
                self._wrapped[method] = wrapped
                return wrapped
        return handler


def _start(context: grpc.ServicerContext, series: metrics.GrpcMethodMetrics) -> str:
    request_id = request_id_of(context)
    context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
    series.started()
    return request_id


def _unary(inner: Callable[..., Any], method: str, labels: tuple[str, str, str]) -> Callable[..., Any]:
    series = metrics.GrpcMethodMetrics(*labels)

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        with logs.bind(request_id=_start(context, series), method=method):
            failed = True
            try:
                response = inner(request, context)
                failed = False
                return response
            finally:
                _handled(series, _code_of(context, failed), started)

    # A handler that runs on threads of its own (health's Check) keeps them.
    handle.experimental_thread_pool = getattr(inner, "experimental_thread_pool", None)  # type: ignore[attr-defined]
    return handle


def _handled(series: metrics.GrpcMethodMetrics, code: grpc.StatusCode, started: float) -> None:
    seconds = time.perf_counter() - started
    series.handled(code, seconds)
    _, service, method = series.labels
    log.debug("handled %s/%s: %s in %.1f ms", service, method, code.name, seconds * 1000)


class _StreamCap:
    """How many blocking streams may run at once, and a refusal logged once a minute at most:
    refusals need no token, and each is counted in grpc_server_handled_total anyway."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.slots = threading.BoundedSemaphore(most)
        self._refusals = logs.EveryMinute()

    def refused(self, method: str) -> None:
        count = self._refusals.count()
        if not count:
            return
        log.warning(
            "refused %d stream(s) in the last minute, the last of %s: %d streams, the most at once, are "
            "open (reflection holds a handler thread while open; TWOFACTOR_MAX_WORKERS sets a quarter)",
            count,
            method,
            self.most,
        )


def _non_blocking(inner: Callable[..., Any], method: str, labels: tuple[str, str, str]) -> Callable[..., Any]:
    """A stream whose handler answers through callbacks and returns at once (health.py's
    Watch): it keeps that form, so it holds no thread; its end is recorded when the call ends."""
    series = metrics.GrpcMethodMetrics(*labels)

    def handle(request: Any, context: grpc.ServicerContext, send_response_callback: Any) -> None:
        started = time.perf_counter()
        request_id = _start(context, series)
        context.add_callback(lambda: _handled(series, _code_of(context, False), started))
        with logs.bind(request_id=request_id, method=method):
            inner(request, context, send_response_callback)

    handle.experimental_non_blocking = True  # type: ignore[attr-defined]
    handle.experimental_thread_pool = getattr(inner, "experimental_thread_pool", None)  # type: ignore[attr-defined]
    return handle


def _streaming(
    inner: Callable[..., Any], method: str, labels: tuple[str, str, str], cap: _StreamCap
) -> Callable[..., Any]:
    series = metrics.GrpcMethodMetrics(*labels)

    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started = time.perf_counter()
        request_id = _start(context, series)
        if not cap.slots.acquire(blocking=False):
            _handled(series, grpc.StatusCode.RESOURCE_EXHAUSTED, started)
            cap.refused(method)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{cap.most} streams are open on this server, the most at once; retry later",
            )
        failed = [True]  # until the responses end without an error

        def over() -> None:  # grpc calls it once the call is over: its status sent, or the client gone
            with logs.bind(request_id=request_id, method=method):
                _handled(series, _final_code(context, failed[0]), started)

        # Counted when the call is over, not when the responses end: a client's cancel can reach
        # the handler as the end of its requests (the responses then end without an error) before
        # grpc knows it was a cancel. A call already over is counted as the responses end.
        counted_when_over = context.add_callback(over)
        try:
            with logs.bind(request_id=request_id, method=method):
                responses = inner(request, context)
            while True:
                # Each response is produced inside the call's log context.
                with logs.bind(request_id=request_id, method=method):
                    try:
                        response = next(responses)
                    except StopIteration:
                        break
                yield response
            failed[0] = False
        finally:
            cap.slots.release()
            if not counted_when_over:
                with logs.bind(request_id=request_id, method=method):
                    _handled(series, _code_of(context, failed[0]), started)

    return handle
