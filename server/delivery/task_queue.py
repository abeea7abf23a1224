"""The contract between the server and the Celery workers: the task's name and the Celery
configuration both sides use. Nothing here imports Celery: the server publishes by task
name, and only the worker package holds the task itself."""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from functools import lru_cache
from typing import Any

from twofactor_server.settings import Settings

DELIVER_TASK = "twofactor.deliver_challenge"  # one argument: the challenge id
_NO_CALLBACKS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def deliver_message(challenge_id: str, generation: int, queue: str) -> bytes:
    """The deliver task's message as Celery's `send_task` puts it in a Redis list: Celery's task
    protocol 2 (headers, a JSON body of args, kwargs and no callbacks) in kombu's Redis envelope
    (base64 body, delivery info for the default exchange). tests/workers/test_task_message.py
    compares it with Celery's own, so an upgrade that changes the format fails there.
    Writing it here costs a tenth of `send_task` (docs/benchmarks.md, Delivery); filling in a
    template of the envelope, made once per queue and process, is a third cheaper again than
    building it each time (docs/benchmarks.md, SendCode, second pass)."""
    task_id = str(uuid.uuid4())
    args = [challenge_id, generation]
    body = json.dumps([args, {}, _NO_CALLBACKS]).encode()
    return (
        _envelope_template(queue, _origin())
        .format(
            id=task_id,
            tag=uuid.uuid4(),
            body=base64.b64encode(body).decode("ascii"),
            argsrepr=json.dumps(repr(args)),  # the only field whose text JSON may have to escape
        )
        .encode()
    )


# Stand-ins for the per-message values in the template (no queue name or host holds a NUL).
_ID, _TAG, _BODY, _ARGSREPR = "\0id\0", "\0tag\0", "\0body\0", "\0argsrepr\0"


@lru_cache(maxsize=16)
def _envelope_template(queue: str, origin: str) -> str:
    """The message as JSON text with str.format fields for the per-message values:
    {id}, {tag} and {body} inside JSON strings, {argsrepr} a JSON string of its own."""
    headers: dict[str, object] = {
        "lang": "py",
        "task": DELIVER_TASK,
        "id": _ID,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": _ID,
        "parent_id": None,
        "argsrepr": _ARGSREPR,
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties: dict[str, object] = {
        "correlation_id": _ID,
        "reply_to": None,  # no result is ever sent back (task_ignore_result)
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": _TAG,
    }
    envelope = {
        "body": _BODY,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    template = json.dumps(envelope).replace("{", "{{").replace("}", "}}")
    fields = {_ID: '"{id}"', _TAG: '"{tag}"', _BODY: '"{body}"', _ARGSREPR: "{argsrepr}"}
    for stand_in, field in fields.items():
        template = template.replace(json.dumps(stand_in), field)
    return template


def _origin() -> str:
    """Who published, as Celery writes it: gen<pid>@<host> (the pid changes across a fork)."""
    return f"gen{os.getpid()}@{_HOST}"


_HOST = socket.gethostname()


def redis_bulk(data: bytes) -> bytes:
    """One bulk string of Redis's protocol (RESP): what the server's LPUSH and the worker's
    acknowledgement bookkeeping write straight to a connection, without redis-py's packer."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def redis_command(*args: str | bytes) -> bytes:
    """One command in Redis's protocol: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(
        redis_bulk(arg if isinstance(arg, bytes) else arg.encode()) for arg in args
    )


HUNG_TASK_MARGIN_SECONDS = 10.0  # past the lease: the claim and the record, each under its storage timeout


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
        # A lost broker connection leaves the sends under way to finish: cancelled, their messages
        # would be delivered again while the claim's lease still holds the row (a second attempt
        # later, as recovery sends it). Said explicitly: Celery 5 warns, every time, of a default
        # that changes in 6 (the worker silences that warning, celery_app.py).
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_prefetch_multiplier": 1,
        # A send that hangs (a gateway that never answers) must not hold its pool process for
        # good: past the claim's lease the attempt is void anyway (another may have taken the
        # delivery over), so the process is replaced and the row goes back to recovery.
        "task_time_limit": settings.delivery_lease_seconds + HUNG_TASK_MARGIN_SECONDS,
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
