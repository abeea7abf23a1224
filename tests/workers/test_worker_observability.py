"""A real `twofactor worker` (Celery prefork) serves /metrics that add up its pool processes,
and writes JSON log lines that carry the challenge id of the task they belong to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis
from prometheus_client.parser import text_string_to_metric_families
from twofactor.v1 import common_pb2

from tests.conftest import Harness, ServerFactory
from tests.smtp_sink import SmtpSink, code_in, free_port
from tests.workers.celery_harness import (
    TWOFACTOR,
    Workers,
    celery_server,
    private_redis,
    start_email_enrollment,
    wait_for_status,
    worker_env,
)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_worker_metrics_and_json_logs_with_the_challenge_id(
    start_server: ServerFactory,
    sink: SmtpSink,
    queue: str,
    workers_for: Callable[[Harness], Workers],
) -> None:
    h = celery_server(start_server, sink, queue)
    workers = workers_for(h)
    port = free_port()
    workers.env.update(
        {
            "TWOFACTOR_METRICS_LISTEN": f"127.0.0.1:{port}",
            "TWOFACTOR_LOG_FORMAT": "json",
            "TWOFACTOR_RETENTION_INTERVAL_SECONDS": "0.2",
        }
    )
    with psycopg.connect(h.settings.database_url) as conn:  # an audit event from 1970: past any retention
        conn.execute(
            "INSERT INTO audit_events (at, actor, user_id, action, request_id, outcome, detail) "
            "VALUES (0, 'test', 'ancient', 'contact_changed', 'r', 'success', '')"
        )
    workers.start(concurrency=2)

    challenges = [start_email_enrollment(h, f"wo{n}") for n in range(3)]
    for n, challenge in enumerate(challenges):
        wait_for_status(h, f"wo{n}", challenge.challenge_id, common_pb2.DELIVERY_STATUS_SENT)

    sent = (
        "twofactor_deliveries_total",
        frozenset({"method": "email", "provider": "smtp", "outcome": "sent"}.items()),
    )
    deadline = time.monotonic() + 60
    while True:  # the endpoint comes up with the worker; the counts follow the deliveries
        try:
            samples = scrape(port)
        except OSError:
            samples = {}
        if samples.get(sent) == 3:
            break
        assert time.monotonic() < deadline, f"worker metrics never showed 3 deliveries: {samples.get(sent)}"
        time.sleep(0.1)
    assert samples[("twofactor_delivery_seconds_count", frozenset())] == 3
    # The server's own gauges: a worker never sets them, so it exports no sample of them (a 0
    # there fired "storage unavailable" for every healthy worker).
    assert not {name for name, _ in samples} & {"twofactor_storage_up", "twofactor_broker_up"}

    with psycopg.connect(h.settings.database_url) as conn:  # the worker's retention job deletes it
        while conn.execute("SELECT count(*) FROM audit_events WHERE user_id = 'ancient'").fetchone() != (0,):
            assert time.monotonic() < deadline, "the worker's retention job never ran"
            time.sleep(0.1)
    workers.stop()
    # Celery's signal handler prints its one "worker: Warm shutdown" notice itself, not as a log record.
    lines = [line for line in workers.logs().splitlines() if line.strip() and not line.startswith("worker: ")]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not_json == []
    records = [json.loads(line) for line in lines]  # every line the worker wrote is one JSON object
    for challenge in challenges:
        delivered = [r for r in records if r.get("challenge_id") == challenge.challenge_id]
        assert any("delivered" in r["message"] for r in delivered), delivered
    # At INFO, Celery's own line per task ("received", "succeeded in") is left out: ours says it.
    assert [r for r in records if r["logger"] in ("celery.worker.strategy", "celery.app.trace")] == []
    # The codes went to the SMTP server, and nowhere into the worker's log.
    codes = [code_in(message) for message in sink.messages]
    assert len(codes) == 3 and not [c for c in codes if c in "\n".join(lines)]


def test_worker_health_answers_for_a_running_worker_only(
    start_server: ServerFactory,
    sink: SmtpSink,
    queue: str,
    tmp_path: Path,
) -> None:
    h = celery_server(start_server, sink, queue)
    env = worker_env(h)
    name = f"probe-{uuid.uuid4().hex[:8]}@localhost"  # unique: other workers may share this broker
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - lives with the process
    worker = subprocess.Popen(
        [TWOFACTOR, "worker", "--concurrency", "1", "--hostname", name], env=env, stdout=log, stderr=log
    )
    log.close()
    try:
        deadline = time.monotonic() + 90
        while True:  # the worker answers once it has started
            answered = subprocess.run(
                [TWOFACTOR, "worker-health", "--name", name, "--timeout", "2"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if answered.returncode == 0:
                break
            assert answered.returncode == 1, answered.stderr
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
        assert answered.stdout == f"{name}: ok\n"
        nobody = subprocess.run(
            [TWOFACTOR, "worker-health", "--name", f"nobody-{name}", "--timeout", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert nobody.returncode == 1 and "did not answer" in nobody.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)


def test_worker_health_says_why_the_broker_refused_and_never_its_password(tmp_path: Path) -> None:
    """A probe that fails for a wrong password must not read as a network fault: one line with
    the broker (password masked) and what Redis answered, exit status 1, no traceback."""
    with private_redis(tmp_path) as broker:
        client = redis.Redis.from_url(broker.url)
        client.config_set("requirepass", "the-right-one")
        client.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
        env["TWOFACTOR_BROKER_URL"] = broker.url.replace("redis://", "redis://:not-the-pw@")
        answered = subprocess.run(
            [TWOFACTOR, "worker-health", "--timeout", "2"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert answered.returncode == 1 and answered.stderr.count("\n") == 1, answered.stderr
    said = answered.stderr
    assert f"redis://:****@127.0.0.1:{broker.port}/0" in said and "not-the-pw" not in said, said
    assert "invalid username-password pair" in said and "TWOFACTOR_BROKER_URL" in said, said
