"""`twofactor worker ... -- OPTIONS` hands OPTIONS to `celery worker`."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.conftest import REDIS_URL, ServerFactory
from tests.smtp_sink import SmtpSink
from tests.workers.celery_harness import TWOFACTOR, celery_server, worker_env
from twofactor_server.settings import Settings
from twofactor_workers.celery_app import create_celery


def prefetch_count(options: list[str], env: dict[str, str], queue: str, log: Path) -> int:
    """The prefetch count a worker started with `-- options` reports (Celery's inspect stats)."""
    name = f"options-{uuid.uuid4().hex[:8]}@localhost"  # unique: other workers may share this broker
    app = create_celery(dataclasses.replace(Settings(), broker_url=REDIS_URL, delivery_queue=queue))
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [TWOFACTOR, "worker", "--concurrency", "2", "--hostname", name, "--", *options],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while True:  # the worker answers once it has started
            stats = app.control.inspect(destination=[name], timeout=2).stats() or {}
            if name in stats:
                return int(stats[name]["prefetch_count"])
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)


def test_celery_options_after_the_double_dash(
    start_server: ServerFactory, sink: SmtpSink, queue: str, tmp_path: Path
) -> None:
    env = worker_env(celery_server(start_server, sink, queue))
    assert prefetch_count([], env, queue, tmp_path / "default.log") == 2  # 2 processes x multiplier 1
    assert prefetch_count(["--prefetch-multiplier", "3"], env, queue, tmp_path / "three.log") == 6


def run_worker(options: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWOFACTOR, "worker", "--concurrency", "1", "--", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_mistyped_celery_option_is_one_message_and_exit_2(
    start_server: ServerFactory, sink: SmtpSink, queue: str
) -> None:
    env = worker_env(celery_server(start_server, sink, queue))
    result = run_worker(["--prefetch-multiplier", "many"], env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "Invalid value for '--prefetch-multiplier'" in result.stderr
    result = run_worker(["--bogus-option"], env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "No such option '--bogus-option'" in result.stderr
    assert "Try 'celery worker --help' for help." in result.stderr  # where the options are listed


def test_a_worker_that_celery_could_not_start_exits_with_its_failure(
    start_server: ServerFactory, sink: SmtpSink, queue: str, tmp_path: Path
) -> None:
    env = worker_env(celery_server(start_server, sink, queue))
    pidfile = tmp_path / "worker.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live process holds it: Celery refuses to start
    result = run_worker([f"--pidfile={pidfile}"], env)
    assert "already exists" in result.stdout + result.stderr
    assert result.returncode not in (0, None), result.stderr  # a service manager restarts it


def test_a_worker_refused_at_start_leaves_no_metrics_directory(
    start_server: ServerFactory, sink: SmtpSink, queue: str, tmp_path: Path
) -> None:
    env = worker_env(celery_server(start_server, sink, queue))
    with socket.create_server(("127.0.0.1", 0)) as taken:  # the metrics port another program holds
        env.update(TWOFACTOR_METRICS_LISTEN=f"127.0.0.1:{taken.getsockname()[1]}", TMPDIR=str(tmp_path))
        result = run_worker([], env)
    assert result.returncode == 2, result.stderr
    port = env["TWOFACTOR_METRICS_LISTEN"].rpartition(":")[2]
    assert (
        f"twofactor: configuration error: TWOFACTOR_METRICS_LISTEN: port {port} is already in "
        "use: each server or worker on a host needs a port of its own"
    ) in result.stderr.splitlines()
    assert list(tmp_path.glob("twofactor-metrics-*")) == []
