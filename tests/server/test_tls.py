"""TLS and mutual TLS against a test certificate authority made in a fixture."""

from __future__ import annotations

import datetime
import os
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc

from tests.conftest import APP_TOKEN, Harness, ServerFactory
from tests.pki import Issued, issue, make_ca, write_self_signed
from tests.server.helpers import wait_until
from twofactor_server import app
from twofactor_server.settings import SettingsError
from twofactor_server.storage.database import Database, PostgresDatabase, SqliteDatabase, open_database
from twofactor_server.tls import TlsFiles

TIMEOUT = 10.0
METADATA = (("authorization", f"Bearer {APP_TOKEN}"),)


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    rogue_ca: Issued
    rogue_client: Issued  # signed by a CA the server does not trust
    files: dict[str, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = make_ca("twofactor test CA")
    rogue_ca = make_ca("some other CA")
    server = issue(ca, "twofactor server", server=True)
    client = issue(ca, "backend", server=False)
    rogue_client = issue(rogue_ca, "intruder", server=False)
    folder = tmp_path_factory.mktemp("pki")
    files: dict[str, str] = {}
    for name, data in {
        "ca.pem": ca.cert_pem,
        "server.pem": server.cert_pem,
        "server.key": server.key_pem,
    }.items():
        path: Path = folder / name
        path.write_bytes(data)
        files[name] = str(path)
    return Pki(ca, server, client, rogue_ca, rogue_client, files)


def get_status(target: str, credentials: grpc.ChannelCredentials, **options: str) -> pb.GetStatusResponse:
    """GetStatus over a new connection of its own (no connection shared with another channel)."""
    channel_options: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]
    if "name" in options:
        channel_options.append(("grpc.ssl_target_name_override", options["name"]))
    with grpc.secure_channel(target, credentials, options=channel_options) as channel:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        return stub.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=METADATA, timeout=TIMEOUT)


def refused(target: str, credentials: grpc.ChannelCredentials) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        get_status(target, credentials)
    return raised.value


def test_tls_handshake_against_the_configured_certificate(start_server: ServerFactory, pki: Pki) -> None:
    h = start_server(tls_cert_file=pki.files["server.pem"], tls_key_file=pki.files["server.key"])
    trusting = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    for target in (f"127.0.0.1:{h.port}", f"localhost:{h.port}"):
        assert list(get_status(target, trusting).allowed_methods)

    # A client that trusts another CA does not get through, nor does one speaking plaintext.
    other = grpc.ssl_channel_credentials(root_certificates=pki.rogue_ca.cert_pem)
    assert refused(h.target, other).code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as plaintext:
        h.twofactor.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=METADATA, timeout=TIMEOUT)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    # Without client verification configured, a client certificate is not needed.
    assert get_status(h.target, trusting).allowed_methods


def test_mtls_accepts_only_clients_with_a_certificate_from_the_ca(
    start_server: ServerFactory, pki: Pki
) -> None:
    h = start_server(
        tls_cert_file=pki.files["server.pem"],
        tls_key_file=pki.files["server.key"],
        tls_client_ca_file=pki.files["ca.pem"],
    )
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    assert refused(h.target, without_cert).code() == grpc.StatusCode.UNAVAILABLE

    rogue = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=pki.rogue_client.key_pem,
        certificate_chain=pki.rogue_client.cert_pem,
    )
    assert refused(h.target, rogue).code() == grpc.StatusCode.UNAVAILABLE

    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=pki.client.key_pem,
        certificate_chain=pki.client.cert_pem,
    )
    assert list(get_status(h.target, with_cert).allowed_methods)
    # The certificate authenticates the connection; the call still needs its token.
    with grpc.secure_channel(h.target, with_cert) as channel:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as no_token:
            stub.GetStatus(pb.GetStatusRequest(user_id="alice"), timeout=TIMEOUT)
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def opened_databases(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Database]]:
    """Every database create_server opens, closed at teardown so a failed start leaks nothing."""
    opened: list[Database] = []

    def recording_open(*args: Any, **kwargs: Any) -> Database:
        db = open_database(*args, **kwargs)
        opened.append(db)
        return db

    monkeypatch.setattr(app, "open_database", recording_open)
    yield opened
    for db in opened:
        db.close()


def is_closed(db: Database) -> bool:
    if isinstance(db, PostgresDatabase):
        return bool(db._pool.closed)
    assert isinstance(db, SqliteDatabase)
    try:
        db._conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_a_certificate_without_its_key_is_a_settings_error(
    start_server: ServerFactory, pki: Pki, opened_databases: list[Database]
) -> None:
    with pytest.raises(SettingsError, match="go together"):
        start_server(tls_cert_file=pki.files["server.pem"])
    with pytest.raises(SettingsError, match="go together"):
        start_server(tls_key_file=pki.files["server.key"])


