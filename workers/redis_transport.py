"""kombu's Redis transport with one redis-py client per channel, not one per command.

kombu's Redis channel makes a new `redis.Redis` for every command it sends outside its
BRPOP loop; with late acknowledgement that is two per task (recording the message as
unacknowledged when it arrives, and the acknowledgement), and a redis-py client copies
its ~170 response callbacks into a case-insensitive dict when made: about 120 µs of the
consumer's CPU each (docs/benchmarks.md, Worker). The commands themselves are the same,
on connections from the channel's pool as before; a client is made again when the
channel makes a new pool (after a lost connection).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()  # type: ignore[no-untyped-call]
        yield kept


class Transport(kombu_redis.Transport):
    Channel = Channel
