"""docker-compose.yml validates, runs migrations once before the server and workers, relays email
through Mailpit, takes its passwords from .env, and checks the health of every long-running service."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "POSTGRES_PASSWORD": "pg-secret-1",
    "REDIS_PASSWORD": "redis-secret-2",
    "TWOFACTOR_KEYS": "k",
    "TWOFACTOR_TOKENS": "t",
}


def compose(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        if IN_CI:
            pytest.fail("docker-compose is not installed (.ci/run installs it)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k not in ENV and not k.startswith("TWOFACTOR_")}
    return subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def services(*profiles: str) -> dict[str, Any]:
    result = compose(*(f"--profile={p}" for p in profiles), "config")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout)["services"])


def test_the_compose_file_validates_and_lists_migrate_and_mailpit() -> None:
    result = compose("config", "--services")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= {"postgres", "redis", "mailpit", "migrate", "server", "worker"}
    # Prometheus is optional: only with `--profile monitoring`.
    assert services("monitoring")["prometheus"]["profiles"] == ["monitoring"]


def test_migrate_runs_once_before_the_server_and_workers() -> None:
    found = services()
    assert found["migrate"]["command"] == ["twofactor", "migrate"]
    for name in ("server", "worker"):
        assert found[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert found[name]["environment"]["TWOFACTOR_MIGRATE_ON_START"] == "false"


def test_email_goes_to_mailpit_and_passwords_come_from_env() -> None:
    found = services()
    assert found["mailpit"]["image"].startswith("axllent/mailpit")
    server = found["server"]["environment"]
    assert server["TWOFACTOR_EMAIL_PROVIDER"] == "smtp" and server["TWOFACTOR_SMTP_HOST"] == "mailpit"
    assert (
        "pg-secret-1" in server["TWOFACTOR_DATABASE_URL"]
        and "redis-secret-2" in server["TWOFACTOR_BROKER_URL"]
    )
    text = (ROOT / "docker-compose.yml").read_text()
    assert "pg-secret-1" not in text and "redis-secret-2" not in text
    missing = compose("config", env={k: v for k, v in ENV.items() if k != "POSTGRES_PASSWORD"})
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


def test_every_long_running_service_has_a_healthcheck() -> None:
    found = services("monitoring")
    long_running = {name for name, service in found.items() if service.get("restart") != "no"}
    assert long_running == {"postgres", "redis", "mailpit", "server", "worker", "prometheus"}
    # Each comes back after a crash (a worker killed for memory) or a reboot; migrate runs once.
    assert {name: found[name].get("restart") for name in long_running} == dict.fromkeys(
        long_running, "unless-stopped"
    )
    assert {name for name in long_running if "healthcheck" not in found[name]} == set()
    assert found["server"]["healthcheck"]["test"][:3] == ["CMD", "twofactor", "health"]
    assert found["worker"]["healthcheck"]["test"][:3] == ["CMD", "twofactor", "worker-health"]


def test_env_example_makes_its_keys_and_tokens_with_the_image_alone() -> None:
    """docker-compose refuses every command while TWOFACTOR_KEYS is empty, as .env.example ships
    it, so the bootstrap commands it names must not go through docker-compose; each runs, and
    what they print makes a .env docker-compose takes."""
    from tests.server.test_cli import TWOFACTOR

    text = (ROOT / ".env.example").read_text()
    shipped = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    refused = compose("config", env=shipped)
    assert refused.returncode != 0 and "TWOFACTOR_KEYS" in refused.stderr
    assert "docker-compose run" not in text
    commands = re.findall(r"`docker run --rm (\S+) (twofactor [^`]+)`", text)
    assert [command for _, command in commands] == [
        "twofactor keygen",
        "twofactor token backend app",
        "twofactor token operator admin",
    ]
    assert {image for image, _ in commands} == {services()["server"]["image"]}
    printed = [
        subprocess.run(
            [TWOFACTOR, *command.split()[1:]], capture_output=True, text=True, timeout=60, check=True
        )
        for _, command in commands
    ]
    keys = printed[0].stdout.strip()
    entries = [
        line.split(": ", 1)[1] for run in printed[1:] for line in run.stdout.splitlines() if "entry" in line
    ]
    filled = {**shipped, "TWOFACTOR_KEYS": keys, "TWOFACTOR_TOKENS": ",".join(entries)}
    assert compose("config", env=filled).returncode == 0