@pytest.mark.parametrize("problem", ["port in use", "certificate without key"])
def test_a_server_that_fails_to_start_closes_its_database(
    start_server: ServerFactory, pki: Pki, opened_databases: list[Database], problem: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SettingsError):
            if problem == "port in use":
                start_server(listen=f"127.0.0.1:{taken.getsockname()[1]}")
            else:
                start_server(tls_cert_file=pki.files["server.pem"])
    assert all(is_closed(db) for db in opened_databases), "the database is left open"


@pytest.mark.parametrize("problem", ["missing file", "not PEM"])
def test_unusable_tls_files_are_a_settings_error(
    start_server: ServerFactory, tmp_path: Path, problem: str, opened_databases: list[Database]
) -> None:
    path = tmp_path / "server.pem"
    if problem == "not PEM":
        path.write_text("not a certificate")
    with pytest.raises(SettingsError, match="TWOFACTOR_TLS_"):
        start_server(tls_cert_file=str(path), tls_key_file=str(path))


def test_a_client_ca_alone_is_a_settings_error_not_plaintext(start_server: ServerFactory, pki: Pki) -> None:
    """Client certificates are checked over TLS only: a client CA without the server's own
    certificate and key served plaintext, with no client check, and said nothing."""
    with pytest.raises(SettingsError, match="TWOFACTOR_TLS_CLIENT_CA_FILE needs TWOFACTOR_TLS_CERT_FILE"):
        start_server(tls_client_ca_file=pki.files["ca.pem"])


@pytest.mark.parametrize("problem", ["the key of another certificate", "expired", "not valid yet"])
def test_a_certificate_its_clients_would_refuse_is_a_settings_error(
    start_server: ServerFactory, pki: Pki, tmp_path: Path, problem: str
) -> None:
    """Refused at start in one line naming the file, rather than a bind error (a key that is
    not the certificate's) or a server every TLS client fails on (outside its validity)."""
    day = datetime.timedelta(days=1)
    if problem == "the key of another certificate":
        cert, key = pki.server.cert_pem, pki.client.key_pem
        expected = "TWOFACTOR_TLS_KEY_FILE: .* is not the key of the certificate"
    else:
        valid = (-2 * day, -day) if problem == "expired" else (day, 2 * day)
        other = issue(pki.ca, "twofactor server", server=True, valid=valid)
        cert, key = other.cert_pem, other.key_pem
        expected = "TWOFACTOR_TLS_CERT_FILE: the certificate in .* is valid from .* not now: renew it"
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "cert.key").write_bytes(key)
    with pytest.raises(SettingsError, match=expected):
        start_server(tls_cert_file=str(tmp_path / "cert.pem"), tls_key_file=str(tmp_path / "cert.key"))


def test_plaintext_is_the_default(harness: Harness) -> None:
    assert harness.twofactor.GetStatus(
        pb.GetStatusRequest(user_id="alice"), metadata=METADATA, timeout=TIMEOUT
    )


def renewable_files(folder: Path, issued: Issued) -> dict[str, str]:
    """The server's certificate and key, written as a renewal writes them: each file replaced whole."""
    for name, data in (("server.key", issued.key_pem), ("server.pem", issued.cert_pem)):
        (folder / f"{name}.new").write_bytes(data)
        os.replace(folder / f"{name}.new", folder / name)
    return {"tls_cert_file": str(folder / "server.pem"), "tls_key_file": str(folder / "server.key")}


