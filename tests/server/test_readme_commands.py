"""The README's "Running it for real" commands print what the README says they print."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))


def readme_block() -> dict[str, str]:
    """Each command of the block, with the comment the README gives it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running it for real") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    commands = {}
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        commands[command.strip()] = comment.strip()
    return commands


def run(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env["TWOFACTOR_DATA_DIR"] = str(data_dir)
    return subprocess.run([TWOFACTOR, *args], capture_output=True, text=True, timeout=120, env=env)


def test_keygen_token_and_migrate_print_what_the_readme_says(tmp_path: Path) -> None:
    commands = readme_block()
    assert commands["twofactor keygen"].startswith("-> 1:…")
    keygen = run("keygen", data_dir=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    entry = keygen.stdout.strip()
    version, _, key = entry.partition(":")
    assert version == "1" and len(base64.b64decode(key, validate=True)) == 32
    assert "TWOFACTOR_KEYS" in keygen.stderr  # how to append it, in words

    assert "TWOFACTOR_TOKENS entry" in commands["twofactor token login-backend app"]
    token = run("token", "login-backend", "app", data_dir=tmp_path)
    assert token.returncode == 0, token.stderr
    value = re.search(r"^token: (\S+)$", token.stdout, re.M).group(1)  # type: ignore[union-attr]
    digest = hashlib.sha256(value.encode()).hexdigest()
    assert f"TWOFACTOR_TOKENS entry: login-backend:app:{digest}" in token.stdout

    assert "twofactor migrate" in commands
    first = run("migrate", data_dir=tmp_path / "data")
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"applied: 0001_initial(, \d{4}_\w+)+", first.stdout.strip()), first.stdout
    again = run("migrate", data_dir=tmp_path / "data")
    assert again.stdout.strip() == "applied: nothing, already up to date"
