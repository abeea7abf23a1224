"""`twofactor health`: ask a server's gRPC health service, for a container HEALTHCHECK or an exec probe.

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING,
unknown service, unreachable, timed out), with one line saying which.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from twofactor_server.settings import Settings, SettingsError


def default_target(listen: str) -> str:
    """TWOFACTOR_LISTEN as a place to connect to: an any-address host becomes the loopback."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):  # noqa: S104 - a listen address, rewritten
        host = "127.0.0.1"
    return f"{host}:{port}"


@dataclass(frozen=True)
class TlsOptions:
    """How the probe speaks TLS; each empty field takes its default from the server's settings."""

    ca_file: str = ""  # default: TWOFACTOR_TLS_CERT_FILE (self-signed, or a file holding the chain)
    cert_file: str = ""  # client certificate when the server requires one (mTLS)
    key_file: str = ""


def channel_for(settings: Settings, target: str, tls: TlsOptions) -> grpc.Channel:
    """Plaintext, or TLS when TWOFACTOR_TLS_CERT_FILE is set (or --ca-file is given)."""
    ca_file = tls.ca_file or settings.tls_cert_file
    if not ca_file:
        if tls.cert_file or tls.key_file:  # a client certificate only means something over TLS
            raise SettingsError("health: --cert and --key need TLS (TWOFACTOR_TLS_CERT_FILE or --ca-file)")
        return grpc.insecure_channel(target)
    try:
        ca = Path(ca_file).read_bytes()
        server_cert = Path(settings.tls_cert_file).read_bytes() if settings.tls_cert_file else None
        cert = Path(tls.cert_file).read_bytes() if tls.cert_file else None
        key = Path(tls.key_file).read_bytes() if tls.key_file else None
    except OSError as error:
        raise SettingsError(f"health: cannot read a TLS file ({error})") from None
    if (cert is None) != (key is None):
        raise SettingsError("health: --cert and --key go together")
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = []
    name = _certificate_name(server_cert) if server_cert else None
    if name:  # the server's certificate names a host, not the loopback address the probe dials
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target, credentials, options=options)


def _certificate_name(pem: bytes) -> str | None:
    """The first DNS name of the certificate's subjectAltName; without one, its subject's common
    name, which gRPC's clients verify a name against then (`openssl req -x509 -subj /CN=host`)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:  # only then is the common name verified
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(common[0].value) if common else None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


def probe(
    settings: Settings, *, target: str | None, service: str, timeout: float, tls: TlsOptions | None = None
) -> int:
    target = target or default_target(settings.listen)
    shown = service or '""'
    with channel_for(settings, target, tls or TlsOptions()) as channel:
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
