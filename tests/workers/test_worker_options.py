"""`twofactor worker ... -- OPTIONS` hands OPTIONS to `celery worker`."""

from __future__ import annotations

import dataclasses
import signal
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
