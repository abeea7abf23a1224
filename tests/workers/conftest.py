"""Fixtures of the delivery tests: the shared Redis, a queue per test, an SMTP sink, workers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_URL, Harness, require_service, without_password
from tests.workers.celery_harness import Workers, remove_queue_keys, worker_env


@pytest.fixture
def backend() -> str:
    return "postgres"  # worker processes and the server share one database


@pytest.fixture
def clock() -> Callable[[], float]:
    return time.time  # the workers run on the real clock; so does the server they work for


@pytest.fixture(scope="session")
def redis_available() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as error:
        require_service(f"Redis at {without_password(REDIS_URL)}", error)


@pytest.fixture
def queue(redis_available: None) -> Iterator[str]:
    """A queue of the test's own; afterwards its keys go from the shared Redis."""
    name = f"twofactor-test-{uuid.uuid4().hex[:8]}"
    yield name
    remove_queue_keys(REDIS_URL, name)


@pytest.fixture
def workers_for(tmp_path: Path, queue: str) -> Iterator[Callable[[Harness], Workers]]:
    # Taking `queue` makes its clean-up run after the workers stopped: none re-declares it after.
    made: list[Workers] = []

    def make(h: Harness) -> Workers:
        workers = Workers(worker_env(h), tmp_path)
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop()
