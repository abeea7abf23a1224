"""The Celery application of the delivery workers: Redis broker, JSON messages, late acknowledgement.

Start a worker with `twofactor worker` (or `celery -A twofactor_workers.celery_app worker`).
"""

from __future__ import annotations

from celery import Celery

from twofactor_server.delivery.task_queue import celery_config
from twofactor_server.settings import Settings
from twofactor_workers.storage_pause import StoragePause


def create_celery(settings: Settings) -> Celery:
    app = Celery("twofactor", config_source=celery_config(settings), include=["twofactor_workers.tasks"])
    if settings.broker_url.startswith("redis://"):
        # One redis-py client per channel (redis_transport.py). rediss:// keeps kombu's own
        # transport: kombu chooses its TLS settings by that scheme's name.
        app.conf.broker_transport = "twofactor_workers.redis_transport:Transport"
    app.steps["consumer"].add(StoragePause)
    return app


app = create_celery(Settings.from_env())
