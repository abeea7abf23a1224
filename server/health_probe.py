"""`twofactor health`: ask a server's gRPC health service, for a container HEALTHCHECK or an exec probe.

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING,
unknown service, unreachable, timed out), with one line saying which.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twofactor_server.settings import Settings, SettingsError


def default_target(listen: str) -> str:
    """TWOFACTOR_LISTEN as a place to connect to: an any-address host becomes the loopback."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):  # noqa: S104 - a listen address, rewritten
        host = "127.0.0.1"
    return f"{host}:{port}"


def channel_for(settings: Settings, target: str) -> grpc.Channel:
    """Plaintext, or TLS trusting the server's own certificate when TWOFACTOR_TLS_CERT_FILE is set
    (presenting that certificate too when the server asks clients for one)."""
    if not settings.tls_cert_file:
        return grpc.insecure_channel(target)
    try:
        cert = Path(settings.tls_cert_file).read_bytes()
        key = Path(settings.tls_key_file).read_bytes() if settings.tls_client_ca_file else None
    except OSError as error:
        raise SettingsError(f"health: cannot read the TLS files ({error})") from None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=cert, private_key=key, certificate_chain=cert if key else None
    )
    return grpc.secure_channel(target, credentials)


def probe(settings: Settings, *, target: str | None, service: str, timeout: float) -> int:
    target = target or default_target(settings.listen)
    shown = service or '""'
    with channel_for(settings, target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            why = f"{error.code().name} ({error.details()})" if isinstance(error, grpc.Call) else str(error)
            print(f"twofactor health: {target} {shown}: {why}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{target} {shown}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1
