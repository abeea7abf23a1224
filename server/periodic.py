"""A job run on a timer in a daemon thread of the process that owns it: no extra process to run."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from twofactor_server.domain.errors import TwoFactorError

log = logging.getLogger(__name__)
# The OS generator: no state shared across forked workers, and the global random state stays alone.
_JITTER = random.SystemRandom()


class Periodic:
    """Runs `job` every `interval` seconds (the first run after a random part of one interval, so a
    fleet started together spreads out) until stop(). A failing run is logged and retried next time."""

    def __init__(self, name: str, interval: float, job: Callable[[], object]) -> None:
        self._name = name
        self._interval = interval
        self._job = job
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        delay = _JITTER.uniform(0, self._interval)
        while not self._stopping.wait(delay):
            try:
                self._job()
            except TwoFactorError as error:  # expected (storage down): its one line says what and why
                log.warning(
                    "%s failed: %s; it runs again in %.0f s", self._name, error.message, self._interval
                )
            except Exception:
                log.exception("%s failed; it runs again in %.0f s", self._name, self._interval)
            delay = self._interval

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
