"""psycopg_pool's ConnectionPool with its everyday case made short.

Every RPC that touches PostgreSQL takes an idle connection and gives it back healthy. The
library's general path for that pair runs about 30 Python calls (three INFO log calls that
return at WARNING, the request statistics, the check and reset hooks, the hand-off to its
maintenance worker): about 6 µs, the largest single item of an accepted Verify after the
statement itself (docs/benchmarks.md). This checks the connection's state itself and hands it
to the library's own steps for taking an idle connection and putting one back: about 1.5 µs.

Only that case is short. A pool without an idle connection, a connection returned
mid-transaction, broken, past its lifetime or older than the last drain(), a pool with a check
or reset hook: each goes the library's own way, unchanged; a client already waiting, a closed
pool and a wait() for the pool to fill are handled by the library's own add-to-pool step. What
is read and called here is psycopg_pool's own (pinned to 3.3 in pyproject.toml;
tests/server/test_pool.py pins the behaviour this relies on): its lock, its ready-connection
and add-to-pool steps, the hooks, the last drain, and each connection's creation, expiry and
back-reference.
"""

from __future__ import annotations

from time import monotonic
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

ConnectionT = TypeVar("ConnectionT", bound=psycopg.Connection[Any])

_IDLE = TransactionStatus.IDLE


class Pool(ConnectionPool[ConnectionT]):
    def getconn(self, timeout: float | None = None) -> ConnectionT:
        if self._check is None and not self._closed:  # a configured check runs on every checkout
            with self._lock:
                # The library's own step: a ready connection, the low-water mark its shrinking
                # reads, PoolTimeout for a timeout already spent.
                conn = self._get_ready_connection(self.timeout if timeout is None else timeout)
            if conn is not None:
                conn._pool = self  # checked out from this pool (putconn checks it)
                return conn
        return super().getconn(timeout)

    def putconn(self, conn: ConnectionT) -> None:
        if (
            getattr(conn, "_pool", None) is self  # else the library's own refusal: ValueError
            and self._reset is None
            and conn.pgconn.transaction_status == _IDLE
            and conn._created_at > self._drained_at
            and conn._expire_at > monotonic()
        ):
            # The library's own step too: a closed pool, a waiting client, a wait() for the
            # pool to fill, and the connection's back-reference, all handled there.
            self._add_to_pool(conn)
            return
        super().putconn(conn)
