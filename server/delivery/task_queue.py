"""The contract between the server and the Celery workers: the task's name and the Celery
configuration both sides use. Nothing here imports Celery: the server publishes by task
name, and only the worker package holds the task itself."""

from __future__ import annotations

from typing import Any

from twofactor_server.settings import Settings

DELIVER_TASK = "twofactor.deliver_challenge"  # one argument: the challenge id


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the publishing server and the workers."""
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.delivery_queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        # A task is acknowledged after it ran, and requeued if its worker process dies mid-task.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_timeout": settings.broker_timeout_seconds,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "socket_connect_timeout": settings.broker_timeout_seconds,
            "socket_timeout": settings.broker_timeout_seconds,
            # A worker node that vanished entirely: its unacknowledged task is redelivered after this.
            "visibility_timeout": 300,
        },
        "worker_hijack_root_logger": False,
        # The console providers print codes to stdout; never let Celery turn that into log records.
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
    }
