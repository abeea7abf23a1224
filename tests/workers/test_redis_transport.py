"""The worker's Redis transport keeps one redis-py client per channel; the late-acknowledgement
bookkeeping it carries (unacked message recorded on arrival, removed on ack) still happens."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import redis
from kombu import Connection

from tests.conftest import REDIS_URL
from tests.workers.celery_harness import private_redis
from twofactor_server.settings import Settings
from twofactor_workers.celery_app import create_celery
from twofactor_workers.redis_transport import Transport


def _taken_unacknowledged(connection: Connection, queue: str, payload: dict[str, int]) -> tuple[Any, Any]:
    """The connection's channel, and `payload` published to `queue` and taken back from it without
    acknowledging it (late acknowledgement: the transport records it as unacked)."""
    channel = connection.default_channel
    channel.queue_declare(queue)
    connection.Producer().publish(payload, routing_key=queue, exchange="")
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None and message.payload == payload
    return channel, message


def test_the_worker_app_uses_the_transport(queue: str) -> None:
    settings = dataclasses.replace(Settings(), broker_url=REDIS_URL, delivery_queue=queue)
    with create_celery(settings).connection_for_read() as connection:
        assert isinstance(connection.transport, Transport)


def test_one_client_per_channel_until_its_pool_is_replaced(queue: str) -> None:
    with Connection(REDIS_URL, transport=Transport) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        channel._disconnect_pools()  # what the channel does after a lost connection
        with channel.conn_or_acquire() as after:
            assert after is not first
            assert after.connection_pool is channel.pool
            assert after.ping()


def test_unacknowledged_until_acked(queue: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL, transport=Transport) as connection:
        channel, message = _taken_unacknowledged(connection, queue, {"n": 1})
        tag = message.delivery_tag
        assert client.hexists(channel.unacked_key, tag)  # would come back if the worker died
        assert client.zscore(channel.unacked_index_key, tag) is not None
        message.ack()
        assert not client.hexists(channel.unacked_key, tag)
        assert client.zscore(channel.unacked_index_key, tag) is None
    client.close()


def test_kombu_restores_what_the_transport_recorded(queue: str) -> None:
    """The record written on arrival is the one kombu reads back when a worker goes away
    without acknowledging (restore at shutdown, or after the visibility timeout)."""
    with Connection(REDIS_URL, transport=Transport) as connection:
        channel, _message = _taken_unacknowledged(connection, queue, {"n": 2})
        assert channel._size(queue) == 0
        channel.qos.restore_unacked()  # what kombu does for unacked messages at shutdown
        assert channel._size(queue) == 1
        again = channel.basic_get(queue, no_ack=False)
        assert again is not None and again.payload == {"n": 2}
        again.ack()


def test_a_key_prefix_keeps_kombus_own_bookkeeping(queue: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    options = {"global_keyprefix": f"{queue}:"}
    with Connection(REDIS_URL, transport=Transport, transport_options=options) as connection:
        channel, message = _taken_unacknowledged(connection, queue, {"n": 3})
        tag = message.delivery_tag
        assert client.hexists(f"{queue}:{channel.unacked_key}", tag)
        assert not client.hexists(channel.unacked_key, tag)
        message.ack()
        assert not client.hexists(f"{queue}:{channel.unacked_key}", tag)
        client.delete(f"{queue}:{channel.unacked_index_key}", f"{queue}:{channel.unacked_key}")
    client.close()


def test_the_bookkeeping_survives_a_lost_connection(queue: str) -> None:
    """The connection the transport keeps for it is dropped by Redis: the acknowledgement
    still removes the record (kombu's own code sends it on a new connection)."""
    client = redis.Redis.from_url(REDIS_URL)
    with Connection(REDIS_URL, transport=Transport) as connection:
        channel, message = _taken_unacknowledged(connection, queue, {"n": 4})
        tag = message.delivery_tag
        assert client.hexists(channel.unacked_key, tag)
        host, port = channel.qos._connection()._sock.getsockname()[:2]
        assert client.client_kill(f"{host}:{port}")
        message.ack()
        assert not client.hexists(channel.unacked_key, tag)
        assert client.zscore(channel.unacked_index_key, tag) is None
        _, message = _taken_unacknowledged(connection, queue, {"n": 5})  # and the next message's too
        assert client.hexists(channel.unacked_key, message.delivery_tag)
        message.ack()
        assert not client.hexists(channel.unacked_key, message.delivery_tag)
    client.close()


def test_an_acknowledgement_redis_missed_frees_the_consumers_slot(queue: str, tmp_path: Path) -> None:
    """Redis gone when a delivery is acknowledged: the message's prefetch slot is freed all the
    same (kombu's code raised first, and a worker with a prefetch of one took nothing again);
    its record stays in Redis, to come back after the visibility timeout."""
    with private_redis(tmp_path) as server, Connection(server.url, transport=Transport) as connection:
        channel, message = _taken_unacknowledged(connection, queue, {"n": 6})
        channel.qos.prefetch_count = 1
        assert not channel.qos.can_consume()  # the one slot is the message's
        server.stop()
        message.ack()  # one error line, no exception into the worker's consumer
        assert channel.qos.can_consume()


def test_a_channel_closed_after_its_transport_restores_nothing_and_raises_a_connection_error(
    queue: str, tmp_path: Path
) -> None:
    """Celery, on a lost broker connection, may close a channel (restoring its unacknowledged
    messages) after the connection closed the transport: a connection error, which kombu's closing
    ignores (the records stay in Redis, to come back after the visibility timeout), never the
    AttributeError of a pool made from the settings the transport no longer has, which stopped
    the worker ("Unrecoverable error")."""
    with private_redis(tmp_path) as server:
        connection = Connection(server.url, transport=Transport)
        channel, message = _taken_unacknowledged(connection, queue, {"n": 7})
        server.stop()
        channel._disconnect_pools()  # what closing after the lost connection did first
        connection.transport.client = None  # the transport closed (Connection._do_close_transport)
        connection.maybe_close_channel(channel)  # ignores connection errors only
        assert channel.closed
        message.ack()  # one error line, as for any acknowledgement Redis missed
