"""psycopg_pool's ConnectionPool with its everyday case made short.

Every RPC that touches PostgreSQL takes an idle connection and gives it back healthy. The
library's general path for that pair runs about 30 Python calls (three INFO log calls that
return at WARNING, the request statistics, the check and reset hooks, the hand-off to its
maintenance worker): about 6 µs, the largest single item of an accepted Verify after the
statement itself (docs/benchmarks.md). This takes the same lock and moves the same deque
entry in about 2 µs.

Only that case is short. A pool without an idle connection, a client already waiting, a
connection returned mid-transaction, broken, past its lifetime or older than the last
drain(), a closed pool: each goes the library's own way, unchanged. The attributes read here
are psycopg_pool's own (pinned to 3.3 in pyproject.toml, and tests/test_pool.py pins the
behaviour this relies on): the deque of idle connections and its lock, the low-water mark its
shrinking reads, the queue of waiting clients, and each connection's creation and expiry.
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
        if self._check is None:  # a configured check runs on every checkout: the library's path
            with self._lock:
                if self._pool and not self._closed:
                    conn = self._pool.popleft()
                    if len(self._pool) < self._nconns_min:
                        self._nconns_min = len(self._pool)  # what the pool's shrinking reads
                    conn._pool = self  # marks it as this pool's, checked out (putconn checks it)
                    return conn
        return super().getconn(timeout)

    def putconn(self, conn: ConnectionT) -> None:
        if (
            conn._pool is self
            and self._reset is None
            and conn.pgconn.transaction_status == _IDLE
            and conn._created_at > self._drained_at
            and conn._expire_at > monotonic()
        ):
            with self._lock:
                if not self._waiting and not self._closed:
                    conn._pool = None  # idle in the pool: no reference loop (as the library does)
                    self._pool.append(conn)
                    return
        super().putconn(conn)
