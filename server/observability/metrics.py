"""Every Prometheus metric of the server and the workers, and one small function per event.

The rest of the code records events through these functions (`verification`,
`code_sent`, `delivery`, ...) and never touches prometheus_client, so metric
names and labels live in one place and the use cases stay free of the library.
Metrics are process-wide, like the registry they live in; a Celery worker runs
the library's multiprocess mode (see `enable_multiprocess`) so its pool
processes add up in one scrape.

The gRPC metrics follow go-grpc-prometheus exactly (names, labels, `grpc_code`
spelled like Go's codes.Code.String()), so dashboards written for it work.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

# The *_created series double every counter's series count and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# grpc.StatusCode names to go-grpc-prometheus's grpc_code values.
GO_CODE_NAMES = {
    code: "".join(part.capitalize() for part in code.name.split("_")) for code in grpc.StatusCode
}
GO_CODE_NAMES[grpc.StatusCode.OK] = "OK"
GO_CODE_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

grpc_server_started_total = Counter(
    "grpc_server_started_total", "Total number of RPCs started on the server.", GRPC_LABELS
)
grpc_server_handled_total = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*GRPC_LABELS, "grpc_code"),
)
grpc_server_handling_seconds = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    GRPC_LABELS,
)
verifications_total = Counter(
    "twofactor_verifications",
    "Verify answers by result and by the kind of code that matched.",
    ("result", "kind"),
)
lockouts_total = Counter("twofactor_lockouts", "Users locked out after too many wrong codes.")
codes_sent_total = Counter(
    "twofactor_codes_sent",
    "Codes issued for delivery by email or SMS (queued, or not_queued when the broker was unreachable).",
    ("method", "outcome"),
)
notices_total = Counter(
    "twofactor_notices",
    "Emails telling a user of a change to their second factor, queued once the change committed, by change.",
    ("notice",),
)
send_refusals_total = Counter(
    "twofactor_send_refusals", "SendCode calls refused by a send limit, by error reason.", ("reason",)
)
deliveries_total = Counter(
    "twofactor_deliveries",
    "Delivery attempts by method, provider and outcome (sent, retry, failed, expired).",
    ("method", "provider", "outcome"),
)
delivery_seconds = Histogram(
    "twofactor_delivery_seconds",
    "Seconds from SendCode to the provider accepting the message.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
outbox_oldest_queued_seconds = Gauge(
    "twofactor_outbox_oldest_queued_seconds",
    "Age of the oldest challenge still waiting for delivery (0 when none is).",
    multiprocess_mode="mostrecent",
)
outbox_expired_total = Counter(
    "twofactor_outbox_expired",
    "Codes and notices that expired undelivered, closed by outbox recovery, by method.",
    ("method",),
)
outbox_republished_total = Counter(
    "twofactor_outbox_republished", "Challenges published again by outbox recovery."
)
storage_up = Gauge(
    "twofactor_storage_up",
    "1 when the database answered the last health probe, 0 when it did not.",
    multiprocess_mode="mostrecent",  # as broker_up: a worker, which never sets it, exports none
)
broker_up = Gauge(
    "twofactor_broker_up",
    "1 when the delivery broker took the last check's write, 0 when it was unreachable or refused it.",
    multiprocess_mode="mostrecent",
)


class GrpcMethodMetrics:
    """The grpc_server_* series of one method. Their label children are looked up once per
    method and status code, not per call (labels() takes a lock and builds a key each time)."""

    def __init__(self, grpc_type: str, service: str, method: str) -> None:
        self.labels = (grpc_type, service, method)
        self._started = grpc_server_started_total.labels(*self.labels)
        self._seconds = grpc_server_handling_seconds.labels(*self.labels)
        self._handled: dict[grpc.StatusCode, Counter] = {}

    def started(self) -> None:
        self._started.inc()

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._handled.get(code)
        if counter is None:
            counter = grpc_server_handled_total.labels(*self.labels, GO_CODE_NAMES[code])
            self._handled[code] = counter
        counter.inc()
        self._seconds.observe(seconds)


_label_children: dict[tuple[Counter, str, str], Counter] = {}


def _child(metric: Counter, first: str, second: str) -> Counter:
    """metric.labels(first, second), made once per label values: labels() takes a lock and
    builds a key on every call, and these count every login and every send."""
    key = (metric, first, second)
    child = _label_children.get(key)
    if child is None:
        child = _label_children[key] = metric.labels(first, second)
    return child


def verification(result: str, kind: str) -> None:
    """A Verify answer: result accepted|rejected|locked, kind authenticator|email|sms|backup_code|none."""
    _child(verifications_total, result, kind).inc()


def lockout() -> None:
    lockouts_total.inc()


def code_sent(method: str, outcome: str) -> None:
    _child(codes_sent_total, method, outcome).inc()


def notice_queued(notice: str) -> None:
    notices_total.labels(notice).inc()


def send_refused(reason: str) -> None:
    send_refusals_total.labels(reason).inc()


def delivery(method: str, provider: str, outcome: str, *, since_send_seconds: float | None = None) -> None:
    """One delivery attempt; `since_send_seconds` (SendCode to acceptance) when the provider accepted."""
    deliveries_total.labels(method, provider, outcome).inc()
    if since_send_seconds is not None:
        delivery_seconds.observe(max(0.0, since_send_seconds))


def provider_label(sender: object) -> str:
    """A provider's label: its `provider_name` attribute, else its class name."""
    return str(getattr(sender, "provider_name", type(sender).__name__))


