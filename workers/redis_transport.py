"""kombu's Redis transport with one redis-py client per channel, not one per command, and
its late-acknowledgement bookkeeping written without redis-py's pipeline machinery.

kombu's Redis channel makes a new `redis.Redis` for every command it sends outside its
BRPOP loop; with late acknowledgement that is two per task (recording the message as
unacknowledged when it arrives, and the acknowledgement), and a redis-py client copies
its ~170 response callbacks into a case-insensitive dict when made: about 120 µs of the
consumer's CPU each (docs/benchmarks.md, Worker). The commands themselves are the same,
on connections from the channel's pool as before; a client is made again when the
channel makes a new pool (after a lost connection).

The two transactions themselves (MULTI ZADD HSET EXEC on arrival, MULTI ZREM HDEL EXEC on
ack) then cost a fifth of the consumer's instructions per email, most of it redis-py's
general pipeline (packing, parsing, taking a connection from the pool and returning it).
`QoS` sends the same four commands in one write, on a connection it keeps from the same
pool, and reads the four replies. Anything unexpected (an error reply, a lost connection)
hands the message to kombu's own code, which sends them again with its retries: a
transaction that did run is harmless to repeat (the same record, a later score).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from twofactor_server.delivery.task_queue import redis_command

log = logging.getLogger(__name__)

_MULTI = redis_command("MULTI")
_EXEC = redis_command("EXEC")


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._kept: tuple[Any, Any] | None = None  # (pool, connection)

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        # What kombu's QoS.append writes, and its restore_by_tag reads back.
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
        if not self._transaction(
            redis_command("ZADD", self.unacked_index_key, repr(time()), delivery_tag),
            redis_command("HSET", self.unacked_key, delivery_tag, record),
        ):
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]  # kombu's, with retries
            return
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]  # in memory

    def ack(self, delivery_tag: str) -> None:
        if not self._transaction(
            redis_command("ZREM", self.unacked_index_key, delivery_tag),
            redis_command("HDEL", self.unacked_key, delivery_tag),
        ):
            try:
                super().ack(delivery_tag)  # type: ignore[no-untyped-call]  # kombu's, with its retries
                return
            except (redis.RedisError, OSError) as error:
                # kombu's raises before it frees the message's prefetch slot: with late
                # acknowledgement and a prefetch of one, the consumer then took no message ever
                # again (the worker alive, its queue growing). The slot is freed below; the record
                # left in Redis brings the message back after the visibility timeout, when the
                # delivery it names is settled and the task a no-op.
                log.error(
                    "could not acknowledge message %s in Redis (%s: %s); it comes back after the "
                    "visibility timeout, and is then a no-op; check Redis",
                    delivery_tag,
                    type(error).__name__,
                    error,
                )
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]  # in memory

    def _transaction(self, *commands: bytes) -> bool:
        """MULTI, the commands, EXEC in one write; whether every reply came back as expected."""
        if self.channel.global_keyprefix:  # kombu's prefixing client rewrites the keys
            return False
        with self._lock:  # acknowledgements may come from the pool's threads (-P threads)
            try:
                connection = self._connection()
                connection.send_packed_command([b"".join((_MULTI, *commands, _EXEC))])
                replies = [connection.read_response() for _ in range(len(commands) + 2)]
            except (redis.RedisError, OSError):
                self._drop_connection()  # replies may be left unread: never reuse it
                return False
        executed = replies[-1]
        return isinstance(executed, list) and not any(isinstance(r, Exception) for r in executed)

    def _connection(self) -> Any:
        """A connection of the channel's pool kept for these transactions: taking one from the
        pool and giving it back each time (a poll of the socket, redis-py's connection events)
        cost about as much as the transaction. A new one comes with a new pool."""
        pool = self.channel.live_pool()
        if self._kept is None or self._kept[0] is not pool:
            self._kept = (pool, pool.get_connection())
        return self._kept[1]

    def _drop_connection(self) -> None:
        if self._kept is not None:
            pool, connection = self._kept
            self._kept = None
            connection.disconnect()
            pool.release(connection)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _kept_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.live_pool():
            kept = self._kept_client = self._create_client()  # type: ignore[no-untyped-call]
        yield kept

    def live_pool(self) -> Any:
        """The channel's pool. Once a lost connection closed the transport, a ConnectionError, as
        kombu's closing code expects (its unacknowledged messages then stay recorded in Redis, and
        come back after the visibility timeout): kombu's `pool` would make a new pool from settings
        the closed transport no longer has, and its AttributeError stopped the worker for good."""
        if self._pool is None and self.connection.client is None:
            raise redis.ConnectionError("the connection to the broker was closed")
        return self.pool


class Transport(kombu_redis.Transport):
    Channel = Channel
