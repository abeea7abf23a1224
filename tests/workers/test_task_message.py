"""The server publishes the deliver task without Celery (task_queue.deliver_message, one LPUSH):
the message must be the one Celery's own send_task writes, field for field, but for its ids."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import redis
from celery import Celery

from tests.conftest import REDIS_URL
from twofactor_server.delivery.dispatch import CeleryDispatcher
from twofactor_server.delivery.task_queue import DELIVER_TASK, celery_config, deliver_message
from twofactor_server.settings import Settings

PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag"}  # a new uuid in every message


def masked(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    for part in (message["headers"], message["properties"]):
        for name in PER_MESSAGE & part.keys():
            assert part[name], name
            part[name] = "<uuid>"
    # Celery names a reply queue of the publishing thread; nothing is ever sent back to it.
    message["properties"]["reply_to"] = None
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_the_published_message_is_the_one_celery_writes(queue: str) -> None:
    settings = dataclasses.replace(Settings(), broker_url=REDIS_URL, delivery_queue=queue)
    app = Celery("twofactor", config_source=celery_config(settings))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        app.send_task(DELIVER_TASK, args=["c0ffee", 3], queue=queue, retry=False)
        celerys = client.rpop(queue)
        CeleryDispatcher(settings).dispatch("c0ffee", 3)
        ours = client.rpop(queue)
    finally:
        app.close()
        client.close()
    assert isinstance(celerys, bytes) and isinstance(ours, bytes)
    assert masked(ours) == masked(celerys)
    assert masked(ours)["body"] == [
        ["c0ffee", 3],
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]


def test_every_message_has_ids_of_its_own() -> None:
    first, second = (json.loads(deliver_message("c", 0, "q")) for _ in range(2))
    assert first["headers"]["id"] != second["headers"]["id"]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    assert first["headers"]["id"] == first["headers"]["root_id"] == first["properties"]["correlation_id"]
