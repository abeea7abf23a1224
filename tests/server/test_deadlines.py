"""The client-side deadline (storage/deadlines.py): a socket still in use past its deadline is shut
down, which wakes whoever waits on it; a watch whose socket was closed meanwhile never touches the
socket that has taken its descriptor number since."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.storage.deadlines import Watch, Watchdog


def test_a_socket_past_its_deadline_is_shut_down_and_its_reader_woken() -> None:
    watchdog = Watchdog("test")
    ours, peer = socket.socketpair()
    try:
        ours.settimeout(30)  # bounds the test if the shutdown never comes
        watch = watchdog.watch(ours.fileno(), time.monotonic() + 0.1)
        assert ours.recv(1) == b""  # blocked until the watchdog shut the socket down
        assert watch.expired and watchdog.release(watch)
    finally:
        watchdog.close()
        ours.close()
        peer.close()


def test_a_watch_that_outlived_its_socket_leaves_the_descriptors_new_owner_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="twofactor_server.storage.deadlines")
    watchdog = Watchdog("test")
    first, first_peer = socket.socketpair()
    number = first.fileno()
    watch = watchdog.watch(number, time.monotonic() + 0.3)
    first.close()  # a bug's stand-in: the connection closed without releasing its watch
    first_peer.close()
    taken = [socket.socketpair() for _ in range(4)]  # the lowest free number is handed out again
    try:
        reused = [pair for pair in taken if number in (pair[0].fileno(), pair[1].fileno())]
        assert reused, "the descriptor number was not reused: the test proves nothing"
        give_up = time.monotonic() + 10
        while not any("outlived its connection" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < give_up, "the watchdog never said it left the reused descriptor alone"
            time.sleep(0.01)
        assert watch.expired
        a, b = reused[0]
        a.sendall(b"x")  # still connected both ways: not shut down
        b.settimeout(5)
        assert b.recv(1) == b"x"
        b.sendall(b"y")
        a.settimeout(5)
        assert a.recv(1) == b"y"
    finally:
        watchdog.close()
        for a, b in taken:
            a.close()
            b.close()


def test_a_pooled_connections_watch_names_its_socket_even_if_its_descriptor_moved(postgres_url: str) -> None:
    # The socket's inode is read once per connection, and again whenever the connection's
    # descriptor is not the one it was read for: a stale inode would make the watchdog leave a
    # frozen connection alone (as a reused descriptor), and the unit of work would hang.
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=30.0)
    try:
        conn, watch = db._checkout()
        fd = conn.pgconn.socket
        real = os.fstat(fd).st_ino
        assert (watch.fd, watch.inode) == (fd, real)
        assert conn.deadline_watch is watch
        db._checkin(conn, watch)

        again, rearmed = db._checkout()  # the connection's one watch, armed again: not expired
        assert again is conn and rearmed is watch and not rearmed.expired
        db._checkin(again, rearmed)

        conn.deadline_watch = Watch(fd + 1000, 0.0, real + 1)  # as if read for another descriptor
        again, watch = db._checkout()
        assert again is conn
        assert (watch.fd, watch.inode) == (fd, real)
        assert conn.deadline_watch is watch
        db._checkin(again, watch)
    finally:
        db.close()


def test_a_connection_whose_watch_expired_is_closed_and_its_watch_never_armed_again(
    postgres_url: str,
) -> None:
    # A pooled connection keeps one Watch for its life (database.py). Once that watch expires,
    # the connection is closed at checkin and the pool replaces it: the next unit of work gets
    # another connection with a watch of its own, never the expired one armed again.
    db = PostgresDatabase(postgres_url, pool_size=1, timeout=0.5)
    try:
        conn, watch = db._checkout()
        deadline = time.monotonic() + 30
        while not watch.expired:  # the watchdog's thread shuts the socket down at 0.5 s
            assert time.monotonic() < deadline, "the watch never expired"
            time.sleep(0.01)
        db._checkin(conn, watch)
        assert conn.closed
        db._pool.wait(timeout=30)  # the replacement, connected in the pool's own time
        again, fresh = db._checkout()
        try:
            assert again is not conn and fresh is not watch
            assert not fresh.expired and again.deadline_watch is fresh
        finally:
            db._checkin(again, fresh)
    finally:
        db.close()
