"""`twofactor health` against a TLS server, and one that requires client certificates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import ServerFactory
from tests.pki import issue, make_ca, write_self_signed

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    ca = make_ca("probe test CA")
    server = issue(ca, "twofactor server", server=True)
    client = issue(ca, "probe", server=False)
    written = {}
    for name, data in {
        "ca.pem": ca.cert_pem,
        "server.pem": server.cert_pem,
        "server.key": server.key_pem,
        "client.pem": client.cert_pem,
        "client.key": client.key_pem,
    }.items():
        (tmp_path / name).write_bytes(data)
        written[name] = str(tmp_path / name)
    return written


def probe(port: int, files: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update(
        {
            "TWOFACTOR_LISTEN": f"0.0.0.0:{port}",
            "TWOFACTOR_TLS_CERT_FILE": files["server.pem"],
            "TWOFACTOR_TLS_KEY_FILE": files["server.key"],
        }
    )
    return subprocess.run(
        [TWOFACTOR, "health", "--ca-file", files["ca.pem"], "--timeout", "5", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_health_speaks_tls_with_the_servers_settings(
    start_server: ServerFactory, files: dict[str, str]
) -> None:
    h = start_server(tls_cert_file=files["server.pem"], tls_key_file=files["server.key"])
    answered = probe(h.port, files)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.endswith('"": SERVING\n')


def test_health_presents_a_client_certificate_when_the_server_requires_one(
    start_server: ServerFactory, files: dict[str, str]
) -> None:
    h = start_server(
        tls_cert_file=files["server.pem"],
        tls_key_file=files["server.key"],
        tls_client_ca_file=files["ca.pem"],
    )
    without = probe(h.port, files)
    assert without.returncode == 1 and "UNAVAILABLE" in without.stderr
    answered = probe(h.port, files, "--cert", files["client.pem"], "--key", files["client.key"])
    assert answered.returncode == 0, answered.stderr


def test_a_client_certificate_without_tls_is_a_configuration_error(
    start_server: ServerFactory, files: dict[str, str]
) -> None:
    """--cert and --key against a plaintext server were ignored: the probe said SERVING for a
    check that would fail the day TLS is on."""
    h = start_server()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    result = subprocess.run(
        [
            TWOFACTOR,
            "health",
            "--target",
            h.target,
            "--cert",
            files["client.pem"],
            "--key",
            files["client.key"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--cert and --key need TLS" in result.stderr


def test_health_verifies_a_certificate_that_names_its_host_in_the_common_name_only(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """`openssl req -x509 -subj /CN=twofactor.internal` makes no subjectAltName: gRPC's clients
    verify the name against the common name then, and so does the probe (it failed every time)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert, key_file = write_self_signed(
        tmp_path, key, hashes.SHA256(), common_name="twofactor.internal", dns_names=(), days=30
    )
    files = {"ca.pem": cert, "server.pem": cert, "server.key": key_file}
    h = start_server(tls_cert_file=files["server.pem"], tls_key_file=files["server.key"])
    result = probe(h.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
