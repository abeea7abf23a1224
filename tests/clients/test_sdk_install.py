"""`pip install clients/python` gives a working SDK that depends on nothing of the server.

One fresh virtual environment per module, with pip's configured indexes (the
machine's package mirror); the SDK is installed from a copy of clients/python
so the build leaves nothing behind in the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, Harness

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "clients" / "python"
# Only what the SDK needs may be installed beside it (typing-extensions comes with grpcio).
ALLOWED_DISTRIBUTIONS = {"twofactor-client", "grpcio", "protobuf", "typing-extensions", "pip", "setuptools"}


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("sdk-install")
    source = base / "source"
    build_leftovers = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".mypy_cache")
    shutil.copytree(SDK, source, ignore=build_leftovers)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=clean_env(),
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield python


def clean_env() -> dict[str, str]:
    """The environment without anything that would put the repository on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run_in_venv(python: Path, script: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", textwrap.dedent(script), *args],
        cwd=cwd,  # not the repository: `server` must not be importable from the working directory
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=clean_env(),
    )


@pytest.mark.timeout(900)
def test_sdk_imports_without_server_dependencies(venv_python: Path, tmp_path: Path) -> None:
    result = run_in_venv(
        venv_python,
        """
        import importlib.metadata, importlib.util, json, pathlib
        import twofactor
        from twofactor import AdminClient, AsyncAdminClient, AsyncTwoFactorClient, TwoFactorClient
        from twofactor.v1 import admin_service_pb2_grpc, twofactor_service_pb2_grpc

        package = pathlib.Path(twofactor.__file__).parent
        print(json.dumps({
            "file": twofactor.__file__,
            "typed": (package / "py.typed").is_file(),
            "stubs": sorted(p.name for p in (package / "v1").glob("*.pyi")),
            "requires": importlib.metadata.requires("twofactor-client"),
            "installed": sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions()),
            "absent": {
                name: importlib.util.find_spec(name) is None
                for name in ("server", "workers", "grpc_status", "psycopg", "celery", "pyotp", "zxingcpp")
            },
            "googleapis": importlib.util.find_spec("google.rpc") is None,
        }))
        """,
        tmp_path,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "site-packages" in report["file"]
    assert not report["file"].startswith(str(ROOT))
    assert report["typed"]
    assert report["stubs"] == [
        "admin_service_pb2.pyi",
        "admin_service_pb2_grpc.pyi",
        "common_pb2.pyi",
        "common_pb2_grpc.pyi",
        "twofactor_service_pb2.pyi",
        "twofactor_service_pb2_grpc.pyi",
    ]
    assert sorted(report["requires"]) == ["grpcio>=1.85.1", "protobuf>=7.35"]
    assert set(report["installed"]) <= ALLOWED_DISTRIBUTIONS | {"typing_extensions"}, report["installed"]
    assert all(report["absent"].values()), report["absent"]
    assert report["googleapis"], "googleapis-common-protos must not be installed with the SDK"


@pytest.fixture
def backend() -> str:
    """The SDK's behaviour doesn't depend on the storage backend; one is enough here."""
    return "sqlite"


@pytest.mark.timeout(900)
def test_installed_sdk_calls_a_running_server(venv_python: Path, harness: Harness, tmp_path: Path) -> None:
    result = run_in_venv(
        venv_python,
        """
        import json, sys
        import twofactor

        target, app_token, admin_token = sys.argv[1:4]
        out = {}
        with twofactor.TwoFactorClient(target, token=app_token) as client:
            out["masked_email"] = client.set_contact(user_id="alice", email="alice@example.com").masked_email
            status = client.get_status(user_id="alice")
            out["email_registered"] = status.email_registered
            try:
                client.start_enrollment(user_id="alice", method=twofactor.Method.METHOD_SMS)
            except twofactor.ContactMissing as error:
                out["contact_missing"] = [error.reason, error.domain, error.contact]
        with twofactor.AdminClient(target, token=admin_token) as admin:
            out["user"] = admin.get_user(user_id="alice").user.user_id
        with twofactor.TwoFactorClient(target, token="not-a-valid-token") as client:
            try:
                client.get_status(user_id="alice")
            except twofactor.Unauthenticated as error:
                out["unauthenticated"] = error.reason
        print(json.dumps(out))
        """,
        tmp_path,
        harness.target,
        APP_TOKEN,
        ADMIN_TOKEN,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "masked_email": "a***@example.com",
        "email_registered": True,
        "contact_missing": ["CONTACT_MISSING", "twofactor.v1", "phone"],
        "user": "alice",
        "unauthenticated": "INVALID_TOKEN",
    }
