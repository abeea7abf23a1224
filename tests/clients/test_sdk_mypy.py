"""The SDK type-checks under mypy --strict, and so does code that uses it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDK_SRC = ROOT / "clients" / "python" / "src"


def mypy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(SDK_SRC)}
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_sdk_passes_mypy_strict() -> None:
    result = mypy(str(SDK_SRC / "twofactor"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_callers_get_real_types(tmp_path: Path) -> None:
    """Responses are typed messages and keyword arguments are checked."""
    (tmp_path / "caller.py").write_text(
        textwrap.dedent(
            """
            import twofactor

            def login(client: twofactor.TwoFactorClient) -> bool:
                status = client.get_status(user_id="alice")
                methods: list[twofactor.Method.ValueType] = list(status.enabled_methods)
                result = client.verify(user_id="alice", code="123456", timeout=2.0)
                return bool(methods) and result.result == twofactor.VerifyResult.VERIFY_RESULT_ACCEPTED

            async def login_async(client: twofactor.AsyncTwoFactorClient) -> int:
                sent = await client.send_code(user_id="a", method=twofactor.Method.METHOD_SMS)
                return sent.challenge.delivery_attempts

            def rate(error: twofactor.RateLimited) -> float | None:
                return None if error.retry_after is None else error.retry_after.total_seconds()

            def wrong(client: twofactor.TwoFactorClient) -> str:
                client.get_status(user_id=1)
                client.verify(user="alice", code="1")
                return client.get_status(user_id="a").enabled_methods
            """
        )
    )

    result = mypy("caller.py", cwd=tmp_path)

    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    # Exactly the three mistakes in wrong(); everything above it checks clean.
    assert [line.rsplit("[", 1)[-1] for line in errors] == ["arg-type]", "call-arg]", "return-value]"], (
        result.stdout
    )
    assert '"user_id" to "get_status"' in errors[0]
