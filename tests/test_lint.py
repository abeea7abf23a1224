"""ruff on everything but the generated code, mypy --strict on the server and workers (pyproject.toml
holds the rules; the SDK's own mypy run is tests/clients/test_sdk_mypy.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_finds_nothing() -> None:
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "--no-cache", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_server_and_workers(tmp_path: Path) -> None:
    links = tmp_path / "typecheck"
    links.mkdir()
    (links / "twofactor_server").symlink_to(ROOT / "server")
    (links / "twofactor_workers").symlink_to(ROOT / "workers")
    result = subprocess.run(
        [str(BIN / "mypy"), "--strict", "-p", "twofactor_server", "-p", "twofactor_workers"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"MYPYPATH": str(links), "PATH": str(BIN), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
