"""Celery tasks. Thin: the arguments are an id and a publish generation; the work is
twofactor_server.delivery.deliverer. Each pool process also runs outbox recovery (with a
thread or green pool, the worker's one process does)."""

from __future__ import annotations

import logging
import os

from celery import Task, shared_task
from celery.concurrency.prefork import TaskPool as ProcessPool
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from twofactor_server.delivery.deliverer import Deliverer
from twofactor_server.delivery.recovery import OutboxRecovery
from twofactor_server.delivery.task_queue import DELIVER_TASK
from twofactor_server.observability.logs import said

log = logging.getLogger(__name__)

_deliverer: tuple[int, Deliverer] | None = None
_recovery: OutboxRecovery | None = None


def deliverer() -> Deliverer:
    """One Deliverer per worker process, built after the fork (a DB pool can't cross a fork)."""
    global _deliverer
    if _deliverer is None or _deliverer[0] != os.getpid():
        _deliverer = (os.getpid(), _build()[0])
    return _deliverer[1]


def _build() -> tuple[Deliverer, OutboxRecovery]:
    from twofactor_server.app import load_keyring
    from twofactor_server.delivery.dispatch import CeleryDispatcher, build_deliverer
    from twofactor_server.settings import Settings
    from twofactor_server.storage.database import open_database

    settings = Settings.from_env()
    db = open_database(
        settings.database_url,
        data_dir=settings.data_dir,
        pool_size=2,
        timeout=settings.storage_timeout_seconds,
    )
    publisher = CeleryDispatcher(settings)
    recovery = OutboxRecovery(db, publisher.dispatch, recovery_seconds=settings.outbox_recovery_seconds)
    return build_deliverer(settings, db=db, keyring=load_keyring(settings)), recovery


@worker_process_init.connect  # type: ignore[untyped-decorator]
def start_recovery(**_: object) -> None:
    """Every pool process reconciles the outbox: at start, then every half recovery interval."""
    global _deliverer, _recovery
    built, _recovery = _build()
    _deliverer = (os.getpid(), built)
    _recovery.start()


@worker_ready.connect  # type: ignore[untyped-decorator]
def start_recovery_without_pool_processes(sender: object = None, **_: object) -> None:
    """worker_process_init comes from prefork's pool processes and from the solo pool; a thread
    or green pool (`twofactor worker -- -P threads`) sends none, and its worker would reconcile
    nothing: there the worker's own process runs outbox recovery."""
    if _recovery is None and not isinstance(getattr(sender, "pool", None), ProcessPool):
        start_recovery()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
@worker_shutdown.connect  # type: ignore[untyped-decorator]
def stop_recovery(**_: object) -> None:
    if _recovery is not None:
        _recovery.stop()


@shared_task(bind=True, name=DELIVER_TASK, max_retries=None)  # type: ignore[untyped-decorator]
def deliver_challenge(self: Task, challenge_id: str, generation: int = 0) -> str:
    # A retry (a provider error, storage down) is a new message with a countdown, of the row's
    # generation as the attempt claimed it: while storage is down the worker holds tasks back
    # instead of acknowledging them.
    outcome = deliverer().deliver(challenge_id, generation, tries=self.request.retries or 0)
    if outcome.retry_in is not None:
        try:
            raise self.retry(args=(challenge_id, outcome.retry_generation), countdown=outcome.retry_in)
        except Reject as lost:  # Celery's, when the broker took no retry: its page of traceback
            log.warning(
                "delivery of %s: its retry could not be queued (%s); outbox recovery publishes it "
                "again once the broker answers",
                challenge_id,
                said(lost.reason),
            )
    return outcome.status
