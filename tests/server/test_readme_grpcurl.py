"""The README's grpcurl block, run as it stands (the real grpcurl binary, `twofactor code`), against a
test server on the real clock: the README can't drift from the service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, base_settings
from twofactor_server.app import create_server

ROOT = Path(__file__).resolve().parents[2]


def readme_grpcurl_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The same with `grpcurl`") :]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.fixture
def live_target(tmp_path: Path) -> Iterator[str]:
    """A server on the embedded default and the real clock, as `make serve` runs it."""
    server, port = create_server(base_settings(tmp_path))
    server.start()
    try:
        yield f"localhost:{port}"
    finally:
        server.stop(grace=None)


def test_the_readme_grpcurl_block_runs_as_written(live_target: str, tmp_path: Path) -> None:
    block = readme_grpcurl_block()
    assert "APP=dev-app-…" in block and "ADMIN=dev-admin-…" in block and "localhost:50051" in block
    script = (
        block.replace("APP=dev-app-…", f"APP={APP_TOKEN}")
        .replace("ADMIN=dev-admin-…", f"ADMIN={ADMIN_TOKEN}")
        .replace("localhost:50051", live_target)
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "twofactor.v1.TwoFactorService" in out and "rpc Verify (" in out
    assert re.search(r'"confirmed": true', out), out
    # The one image the block asks for (grpcurl writes "<" as \u003c).
    assert re.search(r'"qr_svg": "(<|\\u003c)svg', out) and '"qr_png"' not in out, out
    assert '"VERIFY_RESULT_ACCEPTED"' in out
    assert '"action": "user_reset"' in out
