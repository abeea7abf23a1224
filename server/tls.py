"""The server's TLS credentials from the configured PEM files, checked at start: one
SettingsError line for a file that can't be used, rather than a failed bind or a server every
TLS client fails on."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from twofactor_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)
Parsed = TypeVar("Parsed")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, checked up front (the key is the
    certificate's, the certificate is valid now); None for plaintext. The files are read at
    start: after renewing the certificate, restart the servers one by one."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:  # client certificates need TLS: never plaintext instead
            raise SettingsError(
                "TWOFACTOR_TLS_CLIENT_CA_FILE needs TWOFACTOR_TLS_CERT_FILE and TWOFACTOR_TLS_KEY_FILE "
                "(client certificates are checked over TLS only)"
            )
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise SettingsError("TWOFACTOR_TLS_CERT_FILE and TWOFACTOR_TLS_KEY_FILE go together")
    cert, chain = _read_pem(
        "TWOFACTOR_TLS_CERT_FILE", settings.tls_cert_file, x509.load_pem_x509_certificates
    )
    key, private_key = _read_pem(
        "TWOFACTOR_TLS_KEY_FILE",
        settings.tls_key_file,
        lambda data: serialization.load_pem_private_key(data, password=None),
    )
    _require_usable_pair(settings, chain[0], private_key)
    client_ca = None
    if settings.tls_client_ca_file:
        client_ca, _ = _read_pem(
            "TWOFACTOR_TLS_CLIENT_CA_FILE", settings.tls_client_ca_file, x509.load_pem_x509_certificates
        )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _require_usable_pair(settings: Settings, leaf: x509.Certificate, key: PrivateKeyTypes) -> None:
    """The key is the certificate's, and the certificate is valid now (a warning in its last two
    weeks): otherwise every TLS client fails, and the server alone would not say why."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise SettingsError(
            f"TWOFACTOR_TLS_KEY_FILE: {settings.tls_key_file} is not the key of the certificate in "
            f"{settings.tls_cert_file} (its first certificate)"
        )
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise SettingsError(
            f"TWOFACTOR_TLS_CERT_FILE: the certificate in {settings.tls_cert_file} is valid from "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
            "not now: renew it"
        )
    if leaf.not_valid_after_utc - now < datetime.timedelta(days=14):
        log.warning(
            "the TLS certificate in %s expires on %s UTC: renew it, then restart the servers",
            settings.tls_cert_file,
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M}",
        )


def _read_pem(variable: str, path: str, parse: Callable[[bytes], Parsed]) -> tuple[bytes, Parsed]:
    """The file's bytes (what gRPC takes) and what `parse` makes of them, or one SettingsError line."""
    try:
        data = Path(path).read_bytes()
        return data, parse(data)
    except (OSError, ValueError, TypeError) as error:
        raise SettingsError(f"{variable}: {path} is not a usable PEM file ({error})") from None
