"""Worker logs and metrics: our log format instead of Celery's, the challenge id on every
line of a task, and prometheus_client's multiprocess bookkeeping for the pool."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from celery import signals
from celery.exceptions import CPendingDeprecationWarning

from twofactor_server.observability import logs, metrics
from twofactor_server.settings import Settings

_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def install(settings: Settings, log_format: str) -> None:
    """Connect the Celery signals; call in the main worker process, before the pool forks."""

    @signals.setup_logging.connect(weak=False)  # type: ignore[untyped-decorator]
    def setup_logging(**_: Any) -> None:
        # Connected, this replaces Celery's own logging set-up ("hijacking" the root logger).
        logs.configure_logging(settings.log_level, log_format)
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # Celery's own INFO lines for every task ("received", "succeeded in"): the deliverer
            # logs each outcome itself, with the challenge id, and the two lines cost about 6 % of
            # the worker's instructions per email (docs/benchmarks.md, Worker). Shown at DEBUG.
            for name in _PER_TASK_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)

    @signals.celeryd_after_setup.connect(weak=False)  # type: ignore[untyped-decorator]
    def quiet_the_cancel_default_warning(**_: Any) -> None:
        # Celery 5 warns at every lost broker connection, in ten lines, that Celery 6 will cancel
        # the tasks under way by default; task_queue.py keeps them on purpose. After Celery's log
        # set-up, which shows every pending deprecation ('always' filters put first).
        warnings.filterwarnings(
            "ignore", message=r"\s*In Celery 5\.1 we introduced", category=CPendingDeprecationWarning
        )

    @signals.task_prerun.connect(weak=False)  # type: ignore[untyped-decorator]
    def bind_challenge(args: Any = None, **_: Any) -> None:
        challenge_id = str(args[0]) if args else ""
        logs.bind_more(challenge_id=challenge_id)

    @signals.task_postrun.connect(weak=False)  # type: ignore[untyped-decorator]
    def unbind_challenge(**_: Any) -> None:
        logs.bind_more(challenge_id="")

    @signals.worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def forget_process(pid: int | None = None, **_: Any) -> None:
        if pid is not None:
            metrics.mark_process_dead(pid)
