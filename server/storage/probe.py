"""The health probe's own connection to PostgreSQL: SELECT 1 within a deadline.

A connection of its own, so that a busy pool is not taken for an unreachable database. It is
kept between pings; one that died while idle (a restart closed it) is replaced at once, within
the same deadline, so a restart alone is not reported as an outage. `timed_out` tells silence (a
statement or a connect that waited out its time: a frozen database) from a refusal; opening a
connection is given its own time (TLS and authentication to a distant server can take longer than
a statement's budget), and the statement on it its full budget after.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import psycopg

from twofactor_server.storage.deadlines import Watchdog


class ProbeConnection:
    def __init__(self, url: str, *, connect_timeout: int, timeout: float, watchdog: Watchdog) -> None:
        self._url = url
        self._timeout = timeout
        self.timed_out = False  # the last failure was a deadline waited out (silence), not a refusal
        self._connect_timeout = connect_timeout
        self._watchdog = watchdog
        self._conn: psycopg.Connection[Any] | None = None

    def select_one(self, deadline: float) -> bool:
        """SELECT 1 answered by `deadline`, else psycopg.OperationalError; True when the kept
        connection had died and a new one answered (the pool's connections likely died too)."""
        kept = self._conn is not None
        self.timed_out = False
        try:
            self._select_one(deadline)
        except psycopg.OperationalError:
            if not kept or self.timed_out:
                raise
            self._select_one(deadline)
            return True
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _select_one(self, deadline: float) -> None:
        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self._url, autocommit=True, connect_timeout=self._connect_timeout
                )
                deadline = max(deadline, monotonic() + self._timeout)  # connecting is not silence
            watch = self._watchdog.watch(self._conn.pgconn.socket, deadline)
            try:
                self._conn.execute("SELECT 1")
            finally:
                if self._watchdog.release(watch):  # its socket was shut down: never reused
                    self.timed_out = True
                    self.close()
        except psycopg.errors.ConnectionTimeout:
            self.timed_out = True
            self.close()
            raise
        except psycopg.OperationalError:
            self.close()
            raise
