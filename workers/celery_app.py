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
    app.steps["consumer"].add(StoragePause)
    return app


app = create_celery(Settings.from_env())
