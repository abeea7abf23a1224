"""The server's TLS credentials from the configured PEM files, checked at start: one
SettingsError line for a file that can't be used, rather than a failed bind or a server every
TLS client fails on; read again when they change, checked the same way."""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from twofactor_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)
Parsed = TypeVar("Parsed")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, checked up front (the key is the
    certificate's, the certificate is valid now); None for plaintext. The files are read again
    when they change (TlsFiles), so a renewed certificate needs no restart."""
    if not (settings.tls_cert_file or settings.tls_key_file):
        if settings.tls_client_ca_file:  # client certificates need TLS: never plaintext instead
            raise SettingsError(
                "TWOFACTOR_TLS_CLIENT_CA_FILE needs TWOFACTOR_TLS_CERT_FILE and TWOFACTOR_TLS_KEY_FILE "
                "(client certificates are checked over TLS only)"
            )
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise SettingsError("TWOFACTOR_TLS_CERT_FILE and TWOFACTOR_TLS_KEY_FILE go together")
    files = TlsFiles(settings)
    # Credentials with a fetcher serve one port: a second add_secure_port with them fails.
    return grpc.dynamic_ssl_server_credentials(
        files.load(),
        files.fetch,  # type: ignore[arg-type]  # None for no change, as grpc documents; the stubs lack it
        require_client_authentication=bool(settings.tls_client_ca_file),
    )


class TlsFiles:
    """The PEM files, read at start and again whenever they change: cert-manager, certbot or a
    Kubernetes secret renews them in place, and a server that kept the old certificate would
    fail every handshake once it expired. gRPC asks `fetch` before each new connection; it looks
    at the files at most once a second. A changed set that can't be used (a key that is not the
    new certificate's, a file half written) is logged, and the previous certificate stays."""

    CHECK_SECONDS = 1.0
    RETRY_SECONDS = 60.0  # a refused set is tried again, unchanged, this much later

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._paths = [
            p for p in (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) if p
        ]
        self._loaded: tuple[tuple[int, int, int], ...] = ()  # the files' signature at the last load()
        # A changed set refused, and when: tried again later (a certificate valid from a moment
        # ahead, its issuer's clock ahead of ours, becomes usable without another change).
        self._refused: tuple[tuple[int, int, int], ...] | None = None
        self._refused_at = 0.0
        self._checked_at = time.monotonic()
        self._warned_at = time.monotonic()

    def load(
        self, signature: tuple[tuple[int, int, int], ...] | None = None
    ) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC takes them, checked; SettingsError (one line) when unusable.
        `signature`: the files' as the caller just read it (taken before reading them)."""
        signature = self._signature() if signature is None else signature
        settings = self._settings
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
        self._loaded, self._leaf = signature, chain[0]
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and are usable; None keeps the current one.
        Runs on gRPC's thread before a handshake: it never raises."""
        now = time.monotonic()
        if now - self._checked_at < self.CHECK_SECONDS:
            return None
        self._checked_at = now
        try:
            signature = self._signature()
            if signature == self._loaded or (
                signature == self._refused and now - self._refused_at < self.RETRY_SECONDS
            ):
                if now - self._warned_at > 86_400:  # a server up for weeks says so again, daily
                    self._warned_at = now
                    _warn_if_expiring(self._settings, self._leaf)
                return None
            configuration = self.load(signature)
        except SettingsError as error:
            self._refused, self._refused_at = signature, now
            log.warning(
                "the TLS files changed but can't be used, so the previous certificate stays: %s", error
            )
            return None
        except Exception:  # a bug here must not stop the server from accepting connections
            log.exception("reading the changed TLS files failed; the previous certificate stays")
            return None
        log.info(
            "TLS certificate reloaded from %s, valid until %s UTC",
            self._settings.tls_cert_file,
            f"{self._leaf.not_valid_after_utc:%Y-%m-%d %H:%M}",
        )
        return configuration

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        """Each file's identity and change time (a symlink swapped by Kubernetes is a new inode)."""
        signature = []
        for path in self._paths:
            try:
                status = os.stat(path)
                signature.append((status.st_ino, status.st_size, status.st_mtime_ns))
            except OSError:
                signature.append((-1, -1, -1))  # missing for a moment: load() says so if it lasts
        return tuple(signature)


_CURVES = ("secp256r1", "secp384r1")


def _require_usable_pair(settings: Settings, leaf: x509.Certificate, key: PrivateKeyTypes) -> None:
    """The key is one gRPC's TLS takes and the certificate's, and the certificate is valid now (a
    warning in its last two weeks): otherwise every TLS client fails, and the server alone would
    not say why."""
    # What gRPC's own clients (twofactor health, the SDK, the health checks) can verify: with an
    # Ed25519 or P-521 key the server starts and every one of their handshakes fails.
    if not (
        isinstance(key, rsa.RSAPrivateKey)
        or (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVES)
    ):
        kind = (
            key.curve.name
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else type(key).__name__.removeprefix("_")
        )
        raise SettingsError(
            f"TWOFACTOR_TLS_KEY_FILE: {settings.tls_key_file}: gRPC's clients can't verify a {kind} key; "
            "use an RSA or an ECDSA P-256 or P-384 key"
        )
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
    _warn_if_expiring(settings, leaf)


def _warn_if_expiring(settings: Settings, leaf: x509.Certificate) -> None:
    if leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < datetime.timedelta(days=14):
        log.warning(
            "the TLS certificate in %s expires on %s UTC: renew it (the servers read the new files "
            "within a second, at their next connection)",
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