def outbox_oldest_queued(seconds: float) -> None:
    outbox_oldest_queued_seconds.set(max(0.0, seconds))


def outbox_expired(method: str) -> None:
    outbox_expired_total.labels(method).inc()


def outbox_republished(count: int = 1) -> None:
    outbox_republished_total.inc(count)


def storage_reachable(up: bool) -> None:
    storage_up.set(1 if up else 0)


def broker_reachable(up: bool) -> None:
    broker_up.set(1 if up else 0)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)


def serve_metrics(listen: str, *, multiprocess: bool = False) -> MetricsEndpoint:
    """Serve /metrics on `listen` (host:port; port 0 picks one). Raises OSError, whose text says
    why, when it can't bind."""
    host, _, port = listen.rpartition(":")
    registry = None
    if multiprocess:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    addr = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an empty host means every interface
    try:
        if registry is None:
            server, thread = start_http_server(int(port), addr=addr)
        else:
            server, thread = start_http_server(int(port), addr=addr, registry=registry)
    except OSError as error:
        # What every caller prints: the reason without its [Errno n]. A server and a worker on one
        # host, started with one environment, ask for one port.
        in_use = f"port {port} is already in use: each server or worker on a host needs a port of its own"
        raise OSError(in_use if error.errno == errno.EADDRINUSE else error.strerror or str(error)) from None
    return MetricsEndpoint(host, server.server_port, server, thread)


MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    """True when prometheus_client started in its multiprocess mode (the variable was set at import)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def prepare_multiprocess_dir() -> str:
    """Make an empty directory for the multiprocess mode and name it in PROMETHEUS_MULTIPROC_DIR.

    The library reads that variable when it is first imported, so `twofactor worker`
    calls this before it execs the worker process, whose pool processes inherit it.
    """
    directory = tempfile.mkdtemp(prefix="twofactor-metrics-")
    os.environ[MULTIPROC_VARIABLE] = directory  # the library's own switch, written for the exec'd worker
    return directory


def remove_multiprocess_dir() -> None:
    """Delete the multiprocess directory made by prepare_multiprocess_dir, when the worker exits."""
    directory = os.environ.get(MULTIPROC_VARIABLE)  # the library's variable, not a TWOFACTOR_ setting
    if directory and Path(directory).name.startswith("twofactor-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Forget a finished pool process's live gauges (multiprocess mode)."""
    from prometheus_client import multiprocess as mp

    if multiprocess_enabled():
        mp.mark_process_dead(pid)  # type: ignore[no-untyped-call]
