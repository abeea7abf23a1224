"""Celery tasks. Thin: the argument is an id, the work is twofactor_server.delivery.deliverer."""

from __future__ import annotations

import os

from celery import Task, shared_task

from twofactor_server.delivery.deliverer import Deliverer
from twofactor_server.delivery.task_queue import DELIVER_TASK

_deliverer: tuple[int, Deliverer] | None = None


def deliverer() -> Deliverer:
    """One Deliverer per worker process, built after the fork (a DB pool can't cross a fork)."""
    global _deliverer
    if _deliverer is None or _deliverer[0] != os.getpid():
        from twofactor_server.app import load_keyring
        from twofactor_server.delivery.providers import build_email_sender, build_sms_sender
        from twofactor_server.settings import Settings
        from twofactor_server.storage.database import open_database

        settings = Settings.from_env()
        db = open_database(settings.database_url, data_dir=settings.data_dir, pool_size=2)
        _deliverer = (
            os.getpid(),
            Deliverer(
                db,
                load_keyring(settings),
                build_email_sender(settings),
                build_sms_sender(settings),
                issuer=settings.policy.issuer,
                retry_base_seconds=settings.delivery_retry_base_seconds,
            ),
        )
    return _deliverer[1]


@shared_task(bind=True, name=DELIVER_TASK, max_retries=None)  # type: ignore[untyped-decorator]
def deliver_challenge(self: Task, challenge_id: str) -> str:
    outcome = deliverer().deliver(challenge_id)
    if outcome.retry_in is not None:
        raise self.retry(countdown=outcome.retry_in)
    return outcome.status