def fresh_call(target: str, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    """get_status's outcome as a status code."""
    try:
        get_status(target, credentials)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def served_soon(target: str, credentials: grpc.ChannelCredentials, what: str) -> None:
    """New connections with `credentials` get through within the bound (the server looks at its
    files at most once a second)."""
    wait_until(lambda: fresh_call(target, credentials) is grpc.StatusCode.OK, what, bound=20.0, interval=0.2)


def test_a_renewed_certificate_is_served_without_a_restart(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """cert-manager or certbot replaces the files in place: new connections get the new
    certificate within seconds; connections opened before keep theirs."""
    first_ca, next_ca = make_ca("first CA"), make_ca("next CA")
    h = start_server(**renewable_files(tmp_path, issue(first_ca, "twofactor server", server=True)))
    first = grpc.ssl_channel_credentials(root_certificates=first_ca.cert_pem)
    following = grpc.ssl_channel_credentials(root_certificates=next_ca.cert_pem)
    assert fresh_call(h.target, first) is grpc.StatusCode.OK
    assert fresh_call(h.target, following) is grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(h.target, first, options=[("grpc.use_local_subchannel_pool", 1)]) as kept:
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(kept)
        stub.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=METADATA, timeout=TIMEOUT)

        renewable_files(tmp_path, issue(next_ca, "twofactor server", server=True))
        served_soon(h.target, following, "the new certificate served")
        assert fresh_call(h.target, first) is grpc.StatusCode.UNAVAILABLE
        assert stub.GetStatus(pb.GetStatusRequest(user_id="alice"), metadata=METADATA, timeout=TIMEOUT)


def test_a_renewal_that_cannot_be_used_keeps_the_previous_certificate(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new certificate whose key has not arrived yet (or is not its own) is refused with one
    warning line, and the server goes on with the previous pair until the set is right."""
    first_ca, next_ca = make_ca("first CA"), make_ca("next CA")
    h = start_server(**renewable_files(tmp_path, issue(first_ca, "twofactor server", server=True)))
    first = grpc.ssl_channel_credentials(root_certificates=first_ca.cert_pem)
    following = grpc.ssl_channel_credentials(root_certificates=next_ca.cert_pem)
    renewed = issue(next_ca, "twofactor server", server=True)
    (tmp_path / "server.pem").write_bytes(renewed.cert_pem)  # its key still the old one

    def refused_and_said() -> bool:
        assert fresh_call(h.target, first) is grpc.StatusCode.OK  # the previous pair, still served
        return any("the TLS files changed but can't be used" in r.getMessage() for r in caplog.records)

    wait_until(refused_and_said, "a warning that the changed files can't be used", bound=20.0, interval=0.2)
    warning = next(r.getMessage() for r in caplog.records if "can't be used" in r.getMessage())
    assert "is not the key of the certificate" in warning and "\n" not in warning
    assert fresh_call(h.target, following) is grpc.StatusCode.UNAVAILABLE

    renewable_files(tmp_path, renewed)  # the key arrives
    served_soon(h.target, following, "the completed set served")


def test_a_renewal_valid_from_a_moment_ahead_is_served_once_valid(
    start_server: ServerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its issuer's clock a few seconds ahead of ours: refused while not yet valid, then served
    without another change to the files (the refused set is tried again; 1 minute, 1 s here)."""
    monkeypatch.setattr(TlsFiles, "RETRY_SECONDS", 1.0)
    first_ca, next_ca = make_ca("first CA"), make_ca("next CA")
    h = start_server(**renewable_files(tmp_path, issue(first_ca, "twofactor server", server=True)))
    following = grpc.ssl_channel_credentials(root_certificates=next_ca.cert_pem)
    ahead = datetime.timedelta(seconds=8)  # the server looks within about 1 s: well inside it
    renewable_files(
        tmp_path, issue(next_ca, "twofactor server", server=True, valid=(ahead, datetime.timedelta(days=1)))
    )
    wait_until(
        lambda: (
            fresh_call(h.target, following) is grpc.StatusCode.UNAVAILABLE
            and any("not now" in r.getMessage() for r in caplog.records)
        ),
        "the renewal refused while not yet valid",
        bound=20.0,
        interval=0.2,
    )
    served_soon(h.target, following, "the renewal served once valid")


REFUSED_KEYS = {
    "Ed448PrivateKey": (ed448.Ed448PrivateKey.generate, None),
    "Ed25519PrivateKey": (ed25519.Ed25519PrivateKey.generate, None),
    "secp521r1": (lambda: ec.generate_private_key(ec.SECP521R1()), hashes.SHA512()),
    "secp256k1": (lambda: ec.generate_private_key(ec.SECP256K1()), hashes.SHA256()),
}


@pytest.mark.parametrize("kind", REFUSED_KEYS)
def test_a_key_grpcs_clients_cant_verify_is_a_settings_error(
    start_server: ServerFactory, tmp_path: Path, kind: str
) -> None:
    """Each pair passes the key-and-certificate check, but gRPC's own clients (`twofactor
    health`, the SDK) can't verify it, or gRPC can't serve it: every handshake of theirs would
    fail (NO_COMMON_SIGNATURE_ALGORITHMS). Refused at start, and a renewal to one would keep the
    previous pair."""
    make_key, algorithm = REFUSED_KEYS[kind]
    cert, key = write_self_signed(tmp_path, make_key(), algorithm)
    with pytest.raises(
        SettingsError, match=rf"gRPC's clients can't verify a {kind} key; use an RSA or an ECDSA"
    ):
        start_server(tls_cert_file=cert, tls_key_file=key)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["P-256", "P-384"])
def test_an_ecdsa_key_grpcs_clients_verify_is_served(
    start_server: ServerFactory, tmp_path: Path, curve: Any
) -> None:
    cert, key = write_self_signed(tmp_path, ec.generate_private_key(curve), hashes.SHA256())
    h = start_server(tls_cert_file=cert, tls_key_file=key)
    trusting = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
    with grpc.secure_channel(f"localhost:{h.port}", trusting) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
